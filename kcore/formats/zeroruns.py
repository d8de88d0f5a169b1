"""Zero-run elision: find a segment's non-zero runs (engine scan) and fit them to a limit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kcore.addrmap import PAGE_SIZE
from kcore.errors import FaultError, InputError
from kcore.formats.plan import Request
from kcore.formats.segments import Segment, source_pieces


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
    """The (offset, length) runs of seg that hold non-zero bytes, granule-aligned, merged.

    Granule 0: no zero scan, every byte the source holds is kept (a dump level without its
    zero bit leaves out only the pages the source view does not hold).
    """
    runs: list[tuple[int, int]] = []
    for off, pa, n in seg.phys:
        for poff, plen, src in source_pieces(source, pa, n):
            if src is None:
                continue
            if not granule:
                _merge(runs, off + poff, off + poff + plen)
                if progress is not None:
                    progress(plen)
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
                _merge(runs, start, end)
    return runs


def _merge(runs: list[tuple[int, int]], start: int, end: int) -> None:
    """Append [start, end) to sorted runs, merged with the last one where they touch."""
    if runs and runs[-1][0] + runs[-1][1] >= start:
        runs[-1] = (runs[-1][0], max(runs[-1][0] + runs[-1][1], end) - runs[-1][0])
    else:
        runs.append((start, end - start))


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


def split_segments(req: Request, segments: Sequence[Segment], limit: int) -> tuple[
        list[Segment], int, Any]:
    """Elide zero runs: split segments into their non-zero runs; return (parts, elided, stats)."""
    per_seg, elided, stats = split_runs(req, segments, limit)
    parts = [s.sub(off, n) for s, runs in zip(segments, per_seg, strict=True) for off, n in runs]
    return parts, elided, stats


def coarsen_runs(per_seg: list[list[tuple[int, int]]], limit: int) -> list[
        list[tuple[int, int]]]:
    """Merge runs across the smallest gaps (within a segment) until at most limit remain."""
    if sum(len(r) for r in per_seg) <= limit:
        return per_seg
    flat = [(i, r) for i, runs in enumerate(per_seg) for r in runs]
    keep = _coarsen_flat(flat, limit)
    return [[r for j, r in keep if j == i] for i in range(len(per_seg))]


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
        raise InputError(
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
