"""Kernel virtual reads: the x86-64 kernel page-table walk (4- and 5-level, large pages)."""

from __future__ import annotations

import bisect
import sys
import threading
from array import array
from collections.abc import Callable
from typing import Any

from kcore.addrmap import PAGE_SHIFT, PAGE_SIZE
from kcore.errors import PageTableError

ENTRIES = 512
_PRESENT = 1 << 0  # _PAGE_PRESENT
_PSE = 1 << 7  # _PAGE_PSE: a 1 GiB (PUD) or 2 MiB (PMD) leaf
# PTE_PFN_MASK: physical address bits 51:12 (drops NX, protection keys and the flags).
ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)
_SWAP = sys.byteorder != "little"  # page tables are little-endian x86-64 data
# Page-table pages kept; a full walk of a 512 MiB machine touches a few hundred.
CACHE_PAGES = 4096

Run = tuple[int, int, int]  # (vaddr, paddr, length): a physically contiguous mapped run
_ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_CHUNK))


def add_run(out: list[Run], va: int, pa: int, n: int) -> None:
    """Append the mapped run (va, pa, n), or extend the last one when this one continues it."""
    if out:
        lva, lpa, ln = out[-1]
        if lva + ln == va and lpa + ln == pa:
            out[-1] = (lva, lpa, ln + n)
            return
    out.append((va, pa, n))


def zero_fill(view: memoryview) -> None:
    """Set every byte of a writable memoryview to zero without a large allocation."""
    n = len(view)
    for at in range(0, n, _ZERO_CHUNK):
        k = min(_ZERO_CHUNK, n - at)
        view[at:at + k] = _ZEROS[:k]


class PageWalker:
    """Translate and read kernel virtual addresses through the page tables rooted at a PGD."""

    def __init__(self, read_phys: Callable[[int, int], Any], pgd_paddr: int, levels: int = 4,
                 *, sme_mask: int = 0,
                 readinto_phys: Callable[[int, Any], Any] | None = None) -> None:
        if levels not in (4, 5):
            raise ValueError(f"x86-64 has 4- or 5-level paging, not {levels}")
        self._read_phys = read_phys
        self._readinto_phys = readinto_phys
        self.pgd_paddr = pgd_paddr & ADDR_MASK
        self.levels = levels
        self.sme_mask = sme_mask
        self._top_shift = PAGE_SHIFT + 9 * levels - 9  # 39 (PGD, 4-level) or 48 (5-level)
        self._cache: dict[int, array[int]] = {}
        self._lock = threading.Lock()
        # Bounds of one runs() walk (a corrupt or hostile table must not run for ever):
        # every mapped byte once is at most what the memory holds (max_mapped), and each
        # table is a page of it (max_tables); set by for_source from the source's size.
        self.max_mapped: int | None = None
        self.max_tables: int | None = None
        self._walks = threading.local()

    @classmethod
    def for_source(cls, source: Any, pgd_paddr: int, levels: int = 4, *,
                   sme_mask: int = 0) -> PageWalker:
        """A walker reading page tables and data from a MemorySource."""
        walker = cls(source.read_phys, pgd_paddr, levels, sme_mask=sme_mask,
                     readinto_phys=source.readinto_phys)
        walker.bound_by(source)
        return walker

    def bound_by(self, source: Any) -> None:
        """Bound each walk by the memory a source holds (see max_mapped, max_tables)."""
        held = sum(e.length for e in getattr(source, "extents", ()))
        if held:
            self.max_mapped = max(held, 1 << 30)
            self.max_tables = max(4096, 4 * (held >> 21))  # a page table maps 2 MiB

    def _visit(self, table_paddr: int, shift: int, vaddr: int) -> None:
        """Count a table the walk enters; stop a walk that loops or never ends."""
        walk = getattr(self._walks, "walk", None)
        if walk is None:
            return
        path = walk[0]
        for upper, paddr in path.items():
            if upper > shift and paddr == table_paddr:
                raise PageTableError(
                    f"page tables loop: the table at physical {table_paddr:#x} is met again "
                    f"on its own path (virtual {vaddr:#x}): corrupt page tables, or "
                    f"NUMBER(pgtable_l5_enabled) wrong for them")
        path[shift] = table_paddr
        walk[1] += 1
        if self.max_tables is not None and walk[1] > self.max_tables:
            raise PageTableError(
                f"the page-table walk at virtual {vaddr:#x} enters more than "
                f"{self.max_tables} tables, more than the memory holds: corrupt page "
                f"tables, or NUMBER(pgtable_l5_enabled) wrong for them")

    def _mapped(self, n: int, vaddr: int) -> None:
        """Count n mapped bytes of the walk; stop at more than the memory holds."""
        walk = getattr(self._walks, "walk", None)
        if walk is None:
            return
        walk[2] += n
        if self.max_mapped is not None and walk[2] > self.max_mapped:
            raise PageTableError(
                f"the page tables map more than {self.max_mapped:#x} bytes (what the memory "
                f"source holds, or 1 GiB) by virtual {vaddr:#x}: corrupt or self-referencing page "
                f"tables, or NUMBER(pgtable_l5_enabled) wrong for them")

    def invalidate(self) -> None:
        """Forget cached page-table pages (a live system's tables change)."""
        self._cache = {}

    def _table(self, paddr: int) -> array[int]:
        """The 512 entries of the page-table page at paddr (cached)."""
        table = self._cache.get(paddr)
        if table is None:
            got = self._read_phys(paddr, PAGE_SIZE)
            data = got[0] if isinstance(got, tuple) else got
            table = array("Q", data)  # 4 KiB a table, not 512 int objects
            if _SWAP:
                table.byteswap()
            cache = self._cache
            if len(cache) >= CACHE_PAGES:
                with self._lock:
                    cache.clear()
            cache[paddr] = table
        return table

    def translate(self, vaddr: int) -> tuple[int, int] | None:
        """The physical address of vaddr and the size of its mapping, or None if unmapped."""
        table = self._table(self.pgd_paddr)
        shift = self._top_shift
        keep = ~self.sme_mask
        while True:
            entry = table[(vaddr >> shift) & (ENTRIES - 1)]
            if not entry & _PRESENT:
                return None
            entry &= keep
            size = 1 << shift
            if shift == PAGE_SHIFT or (shift <= 30 and entry & _PSE):
                base = entry & ADDR_MASK & ~(size - 1)
                return base + (vaddr & (size - 1)), size
            table = self._table(entry & ADDR_MASK)
            shift -= 9

    def runs(self, vaddr: int, length: int) -> list[Run]:
        """The mapped parts of [vaddr, vaddr + length), merged where physically contiguous."""
        out: list[Run] = []
        if length > 0:
            self._walks.walk = [{}, 0, 0]  # path (shift -> table), tables entered, bytes mapped
            try:
                self._runs(self.pgd_paddr, self._top_shift, vaddr, vaddr + length, out)
            finally:
                self._walks.walk = None
        return out

    def _runs(self, table_paddr: int, shift: int, start: int, end: int, out: list[Run]) -> None:
        """Collect runs for [start, end) from one table level (recursion depth <= levels)."""
        self._visit(table_paddr, shift, start)
        table = self._table(table_paddr)
        size = 1 << shift
        low = size - 1
        keep = ~self.sme_mask
        leaf_ok = shift <= 30  # PSE means a leaf only in a PUD (1 GiB) or PMD (2 MiB)
        va = start
        while va < end:
            nxt = min(end, (va | low) + 1)
            entry = table[(va >> shift) & (ENTRIES - 1)]
            if entry & _PRESENT:
                entry &= keep
                if shift == PAGE_SHIFT or (leaf_ok and entry & _PSE):
                    pa = (entry & ADDR_MASK & ~low) + (va & low)
                    self._mapped(nxt - va, va)
                    add_run(out, va, pa, nxt - va)
                else:
                    self._runs(entry & ADDR_MASK, shift - 9, va, nxt, out)
            va = nxt

    def readinto(self, vaddr: int, buf: Any, *,
                 allowed: tuple[list[int], list[int]] | None = None) -> int:
        """Fill buf from vaddr like the kernel's vread(): unmapped pages read as zeros.

        With `allowed` (sorted physical range starts and ends), mapped pages outside those
        ranges read as zeros too. Returns the number of bytes that were read from memory.
        """
        view = memoryview(buf).cast("B")
        n = len(view)
        runs = self.runs(vaddr, n)
        if allowed is not None:
            runs = clip_runs(runs, *allowed)
        pos = 0
        mapped = 0
        for va, pa, ln in runs:
            at = va - vaddr
            if at > pos:
                zero_fill(view[pos:at])
            self._fill(pa, view[at:at + ln])
            pos = at + ln
            mapped += ln
        if pos < n:
            zero_fill(view[pos:n])
        return mapped

    def _fill(self, paddr: int, view: memoryview) -> None:
        if self._readinto_phys is not None:
            self._readinto_phys(paddr, view)
            return
        got = self._read_phys(paddr, len(view))
        view[:] = got[0] if isinstance(got, tuple) else got

    def read(self, vaddr: int, length: int) -> bytes:
        """Read length bytes at vaddr; unmapped pages read as zeros."""
        buf = bytearray(length)
        self.readinto(vaddr, buf)
        return bytes(buf)


def clip_runs(runs: list[Run], starts: list[int], ends: list[int]) -> list[Run]:
    """The parts of runs whose physical pages lie in [starts[i], ends[i]) ranges (sorted)."""
    out: list[Run] = []
    for va, pa, n in runs:
        end = pa + n
        i = max(bisect.bisect_right(starts, pa) - 1, 0)
        while i < len(starts) and starts[i] < end:
            lo, hi = max(pa, starts[i]), min(end, ends[i])
            if lo < hi:
                out.append((va + lo - pa, lo, hi - lo))
            i += 1
    return out
