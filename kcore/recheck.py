"""`kcore dump --recheck`: how much memory changed while it was dumped (the smear).

Once the dump is written, every copied range is read again from the source and compared, page
by page, with what the output holds (read back from the output file, so no page is kept in
memory beyond one block). A live system keeps running while it is read: the share of pages
that changed says how far the dump is from one instant.
"""

from __future__ import annotations

import time
from typing import Any

from kcore.formats.plan import Copy, Plan
from kcore.sources.base import Extent
from kcore.sources.files import pread_full

BLOCK = 1 << 20


MAX_LISTED = 64  # changed pages listed per range (physical addresses)


def _paddr_of(source: Any, offset: int) -> int | None:
    """The physical address a source file offset holds (None outside its extents)."""
    extents: list[Extent] = source.extents
    for e in extents:
        if e.offset <= offset < e.offset + e.length:
            return e.paddr + offset - e.offset
    return None


def recheck(out_fd: int, source: Any, plan: Plan, page: int = 4096,
            progress: Any = None, code: tuple[int, int] | None = None) -> dict[str, Any]:
    """Re-read each copied range of plan from source; count pages differing from the output.

    code: the kernel code's physical [start, end), counted on its own.
    """
    t0 = time.perf_counter()
    code_seen: set[int] = set()  # code pages are dumped twice (text and RAM): counted once
    code_changed: set[int] = set()
    ranges = [dict(r) for r in plan.ranges]
    bounds = []
    for r in ranges:
        r["pages"] = r["changed"] = 0
        r["changed_at"] = []
        try:
            bounds.append((int(r["offset"]), int(r["offset"]) + int(r["size"])))
        except (KeyError, TypeError, ValueError):
            bounds.append((-1, -1))
    pages = changed = 0
    fresh = bytearray(BLOCK)
    view = memoryview(fresh)
    for item in plan.items:
        if not isinstance(item, Copy):
            continue
        owner = next((i for i, (lo, hi) in enumerate(bounds) if lo <= item.dst < hi), None)
        pos = 0
        while pos < item.length:
            n = min(BLOCK, item.length - pos)
            written = pread_full(out_fd, n, item.dst + pos)
            source._read_at(item.src + pos, view[:n], False)
            differ = 0
            base = _paddr_of(source, item.src + pos)
            if written != view[:n]:
                for i in range(0, n, page):
                    if written[i:i + page] != view[i:min(i + page, n)]:
                        differ += 1
                        if owner is not None and base is not None and \
                                len(ranges[owner]["changed_at"]) < MAX_LISTED:
                            ranges[owner]["changed_at"].append(hex(base + i))
                        if code is not None and base is not None and \
                                code[0] <= base + i < code[1]:
                            code_changed.add((base + i) // page)
            if code is not None and base is not None:
                lo, hi = max(base, code[0]), min(base + n, code[1])
                code_seen.update(range(lo // page, -(-hi // page)))
            count = -(-n // page)
            pages += count
            changed += differ
            if owner is not None:
                ranges[owner]["pages"] += count
                ranges[owner]["changed"] += differ
            pos += n
            if progress is not None:
                progress(n)
    for r in ranges:
        r["share"] = round(r["changed"] / r["pages"], 6) if r["pages"] else 0.0
    out: dict[str, Any] = {
        "pages": pages,
        "changed": changed,
        "share": round(changed / pages, 6) if pages else 0.0,
        "seconds": round(time.perf_counter() - t0, 3),
        "ranges": [{k: r[k] for k in ("kind", "paddr", "vaddr", "offset", "size", "pages",
                                      "changed", "share", "changed_at") if k in r}
                   for r in ranges],
    }
    if code is not None:
        out["kernel_code"] = {"paddr": hex(code[0]), "size": code[1] - code[0],
                              "pages": len(code_seen), "changed": len(code_changed)}
    return out
