"""LiME: per physical range a 32-byte header {magic, version 1, start, inclusive end} then bytes."""

from __future__ import annotations

from typing import Any

from kcore.formats import Format
from kcore.formats.plan import Blob, Item, Plan, Request
from kcore.formats.segments import ram_segments, segment_items
from kcore.formats.zeroruns import split_segments
from kcore.wire.lime import HEADER, MAX_RANGES, pack_header


def plan(req: Request) -> Plan:
    """Lay out a LiME image of the RAM ranges (zero runs left out when eliding)."""
    segs = ram_segments(req.system)
    elided, stats = 0, None
    if req.elide:
        segs, elided, stats = split_segments(req, segs, MAX_RANGES)
    items: list[Item] = []
    ranges: list[dict[str, Any]] = []
    pos = 0
    for s in segs:
        items.append(Blob(pos, pack_header(s.paddr, s.size)))
        pos += HEADER.size
        items.extend(segment_items(req.source, s, pos))
        ranges.append({"kind": s.kind, "paddr": hex(s.paddr), "size": s.size, "offset": pos})
        pos += s.size
    return Plan(items, pos, ranges, elided, stats)


FORMAT = Format(
    "lime", "lime", plan, streamable=True, elides=True, excluded="absent",
    header_bytes=lambda runs, page: HEADER.size * runs,
    help=("LiME (Volatility's LimeLayer, LiME's lime format): per RAM range a 32-byte\n"
          "header then the bytes; zero runs left out.")
)
