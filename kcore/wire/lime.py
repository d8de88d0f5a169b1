"""LiME images on the wire: per physical range a 32-byte header, then the range's bytes.

struct lime_mem_range_header (LiME's src/lime.h): magic, version 1, s_addr, e_addr
(inclusive), 8 reserved bytes. The one home of the layout: kcore.formats.lime writes it,
kcore.sources.lime reads it.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

LIME_MAGIC = 0x4C694D45  # "EMiL" little-endian
LIME_VERSION = 1
AVML_MAGIC = 0x4C4D5641  # "AVML": AVML's compressed variant of the same header
HEADER = struct.Struct("<IIQQ8s")  # magic, version, s_addr, e_addr (inclusive), reserved[8]
# More ranges than any real machine has (iomem System RAM lines); bounds a hostile file's cost.
MAX_RANGES = 1 << 20


class RangeHeader(NamedTuple):
    """One range header: the range is [s_addr, e_addr] (inclusive)."""

    magic: int
    version: int
    s_addr: int
    e_addr: int


def pack_header(start: int, length: int) -> bytes:
    """The LiME header of the physical range [start, start+length)."""
    return HEADER.pack(LIME_MAGIC, LIME_VERSION, start, start + length - 1, bytes(8))


def unpack_header(data: bytes) -> RangeHeader:
    """Unpack HEADER.size bytes of a range header."""
    magic, version, s_addr, e_addr, _reserved = HEADER.unpack(data)
    return RangeHeader(magic, version, s_addr, e_addr)
