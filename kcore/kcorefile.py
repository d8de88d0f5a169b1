"""KcoreFile: /proc/kcore as a read-only, seekable Python file, with read_kcore()'s semantics."""

from __future__ import annotations

import bisect
import ctypes
import errno
import io
import os
import threading
from typing import Any

from kcore import _native
from kcore._native import ffi
from kcore.elfcore import KcoreHeader, build_header
from kcore.engine import BLOCK
from kcore.kclist import KcoreType
from kcore.vmem import PageWalker, walker_for, zero_fill

_kc_read_fd = _native.lib.kc_read_fd
_FAST_MAX = 64 << 20  # one C call at most this long, so Ctrl-C is seen between calls
_SMALL = 64 << 10  # pread() up to this size goes through a per-thread scratch buffer
LOFF_MAX = (1 << 63) - 1  # a read's offset + length may not pass the largest loff_t


def _bytes_factory() -> Any:
    """PyBytes_FromStringAndSize (NULL: uninitialised contents); bytes(n), zeroed, elsewhere."""
    try:
        fn = ctypes.pythonapi.PyBytes_FromStringAndSize
    except AttributeError:  # pragma: no cover - not CPython
        return lambda _null, n: bytes(n)
    fn.restype = ctypes.py_object
    fn.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    return fn


_new_bytes = _bytes_factory()
_bisect_right = bisect.bisect_right
# How each kclist type's bytes are found (read_kcore()'s switch on m->type): RAM by __pa,
# TEXT by __pa_symbol (without page tables), WALK through the page tables like
# copy_from_kernel_nofault() (text, vmemmap), VREAD like vread() (vmalloc and modules:
# only System RAM pages, so VM_IOREMAP areas, which map none, read as holes).
_RAM, _TEXT, _WALK, _VREAD, _ZERO = 0, 1, 2, 3, 4
# Sources whose memory changes while we read: page-table pages are not cached across reads.
_LIVE_KINDS = ("devmem", "pid", "kcore")


class KcoreFile(io.RawIOBase):
    """The bytes /proc/kcore would return, at every offset, for a discovered system.

    Like Linux >= 4.19 (layout "modern" on x86-64) there is no EOF at size(): past it reads
    give zeros, and from data_offset on the data repeats every 2^47 (2^56) bytes; read(-1)
    stops at size(). The "2.6" amap ends at size(), as the seed did. Holes, unmapped
    pages and vmalloc pages outside System RAM (ioremap) read as zeros.
    """

    def __init__(self, system: Any, *, flavour: str | None = None,
                 owns_system: bool = False) -> None:
        super().__init__()
        self.system = system
        self.source = system.source
        self.kclist = system.kclist
        self._owns = owns_system
        # open_kcore(): rebuild the RAM entries if memory hotplug flagged them.
        self.kclist.refresh()
        self.header: KcoreHeader = build_header(system, flavour or system.flavour)
        self.name = f"kcore:{self.source.spec}"
        self._size = self.header.file_size
        amap = system.addrmap
        if (flavour or system.flavour) == "modern" and amap.arch == "x86_64":
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
        self._direct = getattr(self.source, "kind", "") == "kcore"
        self._live = getattr(self.source, "kind", "") in _LIVE_KINDS
        self.walker: PageWalker | None = walker_for(system)
        self._tls = threading.local()
        self._build_map()
        self._pos = 0
        self._pos_lock = threading.Lock()
        self._pread = self.pread = self._make_pread()  # type: ignore[method-assign]

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
        starts, ends, hows, bases = [], [], [], []
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
        if not self._direct and hasattr(src, "extents"):
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
        self._fd = getattr(src, "fd", -1)
        # Large reads of a process's memory go through engine.readinto_range, which uses
        # process_vm_readv there; the direct kc_read_fd call is for everything else.
        self._fast_max = _SMALL if getattr(src, "kind", "") == "pid" else _FAST_MAX
        self._fstarts = [f[0] for f in fast]
        self._fends = [f[1] for f in fast]
        self._fdeltas = [f[2] for f in fast]

    # ---- positional reads (thread-safe: no shared position) --------------------------------

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

    def pread(self, length: int, offset: int) -> bytes:
        """The bytes at file offset `offset`, up to `length` of them (b"" at EOF)."""
        return self._pread(length, offset)  # replaced per instance by _make_pread()

    def _make_pread(self) -> Any:
        """Build pread() as a closure over this file's tables (the 4 KiB random-read path)."""
        size, path = self._end, self.source.path
        # Every read holds the source's fd (borrow_fd): a close() meanwhile waits for it.
        borrow, give_back = self.source.borrow_fd, self.source.return_fd
        fstarts, fends, fdeltas = self._fstarts, self._fends, self._fdeltas
        fast_max = self._fast_max
        tls, new_scratch, fill = self._tls, self._new_scratch, self._fill
        bisect_right, kc_read_fd, check = bisect.bisect_right, _kc_read_fd, _native.check

        def pread(length: int, offset: int) -> bytes:
            """The bytes at file offset `offset`, up to `length` of them (b"" at EOF)."""
            n = size - offset
            if length < n:
                n = length
            if n <= 0 or offset < 0:
                if offset < 0 or length < 0:
                    raise ValueError(f"negative offset or length: {offset}, {length}")
                return b""
            # Fast path: inside one RAM segment and one source extent: one C engine call
            # (unreadable pages still become zeros), and a single copy of the data.
            i = bisect_right(fstarts, offset) - 1
            if i >= 0 and offset + n <= fends[i] and n <= fast_max:
                try:
                    view, cbuf, st = tls.scratch
                except AttributeError:
                    view, cbuf, st = new_scratch()
                fd = borrow()
                try:
                    if n <= _SMALL:  # this thread's scratch buffer, then one small copy
                        rc = kc_read_fd(fd, offset + fdeltas[i], cbuf, n, BLOCK, 4096, 0, st)
                    else:
                        # Large reads fill a new, uninitialised bytes object in place before
                        # anything else can see it: PyBytes_FromStringAndSize(NULL, n) + read().
                        out = _new_bytes(None, n)
                        with ffi.from_buffer(out) as ptr:
                            rc = kc_read_fd(fd, offset + fdeltas[i], ptr, n, BLOCK, 4096, 0, st)
                finally:
                    give_back(fd)
                if n <= _SMALL:
                    if rc:
                        check(rc, st, path=path)
                    return view[:n].tobytes()
                if rc:
                    check(rc, st, path=path)
                return out
            buf = bytearray(n)
            fill(offset, memoryview(buf))
            return bytes(buf)

        lock, stsize, end_ = self._pos_lock, self._size, size

        def read(size: int | None = -1) -> bytes:
            """Read up to size bytes at the current position (to st_size if size < 0)."""
            if self.closed:
                raise ValueError("read of a closed KcoreFile")
            with lock:
                pos = self._pos
                if size is None or size < 0:  # to st_size: the kernel's kcore has no EOF
                    n = _whole(stsize - pos)
                else:
                    n = end_ - pos
                    if size < n:
                        n = size
                if n <= 0:
                    return b""
                self._pos = pos + n
            return pread(n, pos)

        self.read = read  # type: ignore[method-assign]
        slow_seek = self._seek

        def seek(offset: int, whence: int = 0) -> int:
            """Move the position; return it."""
            if whence == 0 and offset >= 0:  # SEEK_SET: a plain store, atomic, no lock
                self._pos = offset
                return offset
            return slow_seek(offset, whence)

        self.seek = seek  # type: ignore[method-assign]
        return pread

    def _read_held(self, offset: int, ptr: Any, n: int, st: Any) -> int:
        """kc_read_fd through an fd the source lends to this read (close() waits for it)."""
        fd = self.source.borrow_fd()
        try:
            return _kc_read_fd(fd, offset, ptr, n, BLOCK, 4096, 0, st)
        finally:
            self.source.return_fd(fd)

    def _new_scratch(self) -> tuple[memoryview, Any, Any]:
        """Give this thread a reusable small-read buffer, its cffi pointer and C stats."""
        buf = bytearray(_SMALL)
        scratch = (memoryview(buf), ffi.from_buffer(buf, require_writable=True),
                   _native.new_stats())
        self._tls.scratch = scratch
        return scratch

    def _fill(self, offset: int, view: memoryview) -> None:
        """read_kcore(): header, then each segment's bytes, zeros where nothing is."""
        n = len(view)
        i = bisect.bisect_right(self._fstarts, offset) - 1
        if i >= 0 and offset + n <= self._fends[i] and n <= self._fast_max:  # see pread
            st = _native.new_stats()
            with ffi.from_buffer(view, require_writable=True) as cbuf:
                rc = self._read_held(offset + self._fdeltas[i], cbuf, n, st)
            if rc:
                _native.check(rc, st, path=self.source.path)
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
        if self._direct:  # a real kcore: its data is at the same offsets
            self.source.readinto_kcore(cur, view)
            return
        if self._live and self.walker is not None:
            self.walker.invalidate()
        starts, ends = self._starts, self._ends
        nseg = len(starts)
        i = bisect.bisect_right(starts, cur) - 1  # the last segment starting at or before cur
        while cur < end:
            if i >= 0 and cur < ends[i]:
                stop = min(end, ends[i])
                part = view[cur - offset:stop - offset]
                delta = cur - starts[i]
                how = self._hows[i]
                if how == _WALK:
                    self.walker.readinto(self._bases[i] + delta, part)
                elif how == _VREAD:
                    self.walker.readinto(self._bases[i] + delta, part, allowed=self._ram)
                elif how == _ZERO:
                    zero_fill(part)
                else:
                    self.source.readinto_phys(self._bases[i] + delta, part)
            else:  # no kclist entry here: zeros up to the next segment
                stop = min(end, starts[i + 1] if i + 1 < nseg else end)
                zero_fill(view[cur - offset:stop - offset])
            cur = stop
            while i + 1 < nseg and starts[i + 1] <= cur:
                i += 1

    # ---- the io.RawIOBase face ----------------------------------------------------------------

    def readinto(self, buf: Any) -> int:
        """Read into buf at the current position; advance it."""
        if self.closed:
            raise ValueError("readinto of a closed KcoreFile")
        view = memoryview(buf).cast("B")
        with self._pos_lock:
            pos = self._pos
            n = max(0, min(len(view), self._end - pos))
            self._pos = pos + n
        if n:
            self._fill(pos, view[:n] if n < len(view) else view)
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Read up to size bytes at the current position (all to EOF if size < 0)."""
        if self.closed:
            raise ValueError("read of a closed KcoreFile")
        with self._pos_lock:
            pos = self._pos
            if size is None or size < 0:  # to st_size: the kernel's kcore has no EOF
                n = _whole(self._size - pos)
            else:
                n = min(size, self._end - pos)
            if n <= 0:
                return b""
            self._pos = pos + n
        return self._pread(n, pos)

    def readall(self) -> bytes:
        """Read up to size() (st_size; the file is as large as the kernel's address space)."""
        return self.read(-1)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position; return it."""
        return self._seek(offset, whence)  # replaced per instance by _make_pread()

    def _seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """seek() under the position lock."""
        if self.closed:
            raise ValueError("seek of a closed KcoreFile")
        with self._pos_lock:
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
            # The fast reader holds the source's fd number, which the OS may hand out again.
            self._pread = self.pread = _closed_pread  # type: ignore[method-assign]
            self.seek = self._seek  # type: ignore[method-assign]
            self._fd = -1
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


def _closed_pread(length: int, offset: int) -> bytes:
    """pread() of a closed KcoreFile."""
    raise ValueError("read of a closed KcoreFile")


def open_kcore(root: str = "/", source: Any = "auto", flavour: str = "modern") -> KcoreFile:
    """Discover the system at root with source, and open its /proc/kcore as a file."""
    from kcore.discover import discover

    system = discover(root, source, flavour=flavour)
    try:
        return KcoreFile(system, flavour=flavour, owns_system=isinstance(source, str))
    except BaseException:
        if isinstance(source, str):
            system.close()
        raise
