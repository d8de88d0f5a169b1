"""raw and padded: a physical image, file offset = physical address (holes, or zeros written)."""

from __future__ import annotations

from kcore.errors import OutputError
from kcore.formats import Item, Layout, Request, Zeros, ram_segments, segment_items


def plan(req: Request, *, padded: bool = False) -> Layout:
    """Lay out a raw (sparse) or padded (dense) physical image of the RAM ranges."""
    segs = sorted(ram_segments(req.system), key=lambda s: s.paddr)
    if not segs:
        raise OutputError("nothing to dump: the kclist has no RAM ranges")
    items: list[Item] = []
    pos = 0
    for s in segs:
        if s.paddr > pos:
            items.append(Zeros(pos, s.paddr - pos))
        items.extend(segment_items(req.source, s, s.paddr))
        pos = s.paddr + s.size
    ranges = [{"kind": s.kind, "paddr": hex(s.paddr), "size": s.size, "offset": s.paddr}
              for s in segs]
    return Layout(items, pos, ranges, estimate=not padded)
