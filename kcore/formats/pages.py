"""Virtual areas (vmalloc, modules, vmemmap) as segments, through the kernel's page tables."""

from __future__ import annotations

from typing import Any

from kcore.addrmap import ALL_ONES
from kcore.arch import walker_for
from kcore.formats.plan import Request
from kcore.formats.segments import Segment, kind_of
from kcore.vmem import clip_runs


def entry_segment(req: Request, entry: Any) -> Segment | None:
    """The Segment of one kclist entry (None when its pages cannot be found)."""
    kind = kind_of(entry, req.system.addrmap)
    if kind in ("ram", "text"):
        return Segment.linear(kind, entry.vaddr, entry.paddr, entry.size)
    return mapped_segment(req, kind, entry.vaddr, entry.size)


def text_segment(req: Request, entry: Any) -> Segment:
    """Kernel text as /proc/kcore reads it: through the page tables where they are known (a
    page they leave unmapped reads as zeros: arm64 6.1 maps the image from _stext, 64 KiB
    in), else linear from the kclist's physical address."""
    linear = Segment.linear("text", entry.vaddr, entry.paddr, entry.size)
    walker = walker_for(req.system, req.source)
    if walker is None:
        return linear
    pieces = _pieces(walker.runs(entry.vaddr, entry.size), entry.vaddr)
    if pieces == linear.phys:
        return linear
    return Segment("text", entry.vaddr, entry.paddr, entry.size, pieces)


def _pieces(runs: Any, vaddr: int) -> tuple[tuple[int, int, int], ...]:
    """(offset from vaddr, physical address, length) pieces of walked runs, merged where both
    the virtual and the physical addresses run on."""
    pieces: list[tuple[int, int, int]] = []
    for va, pa, n in runs:
        off = va - vaddr
        if pieces and pieces[-1][0] + pieces[-1][2] == off and pieces[-1][1] + pieces[-1][2] == pa:
            pieces[-1] = (pieces[-1][0], pieces[-1][1], pieces[-1][2] + n)
        else:
            pieces.append((off, pa, n))
    return tuple(pieces)


def mapped_segment(req: Request, kind: str, vaddr: int, size: int) -> Segment | None:
    """A virtual area's mapped pages in System RAM (vread() reads ioremaps as holes).

    None without a page-table walker (no PGD address).
    """
    walker = walker_for(req.system, req.source)
    if walker is None:
        return None
    ram = sorted((e.paddr, e.paddr + e.size) for e in req.system.kclist.entries
                 if kind_of(e, req.system.addrmap) == "ram")
    runs = clip_runs(walker.runs(vaddr, size), [lo for lo, _ in ram], [hi for _, hi in ram])
    return Segment(kind, vaddr, ALL_ONES, size, _pieces(runs, vaddr))
