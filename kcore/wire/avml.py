"""AVML's compressed LiME (version 2): per block a LiME-style header, a snappy stream, its size.

Each block: a 32-byte header {magic "AVML" (0x4C4D5641 little-endian), version 2, start,
inclusive end, 8 reserved bytes}; then the block's bytes in snappy's framing format (stream
identifier, then chunks of at most 64 KiB, each compressed or stored, with a masked CRC-32C);
then the length of that framed stream as a little-endian u64. Volatility 3's AVMLLayer and
avml-convert read it.
"""

from __future__ import annotations

import struct

AVML_MAGIC = 0x4C4D5641
AVML_VERSION = 2
HEADER = struct.Struct("<IIQQ8s")  # magic, version, start, end (inclusive), reserved
TRAILER = struct.Struct("<Q")  # bytes of the framed snappy stream before it
STREAM_IDENTIFIER = b"\xff\x06\x00\x00sNaPpY"  # framing_format.txt, chunk type 0xff


def block_header(start: int, length: int) -> bytes:
    """The header of a block holding physical [start, start+length)."""
    return HEADER.pack(AVML_MAGIC, AVML_VERSION, start, start + length - 1, bytes(8))
