"""Page-by-page comparison of memory read at different moments of a running kernel."""

from __future__ import annotations

PAGE = 4096


def differing_pages(a: bytes, b: bytes, base: int = 0) -> list[int]:
    """Addresses (base + offset) of the 4 KiB pages where a and b differ."""
    assert len(a) == len(b), (len(a), len(b))
    if a == b:
        return []
    return [base + i for i in range(0, len(a), PAGE) if a[i:i + PAGE] != b[i:i + PAGE]]


def stable_mismatches(before: bytes, ours: bytes, after: bytes, base: int = 0
                      ) -> tuple[list[int], list[int]]:
    """(pages where ours differs though before == after, pages that changed before -> after)."""
    changed = set(differing_pages(before, after, base))
    wrong = [p for p in differing_pages(before, ours, base) if p not in changed]
    return wrong, sorted(changed)
