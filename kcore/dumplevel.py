"""`kcore dump -d N` and `--estimate`: classify pages once, then dump only the kept ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kcore.pageclass import (
    CLASSES,
    DL_CACHE,
    DL_CACHE_PRI,
    DL_FREE,
    DL_USER,
    DL_ZERO,
    PageClasses,
    classify,
    kept_source,
)

RAM_KINDS = ("RAM",)


def ram_ranges(system: Any) -> list[tuple[int, int]]:
    """The physical (paddr, length) System RAM ranges of the kclist (what every format dumps)."""
    out = []
    for e in system.kclist.entries:
        name = getattr(e.type, "name", str(e.type)).upper()
        if name in RAM_KINDS:
            out.append((e.paddr, e.size))
    return sorted(out)


def below_source_end(ranges: list[tuple[int, int]], source: Any) -> list[tuple[int, int]]:
    """The (paddr, length) ranges cut at the end of what the source holds.

    RAM past the source's last byte cannot be dumped, and iomem's claims must not size a
    bitmap (one bit a page) by themselves: a hostile iomem claiming RAM at 2^52 would.
    """
    end = max((e.paddr + e.length for e in source.extents), default=0)
    return [(a, min(n, end - a)) for a, n in ranges if a < end]


@dataclass
class Filtered:
    """A dump level applied to a system: the classes, and the source view holding kept pages."""

    level: int
    classes: PageClasses
    source: Any  # the view (kcore.pageclass.kept_source)
    ram: list[tuple[int, int]]  # the (paddr, length) RAM ranges classified

    def held_pages(self) -> int:
        """RAM pages the view holds (kept by the mem_map classes), before zero elision."""
        page = self.classes.page_size
        total = 0
        for e in self.source.extents:  # clipped to RAM: a source may hold more (QEMU's ROMs)
            for lo, n in self.ram:
                a, b = max(e.paddr, lo), min(e.paddr + e.length, lo + n)
                total += max(0, b - a)
        return total // page

    def counts(self, zero: int | None = None) -> dict[str, int]:
        """Pages left out per class (zero: pages of zeros left out, when known)."""
        out = {k: v for k, v in self.classes.counts.items() if k != "zero"}
        out["zero"] = zero if zero is not None else 0
        return {k: out.get(k, 0) for k in CLASSES}

    def report(self, zero: int | None, kept: int | None) -> dict[str, Any]:
        """The dump_level part of a summary or manifest."""
        c = self.classes
        return {
            "level": self.level,
            "pages_excluded": self.counts(zero),
            "pages_kept": kept,
            "pages_in_ram": sum(n for _a, n in self.ram) // c.page_size,
            "pages_unreadable_mem_map": c.unreadable_mem_map,
            "pages_without_mem_map": c.no_mem_map,
            "pages_kept_to_bound_ranges": c.gap_kept,
            "classify_seconds": round(c.seconds, 3),
        }


def apply(system: Any, source: Any, level: int) -> Filtered:
    """Classify the system's RAM pages for a level; the source view holding the kept ones."""
    ram = ram_ranges(system)
    classes = classify(system, level, below_source_end(ram, source))
    # the view holds RAM pages only: no format dumps the others (reserved areas, ROMs)
    view = kept_source(source, classes)
    return Filtered(level, classes, view, ram)


def zero_pages(filtered: Filtered, threads: int = 1) -> int:
    """Pages of zeros among the kept ones (a page-granular scan, as the dump's)."""
    from kcore import engine

    src = filtered.source
    page = filtered.classes.page_size
    nonzero = 0
    for e in src.extents:
        runs, _st = engine.data_runs(src.fd, e.offset, e.length, granule=page, threads=threads,
                                     slot_fd=getattr(src, "slot_fd", None))
        nonzero += _page_span(runs, e.offset, e.offset + e.length, page)
    return filtered.held_pages() - nonzero


def _page_span(runs: list[tuple[int, int]], lo: int, hi: int, page: int) -> int:
    """Pages of [lo, hi) the runs touch (runs aligned to file offsets; pages to lo)."""
    total = 0
    last = lo
    for off, n in runs:
        a = max(lo, lo + (off - lo) // page * page, last)
        b = min(hi, lo + -(-(off + n - lo) // page) * page)
        if b > a:
            total += (b - a) // page
            last = b
    return total


def wants_zero_elision(level: int) -> bool:
    """Whether a level leaves out pages of zeros (bit 1)."""
    return bool(level & DL_ZERO)


def level_table(system: Any, level: int, filtered: Filtered) -> dict[str, int]:
    """RAM pages each even dump level keeps (zero pages not counted out), from one walk.

    The classes are the same at every level (makedumpfile's if-chain gives a page one
    class whatever the level; hwpoison and offline pages go at all of them), so one
    classification with every class on gives them all. Odd levels add the zero pages,
    which only a scan of the pages a level keeps can count.
    """
    full = level | DL_CACHE | DL_CACHE_PRI | DL_USER | DL_FREE
    classes = filtered.classes if full == level else classify(
        system, full, below_source_end(filtered.ram, system.source))
    c = classes.counts
    ram = sum(n for _a, n in filtered.ram) // classes.page_size
    always = c["hwpoison"] + c["offline"]
    table = {}
    for lv in range(0, 32, 2):
        out = always + (c["free"] if lv & DL_FREE else 0) + (c["user"] if lv & DL_USER else 0)
        out += c["cache"] if lv & (DL_CACHE | DL_CACHE_PRI) else 0
        out += c["cache_private"] if lv & DL_CACHE_PRI else 0
        table[str(lv)] = ram - out
    return table
