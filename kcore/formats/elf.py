"""The default format: a compact ELF core (PT_NOTE, then packed PT_LOADs for RAM and text).

Zero runs are left out of the file. Where a RAM or text segment lost one, a PT_LOAD with no
file bytes (p_filesz 0, p_memsz the run) says so: crash, gdb, drgn and makedumpfile read it as
zeros, as they read kdump's ELF vmcores (Volatility 3 skips such headers). p_align is 0, as in
kdump's vmcores: crash takes the file for a kdump (and finds KASLR from VMCOREINFO) only then.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kcore.addrmap import ALL_ONES
from kcore.errors import FaultError, InputError
from kcore.formats import Format
from kcore.formats.pages import mapped_segment, text_segment
from kcore.formats.plan import Blob, Copy, Item, Plan, Request
from kcore.formats.segments import (
    Segment,
    kind_of,
    mapped_only,
    segment_items,
    source_pieces,
)
from kcore.formats.write import write_all
from kcore.formats.zeroruns import coarsen_runs, split_runs
from kcore.wire.elf import EHDR, EM_BY_ARCH, PF_RWX, PHDR, PN_XNUM, PT_LOAD, PT_NOTE, ehdr, phdr

if TYPE_CHECKING:
    from kcore.output import Output

MAX_LOADS = PN_XNUM - 2  # e_phnum stays below PN_XNUM: one PT_NOTE plus the loads
PACK_CHUNK = 64 << 20  # bytes of source per packed-copy call (progress, Ctrl-C between)


def segments(req: Request) -> list[Segment]:
    """What the ELF core holds: text (unless --no-text), vmalloc/modules if asked, RAM."""
    system = req.system
    out: list[Segment] = []
    for e in system.kclist.entries:
        kind = kind_of(e, system.addrmap)
        if kind == "text" and req.text:
            out.append(text_segment(req, e))
        elif kind in ("vmalloc", "modules") and getattr(req, kind):
            seg = mapped_segment(req, kind, e.vaddr, e.size)
            if seg is None:
                raise InputError(f"--{kind} needs the kernel page tables, and VMCOREINFO has "
                                 f"no SYMBOL(init_top_pgt) (swapper_pg_dir on arm64) to find "
                                 f"them: dump without --{kind}")
            out.extend(mapped_only(seg))
        elif kind == "ram":
            out.append(Segment.linear("ram", e.vaddr, e.paddr, e.size))
    if not out:
        raise InputError("nothing to dump: the kclist has no RAM ranges")
    return out


def dump_notes(req: Request) -> bytes:
    """The PT_NOTE: the kernel's notes (VMCOREINFO whatever --layout: consumers need it),
    then kcore's KCORE notes of the kernel's symbol files unless --no-symbols."""
    from kcore.elfcore import build_notes
    from kcore.symbols import elf_notes

    notes = build_notes(req.system, "modern")
    if req.symbols is not None:
        notes += elf_notes(req.symbols)
    return notes


def machine_of(system: Any) -> int:
    """The e_machine of a system's architecture."""
    machine = EM_BY_ARCH.get(system.addrmap.arch)
    if machine is None:
        raise InputError(f"no ELF machine number for architecture {system.addrmap.arch}")
    return machine


def plan(req: Request) -> Plan:
    """Lay out the compact ELF core for a request."""
    system = req.system
    page = system.addrmap.page_size
    segs = segments(req)
    elided, stats = 0, None
    if req.elide:
        fr = frame(req)
        if fr is not None:  # the packed plan, scanned by packing into /dev/null
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                return pack(req, fr, null, req.progress, scan=True)[0]
            finally:
                os.close(null)
        per_seg, _elided, stats = split_runs(req, segs, MAX_LOADS)
        while True:  # the zero-fill loads count too: merge runs until all headers fit
            runs = [(s, off, n) for s, seg_runs in zip(segs, per_seg, strict=True)
                    for off, n in seg_runs]
            count = len(_load_headers(segs, [(s, off, n, 0) for s, off, n in runs], 0))
            if count <= MAX_LOADS:
                break
            floor = sum(1 for r in per_seg if r)  # one run a segment at least
            fewer = max(floor, len(runs) - -(-(count - MAX_LOADS) // 2))  # a merge drops ~2
            if fewer >= len(runs):
                raise InputError(f"too many separate memory ranges ({count}) for one ELF "
                                  f"file; dump fewer areas or another format (--format lime)")
            per_seg = coarsen_runs(per_seg, fewer)
        elided = sum(s.size for s in segs) - sum(n for _s, _o, n in runs)
    else:
        if len(segs) > MAX_LOADS:
            raise InputError(f"too many ranges ({len(segs)}) for one ELF file")
        runs = [(s, 0, s.size) for s in segs]
    machine = machine_of(system)
    notes = dump_notes(req)
    loads: list[tuple[Segment, int, int, int]] = []
    at = 0
    for s, off, n in runs:
        loads.append((s, off, n, at))
        at += n
    phnum = 1 + len(_load_headers(segs, loads, 0))
    notes_offset = EHDR.size + phnum * PHDR.size
    data_offset = -(-(notes_offset + len(notes)) // page) * page
    loads = [(s, off, n, data_offset + d) for s, off, n, d in loads]
    head = _header(machine, notes, notes_offset, segs, loads, data_offset)
    items: list[Item] = []
    ranges: list[dict[str, Any]] = []
    for s, off, n, dst in loads:
        part = s.sub(off, n)
        items.extend(segment_items(req.source, part, dst))
        ranges.append({"kind": s.kind, "vaddr": hex(part.vaddr), "paddr": hex(part.paddr),
                       "size": n, "offset": dst})
    head += bytes(notes_offset - len(head)) + notes
    head += bytes(data_offset - len(head))
    return Plan([Blob(0, head), *items], data_offset + at, ranges, elided, stats)


def max_data_loads(segs: list[Segment]) -> int:
    """PT_LOADs with file bytes that surely fit: in a linear segment each may bring a
    zero-fill one, and each linear segment one more (mapped segments get none)."""
    linear = sum(1 for s in segs if s.paddr != ALL_ONES)
    return (MAX_LOADS - linear) // 2


def _load_headers(segs: list[Segment], loads: list[tuple[Segment, int, int, int]],
                  data_offset: int) -> list[bytes]:
    """The PT_LOADs for (segment, offset, length, file offset) runs, in file order.

    A linear segment's gaps between runs get zero-fill PT_LOADs (p_filesz 0) whose p_offset
    is the end of the file: makedumpfile (offset_to_pt_load_end, 1.7.2 to 1.7.9) takes the
    first PT_LOAD whose [p_offset, p_offset + p_memsz) holds a file offset for the one that
    holds its bytes, so a zero-fill load at the next load's offset made it map, and cache as
    that load's memory, the file bytes of the loads after it: it read dumped pages (a page
    table) as zeros or as other pages, or crashed. At the end of the file no data lies there.
    """
    by_seg: dict[int, list[tuple[int, int, int]]] = {}
    for seg, off, n, dst in loads:
        by_seg.setdefault(id(seg), []).append((off, n, dst))
    out: list[bytes] = []
    file_end = max([data_offset, *(dst + n for _s, _o, n, dst in loads)])
    for seg in segs:
        linear = seg.paddr != ALL_ONES
        cursor = 0

        def zero(off: int, n: int, at: int, seg: Segment = seg) -> bytes:
            return phdr(PT_LOAD, PF_RWX, at, seg.vaddr + off, seg.paddr + off, 0, n,
                        0)

        for off, n, dst in by_seg.get(id(seg), []):
            if linear and off > cursor:
                out.append(zero(cursor, off - cursor, file_end))
            paddr = seg.paddr + off if linear else ALL_ONES
            out.append(phdr(PT_LOAD, PF_RWX, dst, seg.vaddr + off, paddr, n, n, 0))
            cursor = off + n
        if linear and cursor < seg.size:
            out.append(zero(cursor, seg.size - cursor, file_end))
    return out


def _header(machine: int, notes: bytes, notes_offset: int, segs: list[Segment],
            loads: list[tuple[Segment, int, int, int]], data_offset: int) -> bytes:
    """ELF header and program headers (PT_NOTE first: crash wants it) for (seg, off, n, dst)."""
    headers = _load_headers(segs, loads, data_offset)
    return b"".join([ehdr(machine, 1 + len(headers)),
                     phdr(PT_NOTE, 0, notes_offset, 0, 0, len(notes), 0, 0), *headers])


def _chunks(req: Request, segs: list[Segment]) -> list[tuple[int, int, int, int]]:
    """(segment index, offset in it, source fd offset, length) pieces of at most PACK_CHUNK."""
    out = []
    for i, seg in enumerate(segs):
        for off, pa, n in seg.phys:
            for poff, plen, src in source_pieces(req.source, pa, n):
                if src is None:
                    continue  # outside the source's memory: zeros, left out
                at = off + poff
                done = 0
                while done < plen:
                    # chunks end on PACK_CHUNK boundaries of the segment (granules nest there)
                    k = min(plen - done, PACK_CHUNK - (at + done) % PACK_CHUNK)
                    out.append((i, at + done, src + done, k))
                    done += k
    return out


@dataclass
class Frame:
    """The fixed part of a packed ELF core: what to copy, and the header region reserved."""

    machine: int
    page: int
    segs: list[Segment]
    chunks: list[tuple[int, int, int, int]]
    max_loads: int  # PT_LOADs with file bytes allowed (zero-fill ones have room besides)
    notes: bytes
    notes_offset: int
    data_offset: int

    @property
    def total(self) -> int:
        """Bytes of source the chunks read."""
        return sum(n for _i, _o, _s, n in self.chunks)


def frame(req: Request) -> Frame | None:
    """Reserve the header for a packed core; None when the chunks outnumber the loads allowed."""
    system = req.system
    page = system.addrmap.page_size
    segs = segments(req)
    machine = machine_of(system)
    if not req.granule or PACK_CHUNK % req.granule:
        return None  # granule 0: no zero scan (the two-pass plan keeps what the source holds)
    chunks = _chunks(req, segs)
    bound = sum(n // req.granule // 2 + 2 for _i, _o, _s, n in chunks)
    max_loads = min(max_data_loads(segs), bound)
    if len(chunks) > max_loads:
        return None  # too many pieces for one run each: split_runs coarsens globally
    notes = dump_notes(req)
    # room for the PT_NOTE, the data loads, and in linear segments a zero-fill load before
    # each and after the last
    linear = sum(1 for s in segs if s.paddr != ALL_ONES)
    notes_offset = EHDR.size + (1 + 2 * max_loads + linear) * PHDR.size
    data_offset = -(-(notes_offset + len(notes)) // page) * page
    return Frame(machine, page, segs, chunks, max_loads, notes, notes_offset, data_offset)


def pack(req: Request, fr: Frame, dst_fd: int,
         progress: Callable[[int], None] | None = None, *, scan: bool = False) -> tuple[
        Plan, Any]:
    """Copy each chunk's non-zero granules packed to dst_fd after the header; lay the core out.

    With dst_fd on /dev/null (scan) this is the zero-run scan of the two-pass path: both give
    the same plan. The runs of each chunk are budgeted in proportion to its size (a chunk
    that needs more is redone with a coarser granule), so the loads fit the reserved headers.
    A scan runs the chunks on req.threads threads first, at the chunk's finest granule.
    """
    from kcore import engine

    stats = engine.CopyStats()
    loads: list[tuple[Segment, int, int, int]] = []  # (segment, offset in it, length, dst)
    items: list[Item] = []
    pos = fr.data_offset
    left_runs, left_bytes = fr.max_loads, fr.total

    def place(k: int, runs: list[tuple[int, int]] | None, st: Any) -> None:
        """Take chunk k's runs (None, or more than its budget: copy it again, in order)."""
        nonlocal pos, left_runs, left_bytes, stats
        i, off, src, n = fr.chunks[k]
        later = len(fr.chunks) - k - 1
        budget = max(1, min(left_runs - later, -(-left_runs * n // left_bytes)))
        seg = fr.segs[i]
        if runs is None or len(runs) > budget:
            runs, st = _pack_chunk(req, seg, dst_fd, pos, off, src, n, budget)
        stats += st
        for r_src, r_len in runs:
            r_off = off + r_src - src
            last = loads[-1] if loads else None
            if last is not None and last[0] is seg and last[1] + last[2] == r_off:
                loads[-1] = (seg, last[1], last[2] + r_len, last[3])
            else:
                loads.append((seg, r_off, r_len, pos))
            items.append(Copy(pos, r_src, r_len))
            pos += r_len
        left_runs -= len(runs)
        left_bytes -= n
        if progress is not None:
            progress(n)

    if scan and req.threads > 1 and len(fr.chunks) > 1:
        _scan_chunks(req, fr, dst_fd, place)
    else:
        for k in range(len(fr.chunks)):
            place(k, None, None)
    if len(loads) > fr.max_loads:
        raise AssertionError(f"{len(loads)} loads over the {fr.max_loads} reserved")
    head = _header(fr.machine, fr.notes, fr.notes_offset, fr.segs, loads, fr.data_offset)
    blob = head + bytes(fr.notes_offset - len(head)) + fr.notes
    blob += bytes(fr.data_offset - len(blob))
    ranges = [{"kind": s.kind, "vaddr": hex(s.vaddr + o),
               "paddr": hex(s.paddr + o) if s.paddr != ALL_ONES else hex(s.paddr),
               "size": n, "offset": d} for s, o, n, d in loads]
    elided = sum(s.size for s in fr.segs) - (pos - fr.data_offset)
    return Plan([Blob(0, blob), *items], pos, ranges, elided, stats), stats


def _scan_chunks(req: Request, fr: Frame, null_fd: int,
                 place: Callable[[int, list[tuple[int, int]] | None, Any], None]) -> None:
    """Packed copies of every chunk into /dev/null on threads, handed to place() in order.

    Each runs at the request's granule with room for every run the chunk can hold, so it
    keeps what a copy within budget at that granule keeps; place() redoes the chunks that
    need a coarser granule, or that failed (its error then says where, as in one pass).
    """
    from kcore import engine

    page = req.system.addrmap.page_size
    granule = req.granule

    slot_fd = getattr(req.source, "slot_fd", None)

    def work(k: int, _n: int, slot: int) -> tuple[list[tuple[int, int]], Any] | None:
        i, off, src, n = fr.chunks[k]
        fd = slot_fd(slot) if slot_fd is not None else req.source.fd
        try:
            runs, st, _written = engine.copy_packed(
                fd, src, null_fd, 0, n, granule=granule,
                phase=(src - off) % granule, max_runs=n // granule + 2, strict=req.strict,
                page_size=page)
        except (engine.TooManyRuns, FaultError, OSError):
            return None
        return runs, st

    def done(k: int, _n: int, _slot: int, result: Any) -> None:
        place(k, *(result if result is not None else (None, None)))

    jobs = ((k, 1) for k in range(len(fr.chunks)))
    engine.run_ordered(jobs, work, done, req.threads, req.threads + 1)


def _pack_chunk(req: Request, seg: Segment, dst_fd: int, pos: int, off: int, src: int, n: int,
                budget: int) -> tuple[list[tuple[int, int]], Any]:
    """engine.copy_packed of one chunk within budget runs, coarsening the granule as needed."""
    from kcore import engine

    granule = req.granule
    while True:
        try:
            runs, st, _written = engine.copy_packed(
                req.source.fd, src, dst_fd, pos, n, granule=granule,
                phase=(src - off) % granule, max_runs=budget, sparse=True, strict=req.strict,
                page_size=req.system.addrmap.page_size)
            return runs, st
        except engine.TooManyRuns as exc:
            # coarsen by the factor the part seen so far says is needed (at least 2), up
            # to a granule that covers the chunk (then it is one run at most)
            seen = max(sum(exc.runs[-1]) - src if exc.runs else n, 1)
            factor = max(2, -(-n // seen))
            granule = min(granule << (factor - 1).bit_length(), 1 << (n - 1).bit_length())
        except FaultError as exc:
            bad = exc.address - src + off
            where = (f"physical {seg.paddr + bad:#x}" if seg.paddr != ALL_ONES
                     else f"virtual {seg.vaddr + bad:#x}")
            reason = str(exc).rsplit(": ", 1)[-1]
            raise FaultError(f"cannot read {where} ({reason}); without --strict it is dumped "
                             f"as zeros", address=exc.address) from None


def write_packed(req: Request, out: Output, progress: Callable[[int], None] | None = None,
                 sized: Callable[[int], None] | None = None) -> tuple[Plan, Any] | None:
    """Write the compact ELF core in one pass over the source; None where it cannot apply.

    The header region (ELF header, the program headers the chunks could need, notes) stays
    a hole while each chunk's non-zero granules are copied packed after it; the headers are
    written last, from the runs the copies kept. progress(n) after each chunk; sized(total)
    once the bytes to read are known. It applies to a seekable output with zero elision on.
    """
    if not (req.elide and out.seekable):
        return None
    fr = frame(req)
    if fr is None:
        return None
    out.check_space(fr.data_offset + fr.total, estimate=True)
    if sized is not None:
        sized(fr.total)
    done, stats = pack(req, fr, out.fd, progress)
    done.scan_stats = None
    out.set_size(done.size)
    head = done.items[0]
    assert isinstance(head, Blob)
    phnum = EHDR.unpack_from(head.data)[10]
    write_all(out.fd, head.data[:EHDR.size + phnum * PHDR.size], 0)
    write_all(out.fd, fr.notes, fr.notes_offset)
    return done, stats


ESTIMATE_SAMPLES = 4096  # granules read to estimate an elided core's size (systematic sample)
ESTIMATE_BYTES = 64 << 20  # ... and at most this many bytes of them


def estimate_size(req: Request, samples: int = ESTIMATE_SAMPLES) -> tuple[int, int]:
    """(bytes, granules read): the size this request's core would take, from a sample.

    The core holds each segment's granules that are not all zeros, after the header the
    packed writer reserves; a systematic sample (every k-th granule of what the source
    holds, spread over all of it) says which share of granules holds data. Zero regions
    come in long runs (free memory never written), so an evenly spaced sample of a few
    thousand granules lands within a few percent: `kcore check` gives it at a fixed cost
    (at most 64 MiB read) whatever the RAM.
    """
    from kcore.elfcore import build_notes

    unit = req.granule or req.system.addrmap.page_size
    pieces = [(pa + poff, plen) for seg in segments(req) for _off, pa, n in seg.phys
              for poff, plen, src in source_pieces(req.source, pa, n) if src is not None]
    total = sum(n for _pa, n in pieces)
    fr = frame(req)
    if fr is not None:
        head = fr.data_offset
    else:
        notes = build_notes(req.system, "modern")
        head = -(-(EHDR.size + (2 * len(pieces) + 3) * PHDR.size + len(notes)) // unit) * unit
    count = min(samples, ESTIMATE_BYTES // unit, total // unit)
    if not count:
        return head + total, 0
    starts, at = [], 0
    for _pa, n in pieces:
        starts.append(at)
        at += n
    stride = total / count
    buf = bytearray(unit)
    zero = bytes(unit)
    data = 0
    i = 0
    for k in range(count):
        pos = int((k + 0.5) * stride)
        while i + 1 < len(pieces) and starts[i + 1] <= pos:
            i += 1
        pa, n = pieces[i]
        off = min((pos - starts[i]) // unit * unit, max(0, n - unit))
        view = memoryview(buf)[:min(unit, n)]
        req.source.readinto_phys(pa + off, view)
        data += view != zero[:len(view)]
    return head + round(total * data / count / unit) * unit, count


def header_bytes(runs: int, page: int) -> int:
    """Room the headers take around the pages -d keeps (an upper bound): the ELF header, a
    data and a zero-fill PT_LOAD a run of the source, notes (< 16 KiB)."""
    return -(-(EHDR.size + PHDR.size * (2 * runs + 3) + (16 << 10)) // page) * page


FORMAT = Format(
    "elf", "elf", plan, streamable=True, elides=True, segment_options=True, notes=True,
    one_pass=write_packed, header_bytes=header_bytes, excluded="absent", estimate=estimate_size,
    help=("(default) a compact ELF core: PT_NOTE (NT_PRSTATUS, NT_PRPSINFO, NT_TASKSTRUCT,\n"
          "VMCOREINFO) then packed PT_LOADs for RAM and kernel text with real p_vaddr and\n"
          "p_paddr, in kdump's style. Opens in drgn, crash, gdb, makedumpfile and\n"
          "Volatility 3. Zero runs are left out of the file; PT_LOADs without file bytes\n"
          "(p_filesz 0) stand for them and read as zeros. --vmalloc/--modules add those\n"
          "areas' mapped pages (System RAM only), --no-text leaves the kernel text out.")
)
