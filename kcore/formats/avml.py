"""avml: AVML's compressed LiME (Volatility 3's AVMLLayer, avml-convert), snappy on threads.

The RAM ranges, zero runs left out as for lime, are cut into blocks of at most BLOCK bytes;
each block is read and snappy-framed on req.threads threads (C, without the GIL): header,
framed stream, stream size. A file gets the frames in place as they come and each header last;
a stream (-o -) gets it all in order, the frames of a block held until its header is known.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from kcore import codecs
from kcore.formats import Format
from kcore.formats.kdump import Compression
from kcore.formats.plan import Plan, Request
from kcore.formats.segments import ram_segments
from kcore.formats.write import hash_copy, hash_file
from kcore.formats.zeroruns import split_segments
from kcore.wire import avml

BLOCK = 4 << 20  # bytes of memory per AVML block (and per job)
MAX_RANGES = 1 << 20
MAX_SLOTS = 12
SLACK = 64  # a block's stream is at least this much shorter than its memory (Volatility)
MAX_PENDING = 16 << 20  # frames held back at most, waiting for compressible pieces


def blocks(req: Request) -> tuple[list[tuple[int, int]], int, Any]:
    """(physical start, length) blocks to write, the bytes of zero runs left out, scan stats."""
    segs = ram_segments(req.system)
    elided, stats = 0, None
    if req.elide:
        segs, elided, stats = split_segments(req, segs, MAX_RANGES)
    out = []
    for s in segs:
        for off in range(0, s.size, BLOCK):
            out.append((s.paddr + off, min(BLOCK, s.size - off)))
    return out, elided, stats


def write(req: Request, out: Any, progress: Callable[[int], None] | None = None) -> tuple[
        Plan, Any]:
    """Write the AVML image of req to out (sequentially: a file or a stream)."""
    from kcore import engine

    codecs.get("snappy")  # the library must load: an error says what to install
    todo, elided, scan = blocks(req)
    threads = max(1, req.threads)
    depth = min(MAX_SLOTS, threads + 2)
    bound = codecs.snappy_frame_bound(BLOCK)
    slots = [(bytearray(BLOCK), bytearray(bound)) for _ in range(depth)]
    stats = engine.CopyStats()
    pos = 0
    ranges: list[dict[str, Any]] = []
    if out.seekable:
        out.check_space(sum(n for _p, n in todo) * 2 + len(todo) * 64, estimate=True)
        out.start_digest()

    def put(data: bytes | bytearray | memoryview) -> None:
        nonlocal pos
        if out.hasher is not None and not direct:
            hash_copy(out.hasher, data)
        view = memoryview(data)
        while view:
            n = os.pwrite(out.fd, view, pos) if out.seekable else os.write(out.fd, view)
            view = view[n:]
            pos += n

    def work(j: int, _n: int, slot: int) -> tuple[Any, int]:
        paddr, n = todo[j]
        src, dst = slots[slot]
        view = memoryview(src)[:n]
        st = req.source.readinto_phys(paddr, view, strict=req.strict)
        return st, codecs.snappy_frame(view, dst)

    # A block waits (its frames copied) while its stream is not smaller than its memory, and
    # takes in the next contiguous pieces until it is: Volatility's AVMLLayer reads a block's
    # stream from the first end - start bytes after its header, and loops for ever on one
    # longer than that (an incompressible block: compressed data, random pages).
    pending = {"start": 0, "length": 0, "stream": 0, "offset": 0}
    frames: list[bytes] = []  # copies of the pending pieces' frames (exact sizes)
    # A seekable file takes each piece's frames where they belong at once, and its block's
    # header last, in the room kept for it: no copies (its digest then reads it back).
    direct = out.seekable
    head = len(avml.block_header(0, 1)) + len(avml.STREAM_IDENTIFIER)

    def flush() -> None:
        nonlocal pos
        if not pending["length"]:
            return
        ranges.append({"kind": "ram", "paddr": hex(pending["start"]),
                       "size": pending["length"], "offset": pending["offset"]})
        trailer = avml.TRAILER.pack(len(avml.STREAM_IDENTIFIER) + pending["stream"])
        if direct:
            end = pos
            pos = pending["offset"]
            put(avml.block_header(pending["start"], pending["length"]) + avml.STREAM_IDENTIFIER)
            pos = end
            put(trailer)
        else:
            put(avml.block_header(pending["start"], pending["length"]))
            put(avml.STREAM_IDENTIFIER)
            for piece in frames:
                put(piece)
            put(trailer)
        pending["length"] = pending["stream"] = 0
        frames.clear()

    def done(j: int, _n: int, slot: int, res: tuple[Any, int]) -> None:
        nonlocal stats, pos
        st, used = res
        paddr, n = todo[j]
        stats += st
        if pending["length"] and pending["start"] + pending["length"] != paddr:
            flush()  # not contiguous: a block of its own whatever its stream
        if not pending["length"]:
            pending["start"], pending["offset"] = paddr, pos
            if direct:
                pos += head  # the header's room
        if direct:
            put(memoryview(slots[slot][1])[:used])
        else:
            frames.append(bytes(memoryview(slots[slot][1])[:used]))
        pending["length"] += n
        pending["stream"] += used
        stream = len(avml.STREAM_IDENTIFIER) + pending["stream"]
        if stream + SLACK <= pending["length"] or pending["stream"] >= MAX_PENDING:
            flush()
        if progress is not None:
            progress(n)

    engine.run_ordered(((j, 1) for j in range(len(todo))), work, done, threads, depth)
    flush()
    if direct and out.hasher is not None:
        hash_file(out.hasher, out.fd, pos)
    stats.bytes_written = pos
    result = Compression("snappy", sum(n for _p, n in todo), pos, library="libsnappy.so.1")
    return Plan([], pos, ranges, elided, scan, compression=result.as_dict()), stats


FORMAT = Format(
    "avml", "avml", write=write, streamable=True, elides=True, excluded="absent",
    help="AVML's compressed LiME (version 2): per block of RAM a header, its bytes\n"
         "snappy-framed, their size; zero runs left out. Opens in Volatility 3 (AVMLLayer,\n"
         "with libsnappy) and avml-convert; snappy runs on the --threads.")
