"""AVML's compressed LiME (version 2): per block a LiME-style header, a snappy stream, its size.

Each block: a 32-byte header {magic "AVML" (0x4C4D5641 little-endian), version 2, start,
inclusive end, 8 reserved bytes}; then the block's bytes in snappy's framing format (stream
identifier, then chunks of at most 64 KiB, each compressed or stored, with a masked CRC-32C);
then the length of that framed stream as a little-endian u64. Volatility 3's AVMLLayer and
avml-convert read it.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

from kcore.wire import LayoutError

AVML_MAGIC = 0x4C4D5641
AVML_VERSION = 2
HEADER = struct.Struct("<IIQQ8s")  # magic, version, start, end (inclusive), reserved
TRAILER = struct.Struct("<Q")  # bytes of the framed snappy stream before it
STREAM_IDENTIFIER = b"\xff\x06\x00\x00sNaPpY"  # framing_format.txt, chunk type 0xff


def block_header(start: int, length: int) -> bytes:
    """The header of a block holding physical [start, start+length)."""
    return HEADER.pack(AVML_MAGIC, AVML_VERSION, start, start + length - 1, bytes(8))


WINDOW = 8 << 20  # compressed bytes read at once (a chunk is at most ~76 KiB)
MAX_BLOCKS = 1 << 22


def walk(read: Callable[[int, int], bytes], size: int,
         sink: Callable[[memoryview, int], None]) -> list[tuple[int, int, int]]:
    """Check and decompress every block of an AVML file of size bytes, read(offset, length)
    giving its bytes: each block's header, snappy stream (CRC-32C of every chunk) and trailer.
    sink(data, offset) receives the decompressed bytes at their offset in the unpacked image
    (the blocks' bytes one after the other). Returns (start, length, offset) per block;
    LayoutError at the first thing that makes no sense."""
    from kcore import codecs  # here: only an AVML file being read needs the codecs

    if size == 0:
        raise LayoutError(0, "magic", "empty file", "empty file at offset 0x0")
    blocks: list[tuple[int, int, int]] = []
    window = bytearray(WINDOW)
    dst = bytearray(WINDOW)
    pos = at = 0
    while pos < size:
        if len(blocks) >= MAX_BLOCKS:
            raise LayoutError(pos, "magic", "too many blocks",
                              f"more than {MAX_BLOCKS} blocks at offset {pos:#x}")
        head = read(pos, HEADER.size)
        if len(head) < HEADER.size:
            raise LayoutError(pos, "magic", "truncated",
                              f"truncated AVML header at offset {pos:#x}")
        magic, version, start, end, _ = HEADER.unpack(head)
        if magic != AVML_MAGIC or version != AVML_VERSION:
            raise LayoutError(pos, "magic" if magic != AVML_MAGIC else "version", "not AVML",
                              f"not an AVML block (magic {magic:#x}, version {version}) at "
                              f"offset {pos:#x}")
        if end < start:
            raise LayoutError(pos + 16, "end", "below start", f"block end {end:#x} below its "
                              f"start {start:#x} at offset {pos:#x}")
        length = end - start + 1  # the end is inclusive, as in LiME's header
        stream = cur = pos + HEADER.size
        left, out_at = length, at
        while left:
            data = read(cur, WINDOW)
            window[:len(data)] = data
            rc, got, used = codecs.snappy_unframe(memoryview(window)[:len(data)],
                                                  memoryview(dst)[:min(left, len(dst))])
            if rc:
                why = "CRC mismatch" if rc == -errno.EBADMSG else "corrupt chunk"
                raise LayoutError(cur + used, "snappy stream", why, f"{why} in the snappy "
                                  f"stream at offset {cur + used:#x}")
            if got == 0 and used == 0:
                raise LayoutError(cur, "snappy stream", "truncated", f"truncated snappy stream "
                                  f"at offset {cur:#x} (block at {pos:#x} needs {left:#x} more "
                                  f"bytes)")
            sink(memoryview(dst)[:got], out_at)
            out_at += got
            left -= got
            cur += used
        trailer = read(cur, TRAILER.size)
        if len(trailer) < TRAILER.size:
            raise LayoutError(cur, "trailer", "truncated",
                              f"truncated block trailer at offset {cur:#x}")
        (stream_len,) = TRAILER.unpack(trailer)
        if stream_len != cur - stream:
            raise LayoutError(cur, "trailer", "not the stream's length", f"block trailer at "
                              f"offset {cur:#x} says {stream_len:#x} stream bytes, the stream "
                              f"has {cur - stream:#x}")
        blocks.append((start, length, at))
        at += length
        pos = cur + TRAILER.size
    return blocks
