"""kcore: the exact /proc/kcore image, a sparse file of the real size (~128 TiB on x86-64)."""

from __future__ import annotations

from typing import Any

from kcore.formats import Format
from kcore.formats.pages import entry_segment
from kcore.formats.plan import Blob, Copy, Item, Plan, Request
from kcore.formats.segments import segment_items


def plan(req: Request) -> Plan:
    """Lay out header + every PT_LOAD's bytes at its kcore offset; holes everywhere else."""
    from kcore.elfcore import build_header

    header = build_header(req.system, req.layout)
    items: list[Item] = [Blob(0, header.data)]
    ranges: list[dict[str, Any]] = []
    missing = []
    for entry, p_offset in sorted(header.loads, key=lambda lo: lo[1]):
        seg = entry_segment(req, entry)
        if seg is None:
            missing.append(entry)
            continue
        # Only copies: everything not copied is a hole, which reads as zeros like kcore.
        items.extend(i for i in segment_items(req.source, seg, p_offset) if isinstance(i, Copy))
        ranges.append({"kind": seg.kind, "vaddr": hex(entry.vaddr), "size": entry.size,
                       "offset": p_offset})
    out = Plan(items, header.file_size, ranges, estimate=True)
    if missing:
        out.warnings.append(
            f"{len(missing)} virtual areas left as holes (no page-table walker): "
            + ", ".join(f"{e.kind} at {e.vaddr:#x}" for e in missing))
    return out


FORMAT = Format(
    "kcore", "kcore", plan, digest=False, needs_seek=True, dump_levels=False,
    chunk_digests=True,
    help=("the exact /proc/kcore image as a sparse file of the real size (~128 TiB apparent\n"
          "on x86-64; needs tmpfs, xfs or btrfs: ext4 stops at 16 TiB). No digest.")
)
