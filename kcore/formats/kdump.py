"""kdump: makedumpfile's kdump-compressed format, each page compressed (crash, drgn, libkdumpfile).

The pages written are the plan's runs of pages to keep (`keep_runs`): every RAM page today;
an exclusion applied in planning (dump levels) shrinks those runs, and so the dumpable bitmap
and the descriptors, with nothing else to change here. The RAM ranges are the first bitmap.
All-zero pages share one descriptor pointing at a single zero page, as makedumpfile's do;
pages that do not shrink are stored raw (flags 0).

Batches of pages are read and compressed on req.threads threads (the C calls run without the
GIL) and written in order: descriptors at their place, data one batch after another. A
seekable output gets the file itself; a stream (-o -) gets makedumpfile's flattened format.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kcore import codecs
from kcore.errors import OutputError
from kcore.formats import Format
from kcore.formats.plan import Plan, Request
from kcore.formats.segments import ram_segments, source_pieces
from kcore.formats.write import hash_file
from kcore.wire import diskdump, flattened

BATCH_PAGES = 512  # pages read and compressed per job (2 MiB of 4 KiB pages)
MAX_SLOTS = 12  # jobs in flight at most: bounds the buffers (~5 MiB a slot)


def keep_runs(req: Request) -> list[tuple[int, int]]:
    """(first PFN, count) runs of the pages to dump: the RAM pages the source holds.

    A dump level enters as a source view holding only the kept pages (kcore.dumplevel), so
    its exclusions leave these runs, the dumpable bitmap and the descriptors, by themselves.
    """
    page = req.system.addrmap.page_size
    spans = sorted((pa // page, -(-(pa + n) // page))
                   for s in ram_segments(req.system)
                   for off, n, src in source_pieces(req.source, s.paddr, s.size)
                   if src is not None for pa in (s.paddr + off,))
    return _merged(spans)


def ram_runs(req: Request) -> list[tuple[int, int]]:
    """(first PFN, count) runs of the RAM ranges' pages (the first bitmap)."""
    from kcore.dumplevel import below_source_end

    page = req.system.addrmap.page_size
    ram = below_source_end([(s.paddr, s.size) for s in ram_segments(req.system)],
                           req.system.source)
    return _merged(sorted((pa // page, -(-(pa + n) // page)) for pa, n in ram))


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first, count) runs of sorted [lo, hi) spans, overlapping or touching ones merged."""
    runs: list[tuple[int, int]] = []
    for lo, hi in spans:
        if runs and lo <= runs[-1][0] + runs[-1][1]:
            first, n = runs[-1]
            runs[-1] = (first, max(first + n, hi) - first)
        elif hi > lo:
            runs.append((lo, hi - lo))
    return runs


class FileSink:
    """Writes at offsets of a seekable file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def put(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write data at offset."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def close(self) -> int:
        """Nothing to end; the bytes written beyond the data (0)."""
        return 0


class FlatSink:
    """Writes makedumpfile's flattened format to a stream: each put() is one record."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.bytes = 0
        self._write(flattened.file_header())

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.bytes += n

    def put(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """One record: data to place at offset."""
        if len(data):
            self._write(flattened.record(offset, len(data)))
            self._write(data)

    def close(self) -> int:
        """Write the end record; the stream's total size."""
        self._write(flattened.end_record())
        return self.bytes


def utsname(system: Any) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
    """new_utsname for the header: release and version as the kernel's banner says them.

    libkdumpfile takes the header's utsname (and from it the architecture) only when
    release, version and machine are all set.
    """
    def text(rel: str) -> bytes:
        try:
            return (Path(system.root) / rel).read_bytes().strip()[:64]
        except OSError:
            return b""

    release = (system.osrelease or "").encode()[:64]
    version = text("proc/sys/kernel/version") or banner_version(system) or b"#1"
    machine = getattr(system.addrmap, "arch", "x86_64").encode()
    return (b"Linux", text("proc/sys/kernel/hostname"), release, version[:64], machine,
            b"(none)")


def banner_version(system: Any) -> bytes | None:
    """utsname()->version from linux_banner in memory ("Linux version R (...) (...) VERSION")."""
    addr = system.symbols.get("linux_banner")
    if addr is None:
        return None
    try:
        data, _st = system.source.read_phys(system.addrmap.pa_symbol(addr), 512)
    except Exception:  # noqa: BLE001 - the banner is a nicety: any failure means none
        return None
    line = data.split(b"\n", 1)[0].split(b"\0", 1)[0]
    at = line.find(b" #")
    return line[at + 1:] if at >= 0 else None


@dataclass
class Compression:
    """What a compressed dump did: the codec, bytes in, bytes out."""

    codec: str
    input_bytes: int
    output_bytes: int
    zero_pages: int = 0
    raw_pages: int = 0
    library: str | None = None  # the shared library that compressed

    @property
    def ratio(self) -> float:
        """input / output (how many times smaller the dump is than the memory it holds)."""
        return round(self.input_bytes / self.output_bytes, 3) if self.output_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        """For the summary, --json and the manifest."""
        return {"codec": self.codec, "input_bytes": self.input_bytes,
                "output_bytes": self.output_bytes, "ratio": self.ratio,
                "zero_pages": self.zero_pages, "raw_pages": self.raw_pages,
                "library": self.library}


def write(req: Request, out: Any, progress: Callable[[int], None] | None = None) -> tuple[
        Plan, Any]:
    """Write the kdump-compressed dump of req to out (flattened when out cannot seek)."""
    from kcore import engine
    from kcore.elfcore import build_notes
    from kcore.symbols import elf_notes as symbol_notes

    codec = codecs.get(req.compress)
    system = req.system
    page = system.addrmap.page_size
    keep = keep_runs(req)
    if not keep:
        raise OutputError("nothing to dump: the kclist has no RAM ranges")
    present = ram_runs(req)  # bitmap 1: the RAM pages (kept or not)
    max_mapnr = max(first + n for first, n in present)
    npages = sum(n for _f, n in keep)
    notes = build_notes(system, "modern")
    # kcore's symbol notes go after the notes size_note counts, in the sub header blocks
    # that every reader jumps past (to the bitmaps): kcore.symbols finds them there
    kept = symbol_notes(req.symbols) if req.symbols is not None else b""
    geo = diskdump.Geometry.of(page, max_mapnr, len(notes) + len(kept), npages)
    vi_off, vi_size = diskdump.vmcoreinfo_span(notes)
    now = time.time()
    header = diskdump.DiskDumpHeader(
        block_size=page, sub_hdr_size=geo.sub_hdr_size, bitmap_blocks=geo.bitmap_blocks,
        max_mapnr=max_mapnr, status=codecs.flag(codec), nr_cpus=1, utsname=utsname(system),
        # tv_usec 0: libkdumpfile tries the 32-bit header layout first, whose block_size
        # sits where tv_usec does; a value in the page-size range would be taken for one.
        timestamp=(int(now), 0))
    sub = diskdump.SubHeader(
        phys_base=getattr(system.addrmap, "phys_base", 0) or 0, dump_level=req.dump_level or 0,
        offset_vmcoreinfo=geo.notes_offset + vi_off if vi_size else 0, size_vmcoreinfo=vi_size,
        offset_note=geo.notes_offset, size_note=len(notes), max_mapnr=max_mapnr)
    head = bytearray(header.pack().ljust(page, b"\0"))
    head += sub.pack() + notes + kept
    head += bytes(geo.bitmap_offset - len(head))

    seekable = out.seekable
    if seekable:
        # the bound stores every kept page whole; compressed, a dump of most kernels' memory
        # is a fraction of it, so only the headers must fit before it starts
        out.check_space(geo.data_offset + page + npages * page, estimate=True,
                        least=geo.data_offset + page if codec.name != "none" else None)
    sink: FileSink | FlatSink = FileSink(out.fd) if seekable else FlatSink(out.fd)
    sink.put(0, head)
    # one bitmap at a time (32 MiB each for 1 TiB of RAM)
    sink.put(geo.bitmap_offset, diskdump.bitmap_of(present, geo.bitmap_len))
    sink.put(geo.bitmap_offset + geo.bitmap_len, diskdump.bitmap_of(keep, geo.bitmap_len))
    zero_offset = geo.data_offset
    sink.put(zero_offset, bytes(page))  # the one page every zero page's descriptor points at

    batches: dict[int, list[tuple[int, int]]] = {}  # the (first PFN, pages) runs of a batch

    def jobs() -> Iterator[tuple[int, int]]:
        """(batch number, pages) of each batch, made as they are taken (bounded memory).

        A batch joins runs up to BATCH_PAGES pages: -d leaves many short runs, and a job
        for each would cost more in thread handoffs than its pages do in compression.
        """
        pieces: list[tuple[int, int]] = []
        m = number = 0
        for first, n in keep:
            while n:
                take = min(n, BATCH_PAGES - m)
                pieces.append((first, take))
                first, n, m = first + take, n - take, m + take
                if m == BATCH_PAGES:
                    batches[number] = pieces
                    yield number, m
                    pieces, m, number = [], 0, number + 1
        if m:
            batches[number] = pieces
            yield number, m

    next_desc = 0  # descriptors are written in batch order: the next one's index
    threads = max(1, req.threads)
    depth = min(MAX_SLOTS, threads + 2)
    bound = codecs.compress_bound(BATCH_PAGES, page)
    slots = [(bytearray(BATCH_PAGES * page), bytearray(bound),
              bytearray(BATCH_PAGES * codecs.PAGE_DESC_SIZE)) for _ in range(depth)]
    stats = engine.CopyStats()
    data_pos = zero_offset + page
    result = Compression(codec.name, npages * page, 0, library=codecs.library(codec))

    def work(number: int, m: int, slot: int) -> tuple[Any, int]:
        src, dst, descs = slots[slot]
        view = memoryview(src)[:m * page]
        st = engine.CopyStats()
        at = 0
        for pfn, n in batches[number]:
            st += req.source.readinto_phys(pfn * page, view[at:at + n * page], strict=req.strict)
            at += n * page
        return st, codecs.compress_pages(codec, view, m, page, dst, descs)

    def done(number: int, m: int, slot: int, res: tuple[Any, int]) -> None:
        nonlocal data_pos, stats, next_desc
        del batches[number]
        st, used = res
        first_desc = next_desc
        next_desc += m
        _src, dst, descs = slots[slot]
        stats += st
        codecs.rebase(descs, m, data_pos, zero_offset)
        sink.put(geo.desc_offset + first_desc * codecs.PAGE_DESC_SIZE,
                 memoryview(descs)[:m * codecs.PAGE_DESC_SIZE])
        sink.put(data_pos, memoryview(dst)[:used])
        _count(result, descs, m, zero_offset, page)
        data_pos += used
        if progress is not None:
            progress(m * page)

    engine.run_ordered(jobs(), work, done, threads, depth)
    stats.bytes_written = data_pos
    extra = sink.close()
    size = data_pos if seekable else extra
    result.output_bytes = size
    ranges = [{"kind": "ram", "paddr": hex(first * page), "size": n * page}
              for first, n in keep]
    if seekable:
        out.start_digest()  # descriptors land behind the data: the digest reads the file back
        if out.hasher is not None:
            hash_file(out.hasher, out.fd, size)
    return Plan([], size, ranges, compression=result.as_dict()), stats


def _count(result: Compression, descs: bytearray, m: int, zero_offset: int, page: int) -> None:
    """Count a batch's zero pages and raw pages (from its descriptors)."""
    view = memoryview(descs)[:m * codecs.PAGE_DESC_SIZE].cast("Q")
    # each descriptor is 3 quadwords: offset, size | flags << 32, page_flags
    offsets = view[0::3]
    sizes = view[1::3]
    result.zero_pages += offsets.tolist().count(zero_offset)
    raw = page  # flags 0 and size == page: stored raw (or the zero page)
    result.raw_pages += sizes.tolist().count(raw) - offsets.tolist().count(zero_offset)


FORMAT = Format(
    "kdump", "kdump", write=write, streamable=True, compresses=True, notes=True,
    excluded="absent",
    help="makedumpfile's kdump-compressed format: each page compressed (--compress zstd,\n"
         "lzo, snappy, zlib or none; default zstd), zero pages sharing one descriptor.\n"
         "Opens in crash, drgn, libkdumpfile and makedumpfile. -o - writes makedumpfile's\n"
         "flattened format (makedumpfile -R or kcore rebuild turn it into the file).")
