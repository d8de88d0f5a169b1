"""Segments: the memory a dump holds, and where their bytes sit in the source."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kcore.addrmap import ALL_ONES
from kcore.formats.plan import Copy, Item, Zeros

if TYPE_CHECKING:
    from kcore.addrmap import AddressMap
    from kcore.kclist import KcoreEntry
    from kcore.sources.base import MemorySource
    from kcore.system import System


@dataclass(frozen=True)
class Segment:
    """Memory to dump: [vaddr, vaddr+size) whose bytes sit at physical pieces."""

    kind: str  # "text", "ram", "vmalloc", "modules", "vmemmap"
    vaddr: int
    paddr: int  # physical address of the first byte, or ALL_ONES (not linear)
    size: int
    # (offset in segment, physical address, length): physically contiguous pieces; gaps read 0
    phys: tuple[tuple[int, int, int], ...]

    @staticmethod
    def linear(kind: str, vaddr: int, paddr: int, size: int) -> Segment:
        """A physically contiguous segment."""
        return Segment(kind, vaddr, paddr, size, ((0, paddr, size),))

    def sub(self, offset: int, length: int) -> Segment:
        """The part [offset, offset+length) of this segment."""
        pieces = []
        for off, pa, n in self.phys:
            lo, hi = max(off, offset), min(off + n, offset + length)
            if lo < hi:
                pieces.append((lo - offset, pa + lo - off, hi - lo))
        paddr = self.paddr + offset if self.paddr != ALL_ONES else ALL_ONES
        return Segment(self.kind, self.vaddr + offset, paddr, length, tuple(pieces))


def kind_of(entry: KcoreEntry, amap: AddressMap) -> str:
    """text, ram, vmalloc, modules or vmemmap for a kclist entry."""
    name = getattr(entry.type, "name", str(entry.type)).upper()
    if name.endswith("VMALLOC"):
        start, size = amap.modules_start, amap.modules_size
        if start <= entry.vaddr < start + size:
            return "modules"
        return "vmalloc"
    return name.rsplit("_", 1)[-1].lower()


def ram_segments(system: System) -> list[Segment]:
    """The RAM entries of the kclist, as physically linear segments."""
    return [Segment.linear("ram", e.vaddr, e.paddr, e.size)
            for e in system.kclist.entries if kind_of(e, system.addrmap) == "ram"]


def mapped_only(seg: Segment) -> list[Segment]:
    """Split a page-walked segment into its mapped parts (unmapped gaps dropped)."""
    runs: list[tuple[int, int]] = []
    for off, _pa, n in seg.phys:
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((off, n))
    return [seg.sub(off, n) for off, n in runs]


def source_pieces(source: MemorySource, paddr: int,
                  length: int) -> list[tuple[int, int, int | None]]:
    """Split physical [paddr, paddr+length) into (offset, length, source fd offset or None)."""
    starts = [e.paddr for e in source.extents]
    out: list[tuple[int, int, int | None]] = []
    pos, end = paddr, paddr + length
    i = max(bisect.bisect_right(starts, pos) - 1, 0)
    while pos < end:
        e = source.extents[i] if i < len(source.extents) else None
        if e is None or pos < e.paddr:
            stop = end if e is None else min(end, e.paddr)
            out.append((pos - paddr, stop - pos, None))
            pos = stop
            continue
        e_end = e.paddr + e.length
        if pos >= e_end:
            i += 1
            continue
        stop = min(end, e_end)
        out.append((pos - paddr, stop - pos, e.offset + pos - e.paddr))
        pos = stop
        i += 1
    return out


def segment_items(source: MemorySource, seg: Segment, dst: int) -> list[Item]:
    """The Copy/Zeros items that place seg's bytes at output offset dst."""
    items: list[Item] = []
    pos = 0
    for off, pa, n in seg.phys:
        if off > pos:
            items.append(Zeros(dst + pos, off - pos))
        for poff, plen, src in source_pieces(source, pa, n):
            at = dst + off + poff
            items.append(Copy(at, src, plen) if src is not None else Zeros(at, plen))
        pos = off + n
    if pos < seg.size:
        items.append(Zeros(dst + pos, seg.size - pos))
    return items
