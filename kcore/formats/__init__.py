"""Dump formats: each turns the memory to dump into a Layout of header blobs and source copies."""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kcore.errors import FaultError, OutputError

if TYPE_CHECKING:
    from kcore.output import Output

ALL_ONES = (1 << 64) - 1
PAGE_SIZE = 4096
ZERO_BLOCK = 1 << 20
DEFAULT_GRANULE = 1 << 16  # zero runs shorter than this are kept (bounds the range count)
SCAN_CHUNK = 256 << 20  # bytes per zero-run scan call (a multiple of any granule <= 256 MiB)

FORMATS = ("elf", "kcore", "lime", "raw", "padded")
STREAMABLE = ("elf", "lime")  # may be written to stdout (no seeking)


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


@dataclass(frozen=True)
class Blob:
    """Literal bytes at an output offset (headers)."""

    dst: int
    data: bytes


@dataclass(frozen=True)
class Copy:
    """length bytes from the source fd at src to the output at dst."""

    dst: int
    src: int
    length: int


@dataclass(frozen=True)
class Zeros:
    """length zero bytes at dst: a hole in a seekable output, written for a stream."""

    dst: int
    length: int


Item = Blob | Copy | Zeros


@dataclass
class Layout:
    """A complete output: items in dst order, its size, and what it holds."""

    items: list[Item]
    size: int
    ranges: list[dict[str, Any]] = field(default_factory=list)  # for the manifest
    elided: int = 0  # bytes of zero runs left out
    scan_stats: Any = None  # CopyStats of the zero-run scan, if one ran
    estimate: bool = False  # size is an upper bound of the space needed (holes)
    warnings: list[str] = field(default_factory=list)  # said in the summary and the manifest

    @property
    def copy_bytes(self) -> int:
        """Bytes copied from the source."""
        return sum(i.length for i in self.items if isinstance(i, Copy))

    @property
    def contiguous(self) -> bool:
        """Whether the items cover [0, size) in order, each byte once (as a stream needs)."""
        pos = 0
        for i in self.items:
            if i.dst != pos:
                return False
            pos += len(i.data) if isinstance(i, Blob) else i.length
        return pos == self.size

    @property
    def space_needed(self) -> int:
        """Upper bound of the disk space the output takes."""
        return sum(i.length if isinstance(i, Copy) else len(i.data)
                   for i in self.items if not isinstance(i, Zeros))


@dataclass
class Request:
    """What to dump and how."""

    system: Any  # kcore.discover.System
    source: Any  # kcore.sources.MemorySource
    text: bool = True
    vmalloc: bool = False
    modules: bool = False
    elide: bool = True
    granule: int = DEFAULT_GRANULE
    strict: bool = False
    flavour: str = "modern"
    progress: Callable[[int], None] | None = None  # bytes scanned for zero runs
    threads: int = 1  # copy/scan threads (engine)


def source_pieces(source: Any, paddr: int, length: int) -> list[tuple[int, int, int | None]]:
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


def segment_items(source: Any, seg: Segment, dst: int) -> list[Item]:
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


def _scan(source: Any, offset: int, length: int, granule: int, stats: Any,
          progress: Callable[[int], None] | None, threads: int = 1) -> tuple[
        list[tuple[int, int]], Any]:
    """engine.data_runs of a source range (progress and Ctrl-C are seen between its chunks)."""
    from kcore import engine

    found, total = engine.data_runs(source.fd, offset, length, granule=granule,
                                    progress=progress, threads=threads,
                                    slot_fd=getattr(source, "slot_fd", None))
    stats += total
    return found, total


def nonzero_runs(source: Any, seg: Segment, granule: int, strict: bool, stats: Any,
                 progress: Callable[[int], None] | None = None,
                 threads: int = 1) -> list[tuple[int, int]]:
    """The (offset, length) runs of seg that hold non-zero bytes, granule-aligned, merged."""
    runs: list[tuple[int, int]] = []
    for off, pa, n in seg.phys:
        for poff, plen, src in source_pieces(source, pa, n):
            if src is None:
                continue
            found, st = _scan(source, src, plen, granule, stats, progress, threads)
            if strict and st.first_error_offset is not None:
                raise FaultError(
                    f"cannot read physical {pa + poff + st.first_error_offset - src:#x} "
                    f"(errno {st.first_errno}); without --strict it is dumped as zeros",
                    address=pa + poff + st.first_error_offset - src,
                )
            base = off + poff - src
            lo_limit, hi_limit = off + poff, off + poff + plen
            for r_off, r_len in found:
                # data_runs aligns to file offsets; a source (QEMU's ELF) may hold pages at
                # unaligned offsets: widen each run to whole pages of the segment.
                start = max(lo_limit, (base + r_off) // PAGE_SIZE * PAGE_SIZE)
                end = min(hi_limit, -(-(base + r_off + r_len) // PAGE_SIZE) * PAGE_SIZE)
                if runs and runs[-1][0] + runs[-1][1] >= start:
                    runs[-1] = (runs[-1][0], max(runs[-1][0] + runs[-1][1], end) - runs[-1][0])
                else:
                    runs.append((start, end - start))
    return runs


def split_runs(req: Request, segments: Sequence[Segment], limit: int) -> tuple[
        list[list[tuple[int, int]]], int, Any]:
    """Elide zero runs: return (each segment's non-zero runs, bytes elided, scan stats).

    The runs are (offset, length) pairs, at most limit of them in all (coarsened to fit).
    """
    from kcore.engine import CopyStats

    stats = CopyStats()
    per_seg = [nonzero_runs(req.source, s, req.granule, req.strict, stats, req.progress,
                            req.threads)
               for s in segments]
    per_seg = coarsen_runs(per_seg, limit)
    elided = sum(s.size for s in segments) - sum(n for runs in per_seg for _o, n in runs)
    return per_seg, elided, stats


def coarsen_runs(per_seg: list[list[tuple[int, int]]], limit: int) -> list[
        list[tuple[int, int]]]:
    """Merge runs across the smallest gaps (within a segment) until at most limit remain."""
    if sum(len(r) for r in per_seg) <= limit:
        return per_seg
    flat = [(i, r) for i, runs in enumerate(per_seg) for r in runs]
    keep = _coarsen_flat(flat, limit)
    return [[r for j, r in keep if j == i] for i in range(len(per_seg))]


def split_segments(req: Request, segments: Sequence[Segment], limit: int) -> tuple[
        list[Segment], int, Any]:
    """Elide zero runs: split segments into their non-zero runs; return (parts, elided, stats)."""
    per_seg, elided, stats = split_runs(req, segments, limit)
    parts = [s.sub(off, n) for s, runs in zip(segments, per_seg, strict=True) for off, n in runs]
    return parts, elided, stats


def _coarsen_flat(flat: list[tuple[int, tuple[int, int]]], limit: int) -> list[
        tuple[int, tuple[int, int]]]:
    """Merge runs within a segment across the smallest gaps until at most limit remain."""
    gaps = []
    for k in range(len(flat) - 1):
        (i, (s0, n0)), (j, (s1, _)) = flat[k], flat[k + 1]
        if i == j:
            gaps.append((s1 - s0 - n0, k))
    must_close = len(flat) - limit
    if must_close > len(gaps):
        raise OutputError(
            f"too many separate memory ranges ({len(flat)}) for one ELF file; "
            f"dump fewer areas (--no-text) or another format (--format lime)"
        )
    close = {k for _, k in sorted(gaps)[:must_close]}
    out: list[tuple[int, tuple[int, int]]] = []
    for k, (i, (s, n)) in enumerate(flat):
        if k - 1 in close:
            j, (ps, _pn) = out[-1]
            out[-1] = (j, (ps, s + n - ps))
        else:
            out.append((i, (s, n)))
    return out


def write_layout(out: Output, source: Any, layout: Layout, *, sparse: bool, strict: bool,
                 progress: Callable[[int], None] | None = None, threads: int = 1) -> Any:
    """Write a layout's items to out (pwrite + holes if seekable, else in order)."""
    from kcore import engine

    stats = engine.CopyStats()
    seekable = out.seekable
    if seekable:
        out.set_size(layout.size)
    if seekable and getattr(out.hasher, "inline", False):
        return _write_hashing(out, source, layout, sparse=sparse, strict=strict,
                              progress=progress)
    zero = bytes(ZERO_BLOCK)
    pos = 0
    for item in layout.items:
        if not seekable and item.dst != pos:
            raise AssertionError(f"layout not sequential at {item.dst:#x} (at {pos:#x})")
        if isinstance(item, Blob):
            _write_all(out.fd, item.data, item.dst if seekable else None)
            pos = item.dst + len(item.data)
        elif isinstance(item, Copy):
            base = item.dst
            done = 0

            def tick(n: int, base: int = base) -> None:
                nonlocal done
                done += n
                out.written(base + done)
                if progress is not None:
                    progress(n)

            stats += engine.copy_range(
                source.fd, item.src, out.fd, item.dst if seekable else None, item.length,
                sparse=sparse and seekable, strict=strict, progress=tick, threads=threads,
                slot_fd=getattr(source, "slot_fd", None),
            )
            pos = item.dst + item.length
        else:
            if not seekable or not sparse:
                left = item.length
                at = item.dst
                while left:
                    n = min(left, ZERO_BLOCK)
                    _write_all(out.fd, zero[:n], at if seekable else None)
                    at += n
                    left -= n
            pos = item.dst + item.length
        out.written(pos)
    if not seekable and pos != layout.size:
        raise AssertionError(f"layout ends at {pos:#x}, expected {layout.size:#x}")
    return stats


def _write_hashing(out: Output, source: Any, layout: Layout, *, sparse: bool, strict: bool,
                   progress: Callable[[int], None] | None = None) -> Any:
    """write_layout to a seekable output whose hasher takes the written buffers, in order."""
    from kcore import engine

    hasher = out.hasher
    assert hasher is not None
    stats = engine.CopyStats()
    zero = bytes(ZERO_BLOCK)
    block = hasher.size
    page = PAGE_SIZE
    pending = 0
    for item in layout.items:
        if isinstance(item, Blob):
            _write_all(out.fd, item.data, item.dst)
            hasher.submit(item.data)
        elif isinstance(item, Copy):
            pos, end, at = item.src, item.src + item.length, item.dst
            while pos < end:
                # blocks end on page boundaries of the source (as the engine's do)
                n = min(end - pos, block - pos % page) if end - pos > block else end - pos
                buf = hasher.buffer()
                stats += engine.copy_through(source.fd, pos, out.fd, at, memoryview(buf)[:n],
                                             sparse=sparse, strict=strict)
                hasher.submit(buf, n)
                pos += n
                at += n
                pending += n
                if progress is not None and pending >= SCAN_CHUNK // 4:
                    progress(pending)
                    pending = 0
        else:
            left = item.length
            at = item.dst
            while left:
                n = min(left, ZERO_BLOCK)
                if not sparse:
                    _write_all(out.fd, zero[:n], at)
                hasher.submit(zero, n)
                at += n
                left -= n
    if progress is not None and pending:
        progress(pending)
    return stats


def _write_all(fd: int, data: bytes, offset: int | None) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset) if offset is not None else os.write(fd, view)
        view = view[n:]
        if offset is not None:
            offset += n


def kind_of(entry: Any, layout: Any) -> str:
    """text, ram, vmalloc, modules or vmemmap for a kclist entry."""
    name = getattr(entry.type, "name", str(entry.type)).upper()
    if name.endswith("VMALLOC"):
        start = getattr(layout, "modules_start", None)
        size = getattr(layout, "modules_size", 0)
        if start is not None and start <= entry.vaddr < start + size:
            return "modules"
        return "vmalloc"
    return name.rsplit("_", 1)[-1].lower()


def entry_segment(req: Request, entry: Any) -> Segment | None:
    """The Segment of one kclist entry (None when its pages cannot be found)."""
    kind = kind_of(entry, req.system.layout)
    if kind in ("ram", "text"):
        return Segment.linear(kind, entry.vaddr, entry.paddr, entry.size)
    return mapped_segment(req, kind, entry.vaddr, entry.size)


def mapped_segment(req: Request, kind: str, vaddr: int, size: int) -> Segment | None:
    """A virtual area's mapped pages (page-table walk); None if no walker is available."""
    walker = page_walker(req)
    if walker is None:
        return None
    pieces: list[tuple[int, int, int]] = []
    for va, pa, n in _in_ram(req, walker.runs(vaddr, size)):
        off = va - vaddr
        if pieces and pieces[-1][0] + pieces[-1][2] == off and pieces[-1][1] + pieces[-1][2] == pa:
            pieces[-1] = (pieces[-1][0], pieces[-1][1], pieces[-1][2] + n)
        else:
            pieces.append((off, pa, n))
    return Segment(kind, vaddr, ALL_ONES, size, tuple(pieces))


def _in_ram(req: Request, runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The parts of mapped runs whose pages are System RAM (vread() reads ioremaps as holes)."""
    ram = sorted((e.paddr, e.paddr + e.size) for e in req.system.kclist.entries
                 if kind_of(e, req.system.layout) == "ram")
    starts = [lo for lo, _ in ram]
    out = []
    for va, pa, n in runs:
        end = pa + n
        i = max(bisect.bisect_right(starts, pa) - 1, 0)
        while i < len(ram) and ram[i][0] < end:
            lo, hi = max(pa, ram[i][0]), min(end, ram[i][1])
            if lo < hi:
                out.append((va + lo - pa, lo, hi - lo))
            i += 1
    return out


def page_walker(req: Request) -> Any:
    """The request's kernel page-table walker (made once), or None without a PGD address."""
    walker = getattr(req, "_walker", None)
    if walker is None:
        try:
            from kcore.vmem import PageWalker
        except ImportError:
            return None
        layout = req.system.layout
        if getattr(layout, "pgd_paddr", None) is None:
            return None
        sme = req.system.vmcoreinfo.number("sme_mask") or 0
        walker = PageWalker.for_source(req.source, layout.pgd_paddr, layout.pgtable_levels,
                                       sme_mask=sme)
        req._walker = walker  # type: ignore[attr-defined]
    return walker


def mapped_only(seg: Segment) -> list[Segment]:
    """Split a page-walked segment into its mapped parts (unmapped gaps dropped)."""
    runs: list[tuple[int, int]] = []
    for off, _pa, n in seg.phys:
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((off, n))
    return [seg.sub(off, n) for off, n in runs]


def ram_segments(system: Any) -> list[Segment]:
    """The RAM entries of the kclist, as physically linear segments."""
    return [Segment.linear("ram", e.vaddr, e.paddr, e.size)
            for e in system.kclist.entries if kind_of(e, system.layout) == "ram"]
