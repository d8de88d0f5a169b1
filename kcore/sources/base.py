"""The MemorySource interface: physical memory in a file, as (paddr, length, offset) extents."""

from __future__ import annotations

import bisect
import os
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

from kcore.addrmap import PAGE_SIZE
from kcore.engine import CopyStats, readinto_range
from kcore.errors import SourceError
from kcore.sources.checks import Region, Result
from kcore.sources.files import open_readonly
from kcore.vmem import zero_fill

WritableBuffer = Any  # bytearray, memoryview, mmap...: anything with a writable buffer
# Largest physical address any x86-64 kernel can use (MAX_PHYSMEM_BITS = 52).
MAX_PHYS = 1 << 52


class Extent(NamedTuple):
    """Physical memory [paddr, paddr + length) held at file offset `offset`."""

    paddr: int
    length: int
    offset: int


@dataclass(frozen=True)
class Probe:
    """What detection looks at: the path, its open fd, its stat, its first bytes."""

    path: str
    fd: int
    st: os.stat_result
    head: bytes  # the first PROBE_BYTES bytes (none for a character device: not read)


PROBE_BYTES = 64


def check_extents(extents: list[Extent], path: str, error: type[SourceError]) -> list[Extent]:
    """Sort extents by paddr; raise `error` if any overlap or lie beyond MAX_PHYS."""
    out = sorted(e for e in extents if e.length > 0)
    for prev, cur in zip(out, out[1:], strict=False):
        if cur.paddr < prev.paddr + prev.length:
            raise error(f"{path}: overlapping memory ranges at physical {prev.paddr:#x} and "
                        f"{cur.paddr:#x} (file offset {cur.offset:#x})", offset=cur.offset)
    for e in out:
        if e.paddr + e.length > MAX_PHYS:
            raise error(f"{path}: physical range {e.paddr:#x}+{e.length:#x} at file offset "
                        f"{e.offset:#x} is beyond the 52-bit physical address space",
                        offset=e.offset)
    return out


class MemorySource:
    """Physical memory in a file: reads at physical addresses, zeros outside the extents.

    A subclass is a kind of source: `kind` is its SPEC prefix (KIND:PATH), `open()` opens
    one, and `detect()` says whether a file given as a bare PATH is one (see kcore.sources).
    """

    kind = "base"
    signatures: tuple[str, ...] = ()  # the magics detect() knows, named for messages
    # Whether two threads may read self.fd at once. Where not (a live /proc/kcore: 6.1's
    # read_kcore() copies every page through one bounce page per open file, so concurrent
    # reads of one fd can hand a thread another thread's page), a read borrows an fd no other
    # read holds (more are opened on the same path as needed, and reused), and each slot of
    # the engine's threaded calls has one of its own.
    concurrent_reads_safe = True

    def __init__(self, spec: str, path: str, fd: int, extents: list[Extent],
                 vmcoreinfo: bytes | None = None) -> None:
        self.spec = spec
        self.path = path
        self.fd = fd
        self.vmcoreinfo = vmcoreinfo
        self._set_extents(extents)
        # Reads in flight hold their fd (borrow_fd/return_fd); close() waits for them, so a
        # read never goes on with a descriptor number that a new open may have reused.
        self._fd_lock = threading.Condition()
        self._busy = 0
        self._idle_fds: list[int] = [fd]  # fds no read holds now (unsafe sources)
        self._slot_fds: dict[int, int] = {}
        self._more_fds: list[int] = []  # every fd opened besides self.fd

    @classmethod
    def open(cls, path: str, spec: str | None = None, root: str = "/") -> MemorySource:
        """Open a source of this kind read-only: path is what follows KIND: in the spec."""
        raise NotImplementedError

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        """Whether a bare PATH is a source of this kind (its magic); False: never detected."""
        return False

    @classmethod
    def check(cls, fd: int, path: str, res: Result,
              manifest: dict[str, Any] | None) -> list[Region] | None:
        """`kcore verify`'s checks of a dump file of this kind (kcore.sources.checks): fill res
        and return the regions of memory the file holds, or raise LayoutError where its
        structure breaks. None: verify knows no structure of this kind to check."""
        return None

    def borrow_fd(self) -> int:
        """An fd for one read, held until return_fd(): close() waits for it.

        On a source whose fd two reads may not share, no other read uses it meanwhile.
        Raises SourceError once the source is closed.
        """
        with self._fd_lock:
            if self.fd < 0:
                raise SourceError(f"{self.path}: closed")
            self._busy += 1
            if self.concurrent_reads_safe:
                return self.fd
            if self._idle_fds:
                return self._idle_fds.pop()
        try:
            return self._another_fd()
        except BaseException:
            self.return_fd(-1)
            raise

    def return_fd(self, fd: int) -> None:
        """Give back an fd from borrow_fd()."""
        with self._fd_lock:
            if not self.concurrent_reads_safe and fd >= 0 and (
                    fd == self.fd or fd in self._more_fds):  # not being closed
                self._idle_fds.append(fd)
            self._busy -= 1
            if self._busy == 0:
                self._fd_lock.notify_all()

    def slot_fd(self, slot: int) -> int:
        """The fd for slot `slot` of a threaded engine call (one job a slot at a time)."""
        if self.concurrent_reads_safe:
            return self.fd
        with self._fd_lock:
            fd = self._slot_fds.get(slot)
        if fd is None:
            fd = self._another_fd()
            with self._fd_lock:
                self._slot_fds[slot] = fd
        return fd

    def _another_fd(self) -> int:
        """One more read-only fd on the source's path, closed with the source."""
        fd = open_readonly(self.path)
        try:
            first, again = os.fstat(self.fd), os.fstat(fd)
            why = None if (first.st_dev, first.st_ino) == (again.st_dev, again.st_ino) else \
                "replaced by another file while being read"
        except OSError:
            why = "closed"
        if why is not None:
            os.close(fd)
            raise SourceError(f"{self.path}: {why}")
        with self._fd_lock:
            if self.fd < 0:  # closed while this one was being opened
                os.close(fd)
                raise SourceError(f"{self.path}: closed")
            self._more_fds.append(fd)
        return fd

    def _read_at(self, offset: int, buf: WritableBuffer, strict: bool) -> CopyStats:
        """readinto_range at a file offset, holding a borrowed fd (see borrow_fd)."""
        fd = self.borrow_fd()
        try:
            return readinto_range(fd, offset, buf, strict=strict, path=self.path)
        finally:
            self.return_fd(fd)

    def _set_extents(self, extents: list[Extent]) -> None:
        self.extents = list(extents)
        self._starts = [e.paddr for e in self.extents]
        self._ends = [e.paddr + e.length for e in self.extents]
        self._offsets = [e.offset for e in self.extents]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind}:{self.path} extents={len(self.extents)}>"

    def __enter__(self) -> MemorySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file descriptors once the reads in flight are done (idempotent)."""
        with self._fd_lock:
            fd, self.fd = self.fd, -1  # new reads fail from here on
            while self._busy:
                self._fd_lock.wait()
            more, self._more_fds, self._slot_fds, self._idle_fds = self._more_fds, [], {}, []
        for extra in more:
            os.close(extra)
        if fd >= 0:
            os.close(fd)

    def contains(self, paddr: int, length: int = 1) -> bool:
        """Whether [paddr, paddr + length) lies entirely inside one extent."""
        i = bisect.bisect_right(self._starts, paddr) - 1
        return i >= 0 and paddr + length <= self._ends[i]

    def read_phys(self, paddr: int, length: int, *,
                  strict: bool = False) -> tuple[bytes, CopyStats]:
        """Read `length` bytes at physical `paddr`; zeros (counted) where nothing is held."""
        buf = bytearray(length)
        stats = self.readinto_phys(paddr, buf, strict=strict)
        return bytes(buf), stats

    def readinto_phys(self, paddr: int, buf: WritableBuffer, *,
                      strict: bool = False) -> CopyStats:
        """Fill `buf` from physical `paddr`; zeros (counted) where nothing is held."""
        n = len(buf)
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i >= 0 and paddr + n <= self._ends[i]:  # fast path: one extent
            return self._read_at(self._offsets[i] + paddr - self._starts[i], buf, strict)
        return self._readinto_slow(paddr, memoryview(buf).cast("B"), i, strict)

    def _readinto_slow(self, paddr: int, view: memoryview, i: int, strict: bool) -> CopyStats:
        """readinto_phys across extent boundaries and holes."""
        n = len(view)
        end = paddr + n
        stats = CopyStats()
        pos = paddr
        if i < 0 or pos >= self._ends[i]:
            i += 1
        while pos < end:
            if i >= len(self._starts) or self._starts[i] >= end:
                self._hole(view, pos - paddr, end - pos, pos, stats, strict)
                break
            start = self._starts[i]
            if pos < start:
                self._hole(view, pos - paddr, start - pos, pos, stats, strict)
                pos = start
            stop = min(end, self._ends[i])
            stats += self._read_at(self._offsets[i] + pos - start,
                                   view[pos - paddr:stop - paddr], strict)
            pos = stop
            i += 1
        return stats

    def _hole(self, view: memoryview, at: int, length: int, paddr: int, stats: CopyStats,
              strict: bool) -> None:
        """Zero-fill a part of the buffer that no extent covers, and count its pages."""
        if strict:
            from kcore.errors import FaultError

            raise FaultError(f"{self.path}: physical address {paddr:#x} is not in this source",
                             address=paddr)
        zero_fill(view[at:at + length])
        first = paddr // PAGE_SIZE
        last = (paddr + length - 1) // PAGE_SIZE
        stats.pages_zero_filled += last - first + 1
