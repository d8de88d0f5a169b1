"""KcoreFile: /proc/kcore as a read-only, seekable Python file, with read_kcore()'s semantics."""

from __future__ import annotations

import bisect
import io
import os
import threading
from typing import Any

from kcore.elfcore import KcoreHeader, build_header
from kcore.kclist import KcoreType
from kcore.vmem import PageWalker, walker_for

# read() fills a per-thread scratch buffer of up to this size, then copies it out once:
# one allocation per call, like os.pread (a fresh bytearray would be allocated and zeroed).
SCRATCH_MAX = 8 << 20
_ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_CHUNK))
# How each kclist type's bytes are found (read_kcore()'s switch on m->type).
_RAM, _TEXT, _WALK = 0, 1, 2
# Sources whose memory changes while we read: page-table pages are not cached across reads.
_LIVE_KINDS = ("devmem", "pid", "kcore")


def zero_fill(view: memoryview) -> None:
    """Set every byte of a writable memoryview to zero without a large allocation."""
    n = len(view)
    for at in range(0, n, _ZERO_CHUNK):
        k = min(_ZERO_CHUNK, n - at)
        view[at:at + k] = _ZEROS[:k]


class KcoreFile(io.RawIOBase):
    """The bytes /proc/kcore would return, at every offset, for a discovered system."""

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
        self._head = self.header.data
        self._data_offset = self.header.data_offset
        self._direct = getattr(self.source, "kind", "") == "kcore"
        self._live = getattr(self.source, "kind", "") in _LIVE_KINDS
        self.walker: PageWalker | None = walker_for(system)
        self._build_map()
        self._pos = 0
        self._pos_lock = threading.Lock()
        self._tls = threading.local()

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
            else:
                # vmalloc, modules, vmemmap (and text, like copy_from_kernel_nofault()):
                # through the page tables, unmapped pages read as zeros.
                how, base = _WALK, entry.vaddr
            segs.append((p_offset, p_offset + entry.size, how, base))
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

    # ---- positional reads (thread-safe: no shared position) --------------------------------

    def preadinto(self, buf: Any, offset: int) -> int:
        """Fill buf with the bytes at file offset `offset`; return the count (0 at EOF)."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        view = memoryview(buf).cast("B")
        n = min(len(view), self._size - offset)
        if n <= 0:
            return 0
        self._fill(offset, view[:n] if n < len(view) else view)
        return n

    def pread(self, length: int, offset: int) -> bytes:
        """The bytes at file offset `offset`, up to `length` of them (b"" at EOF)."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: {offset}, {length}")
        n = min(length, self._size - offset)
        if n <= 0:
            return b""
        if n > SCRATCH_MAX:
            buf = bytearray(n)
            self._fill(offset, memoryview(buf))
            return bytes(buf)
        view = self._scratch(n)
        self._fill(offset, view)
        return bytes(view)

    def _scratch(self, n: int) -> memoryview:
        """This thread's reusable buffer, as a view of n bytes."""
        tls = self._tls
        view = getattr(tls, "view", None)
        if view is None or len(view) < n:
            view = memoryview(bytearray(max(n, 1 << 16)))
            tls.view = view
        return view[:n]

    def _fill(self, offset: int, view: memoryview) -> None:
        """read_kcore(): header, then each segment's bytes, zeros where nothing is."""
        n = len(view)
        pos = 0
        if offset < self._data_offset:
            pos = min(n, self._data_offset - offset)
            view[:pos] = self._head[offset:offset + pos]
            if pos == n:
                return
        cur = offset + pos
        end = offset + n
        if self._direct:  # a real kcore: its data is at the same offsets
            self.source.readinto_kcore(cur, view[pos:])
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
                if self._hows[i] == _WALK:
                    self.walker.readinto(self._bases[i] + delta, part)
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
        view = memoryview(buf).cast("B")
        with self._pos_lock:
            pos = self._pos
            n = max(0, min(len(view), self._size - pos))
            self._pos = pos + n
        if n:
            self._fill(pos, view[:n] if n < len(view) else view)
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Read up to size bytes at the current position (all to EOF if size < 0)."""
        with self._pos_lock:
            pos = self._pos
            left = max(0, self._size - pos)
            n = left if size is None or size < 0 else min(size, left)
            self._pos = pos + n
        return self.pread(n, pos) if n else b""

    def readall(self) -> bytes:
        """Read to EOF (the file is as large as the kernel's address space: beware)."""
        return self.read(-1)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position; return it."""
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
        if not self.closed and self._owns:
            self.system.close()
        super().close()


def open_kcore(root: str = "/", source: Any = "auto", layout: str = "modern") -> KcoreFile:
    """Discover the system at root with source, and open its /proc/kcore as a file."""
    from kcore.discover import discover

    system = discover(root, source, flavour=layout)
    try:
        return KcoreFile(system, flavour=layout, owns_system=isinstance(source, str))
    except BaseException:
        if isinstance(source, str):
            system.close()
        raise
