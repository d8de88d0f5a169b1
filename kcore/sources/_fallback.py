"""Stand-in for kcore.engine until it lands: the same signatures, with os.preadv."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from kcore.errors import FaultError

_FAULTS = (errno.EIO, errno.EFAULT, errno.ENXIO, errno.EINVAL, errno.EPERM)


@dataclass
class CopyStats:
    """What a copy did: bytes read, pages zero-filled, the first error."""

    bytes_read: int = 0
    pages_zero_filled: int = 0
    pages_sparse: int = 0
    first_error_offset: int | None = None
    first_errno: int = 0

    def merge(self, other: CopyStats) -> CopyStats:
        """Add another copy's counts into this one."""
        self.bytes_read += other.bytes_read
        self.pages_zero_filled += other.pages_zero_filled
        self.pages_sparse += other.pages_sparse
        if self.first_error_offset is None and other.first_error_offset is not None:
            self.first_error_offset = other.first_error_offset
            self.first_errno = other.first_errno
        return self

    __iadd__ = merge


def readinto_range(fd: int, offset: int, buf, *, strict: bool = False,
                   page_size: int = 4096) -> CopyStats:
    """Fill buf from fd at offset; unreadable pages become zeros (counted)."""
    view = memoryview(buf).cast("B")
    stats = CopyStats()
    pos = 0
    n = len(view)
    while pos < n:
        try:
            got = os.preadv(fd, [view[pos:]], offset + pos)
        except InterruptedError:
            continue
        except OSError as exc:
            got = -exc.errno
        if got > 0:
            pos += got
            stats.bytes_read += got
            continue
        err = -got if got < 0 else errno.EIO
        if strict:
            raise FaultError(f"read fault at offset {offset + pos:#x}", address=offset + pos)
        if stats.first_error_offset is None:
            stats.first_error_offset = offset + pos
            stats.first_errno = err
        nxt = min(n, (offset + pos) // page_size * page_size + page_size - offset)
        view[pos:nxt] = bytes(nxt - pos)
        stats.pages_zero_filled += 1
        pos = nxt
    return stats
