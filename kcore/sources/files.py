"""Opening and reading the files that hold memory: errors as one line naming the file."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from kcore.errors import SourceError


def open_readonly(path: str) -> int:
    """Open `path` read-only (O_RDONLY|O_CLOEXEC); raise SourceError with the reason.

    O_NONBLOCK while opening, so a FIFO cannot hang us; FIFOs, sockets and directories are
    refused, since memory is read at offsets.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise SourceError(f"{path}: cannot open: {describe_errno(exc.errno)}",
                          exc.errno) from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else "not a file or device"
        raise SourceError(f"{path}: {what} (memory is read at offsets 0x0 and on)")
    os.set_blocking(fd, True)
    return fd


@contextlib.contextmanager
def opened(path: str) -> Iterator[int]:
    """open_readonly(path) for a source's open(): the fd is closed if the body raises."""
    fd = open_readonly(path)
    try:
        yield fd
    except BaseException:
        os.close(fd)
        raise


def describe_errno(err: int | None) -> str:
    """A short human reason for an errno from opening or reading a memory source."""
    if err in (errno.EPERM, errno.EACCES):
        return f"{os.strerror(err)} (run as root)"
    if err == errno.ENOENT:
        return "missing"
    return os.strerror(err) if err else "unknown error"


def file_size(fd: int) -> int:
    """Size of a regular file or block device open at `fd` (0 for character devices)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return 0


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """Up to `length` bytes at `offset`, fewer only at the end of the file.

    os.pread may return less than asked where no error happened (9p, FUSE, NFS return a
    few hundred KiB or less per read); this reads on until the length or the end of file.
    """
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)  # EINTR is retried by os.pread
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pread_exact(fd: int, offset: int, length: int, path: str, what: str) -> bytes:
    """Read exactly `length` bytes of metadata at `offset`, or raise SourceError naming both."""
    if offset < 0 or length < 0 or offset + length > (1 << 63) - 1:
        raise SourceError(f"{path}: {what} at offset {offset:#x} (length {length:#x}) lies "
                          f"beyond any file", offset=offset)
    size = file_size(fd)  # a hostile length must not cost its size in memory
    if size and offset + length > size:
        raise SourceError(f"{path}: truncated {what} at offset {offset:#x} (needs {length:#x} "
                          f"bytes, the file ends at {size:#x})", offset=offset)
    try:
        data = pread_full(fd, length, offset)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read {what} at offset {offset:#x}: "
                          f"{describe_errno(exc.errno)}", exc.errno, offset=offset) from None
    if len(data) != length:
        raise SourceError(f"{path}: truncated {what} at offset {offset:#x}", offset=offset)
    return data
