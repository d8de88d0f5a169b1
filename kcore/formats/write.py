"""Writing a Plan: pwrite and holes to a seekable output, or every byte in order to a stream."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kcore.addrmap import PAGE_SIZE
from kcore.formats.plan import SCAN_CHUNK, Blob, Copy, Plan, Request

if TYPE_CHECKING:
    from kcore.output import Output

ZERO_BLOCK = 1 << 20


@dataclass
class Run:
    """How the CLI wants one dump written (kcore.formats.Format.dump)."""

    # a progress bar (total or None, label) with update(n), close() and a settable total;
    # None when quiet
    bar: Callable[[int | None, str], Any]
    digest: bool = True  # a SHA-256 of the output, in file order
    strict: bool = False  # an unreadable page is an error, not zeros
    first: Any = None  # the critical pages, read first (--order critical)
    times: Any = None  # the read-time record (--times)
    resume: bool = False  # a resumed upload: start at the first part the server lacks


def two_pass(name: str, plan_of: Callable[[Request], Plan], sparse: bool, req: Request,
             out: Output, run: Run) -> tuple[Plan, Any]:
    """Plan the dump (a zero-run scan first where elision applies), then write it.

    A digest needs a contiguous plan: it is hashed from the writer's own buffers, in order.
    """
    bar = run.bar(None, "scan for zero runs") if req.elide else None
    req.progress = bar.update if bar is not None else None
    try:
        plan = plan_of(req)
    finally:
        if bar is not None:
            bar.close()
    out.check_space(plan.space_needed, estimate=plan.estimate)
    if plan.contiguous:  # hashed from the writer's buffers, in file order
        out.start_digest()
    # a resumed upload: each output byte maps to a source range, so the copy starts at
    # the first part the server lacks (a compressed format re-reads: its stream cannot)
    start = out.resume_at(plan.size)
    bar = run.bar(plan.copy_bytes, f"dump {name}")
    try:
        stats = write_plan(out, req.source, plan, sparse=sparse, strict=run.strict,
                           threads=req.threads, progress=bar.update if bar is not None else None,
                           first=run.first, times=run.times, start=start)
    finally:
        if bar is not None:
            bar.close()
    return plan, stats


def write_plan(out: Output, source: Any, plan: Plan, *, sparse: bool, strict: bool,
               progress: Callable[[int], None] | None = None, threads: int = 1,
               first: Any = None, times: Any = None, start: int = 0) -> Any:
    """Write a plan's items to out (pwrite + holes if seekable, else in order).

    start: a stream begins at that output offset (a resumed upload holds the bytes before
    it): what lies before is neither read nor written.
    first (a kcore.critical.Snapshot): pages read before the copy, which stand in the
    output for what the copy reads of them (put over it in a file, spliced into a stream).
    times (a kcore.pagetimes.Timeline): notes when each chunk was read.
    """
    from kcore import engine

    stats = engine.CopyStats()
    seekable = out.seekable
    assert not (seekable and start), "start applies to a stream"
    if seekable:
        out.set_size(plan.size)
    if seekable and out.hasher is not None:
        return _write_hashing(out, source, plan, sparse=sparse, strict=strict,
                              progress=progress, first=first, times=times)
    zero = bytes(ZERO_BLOCK)
    pos = 0
    for whole in plan.items:
        if not seekable and whole.dst != pos:
            raise AssertionError(f"plan not sequential at {whole.dst:#x} (at {pos:#x})")
        item = _from(whole, start) if start else whole
        if item is None:
            pos = whole.dst + _length(whole)
            continue
        if isinstance(item, Blob):
            write_all(out.fd, item.data, item.dst if seekable else None)
            pos = item.dst + len(item.data)
        elif isinstance(item, Copy):
            for piece in _spliced(item, first if not seekable else None):
                if isinstance(piece, Blob):
                    write_all(out.fd, piece.data, None)
                    continue
                stats += engine.copy_range(
                    source.fd, piece.src, out.fd, piece.dst if seekable else None,
                    piece.length, sparse=sparse and seekable, strict=strict,
                    progress=progress, threads=threads,
                    slot_fd=getattr(source, "slot_fd", None), times=times,
                )
            pos = item.dst + item.length
        else:
            if not seekable or not sparse:
                left = item.length
                at = item.dst
                while left:
                    n = min(left, ZERO_BLOCK)
                    write_all(out.fd, zero[:n], at if seekable else None)
                    at += n
                    left -= n
            pos = item.dst + item.length
    if not seekable and pos != plan.size:
        raise AssertionError(f"plan ends at {pos:#x}, expected {plan.size:#x}")
    if seekable and first is not None:
        first.rewrite(out.fd, plan.items)
    return stats


def _length(item: Any) -> int:
    """The output bytes an item covers."""
    return len(item.data) if isinstance(item, Blob) else item.length


def _from(item: Any, start: int) -> Any:
    """The part of item at output offsets from start on (None when it ends before start)."""
    cut = start - item.dst
    if cut <= 0:
        return item
    if cut >= _length(item):
        return None
    if isinstance(item, Blob):
        return Blob(start, item.data[cut:])
    if isinstance(item, Copy):
        return Copy(start, item.src + cut, item.length - cut)
    return type(item)(start, item.length - cut)


def _spliced(item: Copy, first: Any) -> list[Copy | Blob]:
    """A copy cut around the pages held in first: those go as their held bytes (a stream)."""
    if first is None:
        return [item]
    out: list[Copy | Blob] = []
    pos = item.src
    for off, data in first.within(item.src, item.length):
        if off > pos:
            out.append(Copy(item.dst + pos - item.src, pos, off - pos))
        out.append(Blob(item.dst + off - item.src, bytes(data)))
        pos = off + len(data)
    if pos < item.src + item.length:
        out.append(Copy(item.dst + pos - item.src, pos, item.src + item.length - pos))
    return out


def _write_hashing(out: Output, source: Any, plan: Plan, *, sparse: bool, strict: bool,
                   progress: Callable[[int], None] | None = None, first: Any = None,
                   times: Any = None) -> Any:
    """write_plan to a seekable output whose hasher takes the written buffers, in order."""
    from kcore import engine

    hasher = out.hasher
    assert hasher is not None
    stats = engine.CopyStats()
    zero = bytes(ZERO_BLOCK)
    block = hasher.size
    page = PAGE_SIZE
    pending = 0
    for item in plan.items:
        if isinstance(item, Blob):
            write_all(out.fd, item.data, item.dst)
            hasher.submit(item.data)
        elif isinstance(item, Copy):
            pos, end, at = item.src, item.src + item.length, item.dst
            while pos < end:
                # blocks end on page boundaries of the source (as the engine's do)
                n = min(end - pos, block - pos % page) if end - pos > block else end - pos
                buf = hasher.buffer()
                t0 = times.now() if times is not None else 0
                stats += engine.copy_through(source.fd, pos, out.fd, at, memoryview(buf)[:n],
                                             sparse=sparse, strict=strict)
                if times is not None:
                    times.add(pos, n, t0, times.now())
                if first is not None:
                    first.overlay(buf, pos, n, out.fd, at)
                hasher.submit(buf, n)
                pos += n
                at += n
                pending += n
                if progress is not None and pending >= SCAN_CHUNK // 4:
                    progress(pending)
                    pending = 0
        else:
            if not sparse:
                left = item.length
                at = item.dst
                while left:
                    n = min(left, ZERO_BLOCK)
                    write_all(out.fd, zero[:n], at)
                    at += n
                    left -= n
            hasher.submit_zeros(item.length)
    if progress is not None and pending:
        progress(pending)
    return stats


def write_all(fd: int, data: bytes | memoryview, offset: int | None) -> None:
    """Write all of data at offset (pwrite), or at the fd's position when offset is None."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset) if offset is not None else os.write(fd, view)
        view = view[n:]
        if offset is not None:
            offset += n


def hash_copy(hasher: Any, data: bytes | bytearray | memoryview) -> None:
    """Submit a copy of data to an output's hasher (its own buffers: the caller may reuse data)."""
    view = memoryview(data).cast("B")
    while view:
        buf = hasher.buffer()
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        hasher.submit(buf, n)
        view = view[n:]


def hash_file(hasher: Any, fd: int, size: int) -> None:
    """Submit the first size bytes of the file at fd to a hasher (a read-back, in order)."""
    pos = 0
    while pos < size:
        buf = hasher.buffer()
        n = os.preadv(fd, [memoryview(buf)[:min(len(buf), size - pos)]], pos)
        if n <= 0:
            raise OSError(f"the output ends at {pos:#x} while hashing it (expected {size:#x})")
        hasher.submit(buf, n)
        pos += n
