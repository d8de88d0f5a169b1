"""KcoreFile: /proc/kcore as a read-only, seekable Python file, with read_kcore()'s semantics."""

from __future__ import annotations

import bisect
import errno
import io
import os
import weakref
from typing import TYPE_CHECKING, Any

from kcore.arch import walker_for
from kcore.elfcore import KcoreHeader, build_header
from kcore.engine import readinto_range
from kcore.kclist import KcoreType
from kcore.sources.kcore import KcoreSource
from kcore.vmem import PageWalker, zero_fill

if TYPE_CHECKING:
    from kcore.system import System

FAST_MAX = 64 << 20  # one read() call at most this long, so Ctrl-C is seen between calls
PID_FAST_MAX = 64 << 10  # larger reads of a process go through process_vm_readv (engine)
LOFF_MAX = (1 << 63) - 1  # a read's offset + length may not pass the largest loff_t
_bisect_right = bisect.bisect_right
_pread = os.pread  # the fast path's one system call (a module name: tests hold it)
# How each kclist type's bytes are found (read_kcore()'s switch on m->type): RAM by __pa,
# TEXT by __pa_symbol (without page tables), WALK through the page tables like
# copy_from_kernel_nofault() (text, vmemmap), VREAD like vread() (vmalloc and modules:
# only System RAM pages, so VM_IOREMAP areas, which map none, read as holes).
_RAM, _TEXT, _WALK, _VREAD, _ZERO = 0, 1, 2, 3, 4
# Sources whose memory changes while we read: page-table pages are not cached across reads.
_LIVE_KINDS = ("devmem", "pid", "kcore")
_devnull = -1  # opened once: a closed file's fd number is pointed at it (see close())


class KcoreFile(io.RawIOBase):
    """The bytes /proc/kcore would return, at every offset, for a discovered system.

    Like Linux >= 4.19 (layout "modern" on x86-64) there is no EOF at size(): past it reads
    give zeros, and from data_offset on the data repeats every 2^47 (2^56) bytes; read(-1)
    stops at size(). The "2.6" amap ends at size(), as the seed did. Holes, unmapped
    pages and vmalloc pages outside System RAM (ioremap) read as zeros.
    """

    # Slots for what each read touches: io.IOBase's instance dict costs ~4x a slot a lookup.
    __slots__ = ("_pos", "_fd", "_end", "_size", "_fstarts", "_fends", "_fdeltas", "_fast_max")

    def __init__(self, system: System, *, layout: str | None = None,
                 owns_system: bool = False) -> None:
        super().__init__()
        self.system = system
        self.source = system.source
        self.kclist = system.kclist
        self._owns = owns_system
        # open_kcore(): rebuild the RAM entries if memory hotplug flagged them.
        self.kclist.refresh()
        self.header: KcoreHeader = build_header(system, layout or system.layout)
        self.name = f"kcore:{self.source.spec}"
        self._size = self.header.file_size
        amap = system.addrmap
        if (layout or system.layout) == "modern" and amap.arch == "x86_64":
            # No EOF since 4.19: read_kcore() maps any offset through kc_offset_to_vaddr()
            # = o | ~__VIRTUAL_MASK, so past data_offset the bytes repeat every 2^47 (2^56)
            # bytes, up to the largest loff_t a read may reach.
            self._alias_mask: int | None = (1 << amap.virtual_mask_shift) - 1
            self._end = LOFF_MAX
        else:  # the seed: "if (buflen == 0 || *fpos >= size) return 0"
            self._alias_mask = None
            self._end = self._size
        self._head = self.header.data
        self._data_offset = self.header.data_offset
        src = self.source
        self._kcore = src if isinstance(src, KcoreSource) else None  # read at the same offsets
        self._direct = self._kcore is not None
        self._live = self.source.kind in _LIVE_KINDS
        self.walker: PageWalker | None = walker_for(system)
        self._fd = self._own_fd()
        self._build_map()
        self._pos = 0

    def _own_fd(self) -> int:
        """This file's own dup of the source's fd for the fast path, or -1 (none).

        Only for sources two reads may share (not /proc/kcore or /dev/mem, whose reads
        borrow an fd each). close() points it at /dev/null, and it is closed only once no
        read can hold it, so a read racing close() never gets another file's bytes.
        """
        src = self.source
        if self._direct or not src.concurrent_reads_safe:
            return -1
        fd = src.borrow_fd()
        try:
            own = os.dup(fd)
        finally:
            src.return_fd(fd)
        weakref.finalize(self, os.close, own)
        return own

    def _build_map(self) -> None:
        """Sort the PT_LOADs by file offset: (start, end, how, base) with base a paddr or vaddr."""
        segs = []
        for entry, p_offset in self.header.loads:
            if entry.size <= 0:
                continue
            if entry.type == KcoreType.RAM:
                how, base = _RAM, entry.paddr
            elif entry.type == KcoreType.TEXT and self.walker is None:
                how, base = _TEXT, entry.paddr  # __pa_symbol(addr)
            elif self.walker is None:  # no page tables known: nothing readable there
                how, base = _ZERO, entry.vaddr
            elif entry.type == KcoreType.VMALLOC:
                how, base = _VREAD, entry.vaddr
            else:  # vmemmap, and text when page tables are known
                how, base = _WALK, entry.vaddr
            segs.append((p_offset, p_offset + entry.size, how, base))
        ram = sorted((e.paddr, e.paddr + e.size) for e, _ in self.header.loads
                     if e.type == KcoreType.RAM and e.size > 0)
        self._ram = ([lo for lo, _ in ram], [hi for _, hi in ram])
        segs.sort()
        starts: list[int] = []
        ends: list[int] = []
        hows: list[int] = []
        bases: list[int] = []
        for start, end, how, base in segs:
            if ends and start < ends[-1]:  # overlapping offsets: the earlier segment wins
                if end <= ends[-1]:
                    continue
                base += ends[-1] - start
                start = ends[-1]
            starts.append(start)
            ends.append(end)
            hows.append(how)
            bases.append(base)
        self._starts, self._ends, self._hows, self._bases = starts, ends, hows, bases
        # The fast table: kcore offsets whose bytes sit at (offset + delta) in the source
        # file, where a RAM segment meets one source extent.
        fast = []
        src = self.source
        if self._fd >= 0:
            for start, end, how, base in zip(starts, ends, hows, bases, strict=True):
                if how != _RAM:
                    continue
                for ext in src.extents:
                    lo = max(base, ext.paddr)
                    hi = min(base + end - start, ext.paddr + ext.length)
                    if lo < hi:
                        k = start + lo - base
                        fast.append((k, k + hi - lo, ext.offset + lo - ext.paddr - k))
        fast.sort()
        self._fast_max = PID_FAST_MAX if src.kind == "pid" else FAST_MAX
        self._fstarts = [f[0] for f in fast]
        self._fends = [f[1] for f in fast]
        self._fdeltas = [f[2] for f in fast]

    # ---- positional reads (thread-safe: no shared position) --------------------------------

    def _source_offset(self, offset: int, n: int) -> int:
        """Where the source file holds kcore's [offset, offset+n), or -1.

        The fast path: a range inside one RAM segment and one source extent is one read
        of the source file, through this file's own fd.
        """
        i = _bisect_right(self._fstarts, offset) - 1
        if i >= 0 and 0 < n <= self._fast_max and offset + n <= self._fends[i]:
            return offset + self._fdeltas[i]
        return -1

    def pread(self, length: int, offset: int) -> bytes:
        """The bytes at file offset `offset`, up to `length` of them (b"" at EOF)."""
        i = _bisect_right(self._fstarts, offset) - 1  # _source_offset(), inlined
        if i >= 0 and 0 < length <= self._fast_max and offset + length <= self._fends[i]:
            try:
                data = _pread(self._fd, length, offset + self._fdeltas[i])
            except OSError:  # an unreadable page: the general path zero-fills it
                data = b""
            if len(data) == length:
                return data
        return self._pread_slow(length, offset)

    def _pread_slow(self, length: int, offset: int) -> bytes:
        """pread() outside the fast path: checks, then read_kcore()'s pieces into a buffer."""
        if self.closed:
            raise ValueError("read of a closed KcoreFile")
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: {offset}, {length}")
        n = min(length, self._end - offset)
        if n <= 0:
            return b""
        buf = bytearray(n)
        self._fill(offset, memoryview(buf))
        return bytes(buf)

    def preadinto(self, buf: Any, offset: int) -> int:
        """Fill buf with the bytes at file offset `offset`; return the count (0 at EOF)."""
        if self.closed:
            raise ValueError("read of a closed KcoreFile")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        view = memoryview(buf).cast("B")
        n = min(len(view), self._end - offset)
        if n <= 0:
            return 0
        self._fill(offset, view[:n] if n < len(view) else view)
        return n

    def _fill(self, offset: int, view: memoryview) -> None:
        """read_kcore(): header, then each segment's bytes, zeros where nothing is."""
        n = len(view)
        at = self._source_offset(offset, n)
        if at >= 0:  # see pread(); unreadable pages become zeros (counted by the engine)
            readinto_range(self._fd, at, view, path=self.source.path)
            return
        pos = 0
        if offset < self._data_offset:
            pos = min(n, self._data_offset - offset)
            view[:pos] = self._head[offset:offset + pos]
            if pos == n:
                return
        cur = offset + pos
        end = offset + n
        mask = self._alias_mask
        if mask is None or end - self._data_offset <= mask + 1:
            self._fill_data(cur, view[pos:])
            return
        base = self._data_offset
        while cur < end:  # kc_offset_to_vaddr(): one period of the alias at a time
            rel = (cur - base) & mask
            stop = min(end, cur + mask + 1 - rel)
            self._fill_data(base + rel, view[cur - offset:stop - offset])
            cur = stop

    def _fill_data(self, offset: int, view: memoryview) -> None:
        """The data part of read_kcore() for offsets in [data_offset, data_offset + 2^47)."""
        cur = offset
        end = offset + len(view)
        if self._kcore is not None:  # a real kcore: its data is at the same offsets
            self._kcore.readinto_kcore(cur, view)
            return
        walker = self.walker
        if self._live and walker is not None:
            walker.invalidate()
        starts, ends = self._starts, self._ends
        nseg = len(starts)
        i = bisect.bisect_right(starts, cur) - 1  # the last segment starting at or before cur
        while cur < end:
            if i >= 0 and cur < ends[i]:
                stop = min(end, ends[i])
                part = view[cur - offset:stop - offset]
                delta = cur - starts[i]
                how = self._hows[i]
                if how == _RAM or how == _TEXT:
                    self.source.readinto_phys(self._bases[i] + delta, part)
                elif walker is None or how == _ZERO:
                    zero_fill(part)
                elif how == _WALK:
                    walker.readinto(self._bases[i] + delta, part)
                else:  # _VREAD
                    walker.readinto(self._bases[i] + delta, part, allowed=self._ram)
            else:  # no kclist entry here: zeros up to the next segment
                stop = min(end, starts[i + 1] if i + 1 < nseg else end)
                zero_fill(view[cur - offset:stop - offset])
            cur = stop
            while i + 1 < nseg and starts[i + 1] <= cur:
                i += 1

    # ---- the io.RawIOBase face ----------------------------------------------------------------

    def readinto(self, buf: Any) -> int:
        """Read into buf at the current position; advance it."""
        n = self.preadinto(buf, self._pos)
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Read up to size bytes at the current position (to st_size if size < 0).

        Like a raw file's, the position is not locked: threads sharing one KcoreFile use
        pread(), or a lock of their own around seek() and read().
        """
        pos = self._pos
        if size is None or size < 0:  # to st_size: the kernel's kcore has no EOF
            if self.closed:
                raise ValueError("read of a closed KcoreFile")
            size = _whole(max(0, self._size - pos))
        data = self.pread(size, pos)
        self._pos = pos + len(data)
        return data

    def readall(self) -> bytes:
        """Read up to size() (st_size; the file is as large as the kernel's address space)."""
        return self.read(-1)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position; return it."""
        if whence == os.SEEK_SET and offset >= 0 and self._fd != -2:
            self._pos = offset
            return offset
        if self.closed:
            raise ValueError("seek of a closed KcoreFile")
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def tell(self) -> int:
        """The current position."""
        return self._pos

    def size(self) -> int:
        """The file size: data_offset + the end of the highest segment, like st_size."""
        return self._size

    def readable(self) -> bool:
        """True: KcoreFile is for reading."""
        return True

    def seekable(self) -> bool:
        """True: any offset can be read."""
        return True

    def writable(self) -> bool:
        """False: kcore is read-only."""
        return False

    def close(self) -> None:
        """Close the file (and the memory source, when kcore.open() opened it)."""
        if not self.closed:
            self._fstarts, self._fends, self._fdeltas = [], [], []  # no fast path
            fd, self._fd = self._fd, -2  # -2: closed (seek() checks it)
            if fd >= 0:
                # A read may still hold this fd number: point it at /dev/null (it reads
                # b"" and fails cleanly) instead of freeing a number another open would
                # reuse; the finalizer closes it once no read can hold it.
                os.dup2(_null_fd(), fd)
            if self._owns:
                self.system.close()
        super().close()


def _whole(n: int) -> int:
    """n, the length of a read to the end, when this machine's memory can hold it."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - not Linux
        ram = 1 << 40
    if n > ram:
        raise OSError(errno.EFBIG, f"read() to the end would return {n:#x} bytes, more than "
                      f"this machine's memory (the file is as large as the kernel's address "
                      f"space): give read() a size, or use pread()")
    return n


def _null_fd() -> int:
    """An fd on /dev/null, opened once."""
    global _devnull
    if _devnull < 0:
        _devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull


def open_kcore(root: str = "/", source: Any = "auto", layout: str = "modern") -> KcoreFile:
    """Discover the system at root with source, and open its /proc/kcore as a file."""
    from kcore.discover import discover

    system = discover(root, source, layout=layout)
    try:
        return KcoreFile(system, layout=layout, owns_system=isinstance(source, str))
    except BaseException:
        if isinstance(source, str):
            system.close()
        raise
