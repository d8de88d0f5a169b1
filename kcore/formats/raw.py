"""raw and padded: a physical image, file offset = physical address (holes, or zeros written)."""

from __future__ import annotations

from functools import partial

from kcore.errors import InputError
from kcore.formats import Format
from kcore.formats.plan import Item, Plan, Request, Zeros
from kcore.formats.segments import ram_segments, segment_items


def plan(req: Request, *, padded: bool = False) -> Plan:
    """Lay out a raw (sparse) or padded (dense) physical image of the RAM ranges."""
    segs = sorted(ram_segments(req.system), key=lambda s: s.paddr)
    if not segs:
        raise InputError("nothing to dump: the kclist has no RAM ranges")
    items: list[Item] = []
    pos = 0
    for s in segs:
        if s.paddr > pos:
            items.append(Zeros(pos, s.paddr - pos))
        items.extend(segment_items(req.source, s, s.paddr))
        pos = s.paddr + s.size
    ranges = [{"kind": s.kind, "paddr": hex(s.paddr), "size": s.size, "offset": s.paddr}
              for s in segs]
    return Plan(items, pos, ranges, estimate=not padded)


RAW = Format(
    "raw", "raw", plan, excluded="holes",
    help=("a physical image, file offset = physical address; holes for gaps and zero pages\n"
          "(read it back with --source raw:PATH).")
)
PADDED = Format(
    "padded", "img", partial(plan, padded=True), sparse=False, excluded="zeros",
    help=("the same layout with zeros written densely (LiME's padded format).")
)
