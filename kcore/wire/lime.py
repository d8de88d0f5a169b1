"""LiME images on the wire: per physical range a 32-byte header, then the range's bytes.

struct lime_mem_range_header (LiME's src/lime.h): magic, version 1, s_addr, e_addr
(inclusive), 8 reserved bytes. The one home of the layout: kcore.formats.lime writes it,
kcore.sources.lime and `kcore verify` read it with walk().
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from kcore.wire import LayoutError
from kcore.wire.avml import AVML_MAGIC as AVML_MAGIC  # its compressed variant of the header

LIME_MAGIC = 0x4C694D45  # "EMiL" little-endian
LIME_VERSION = 1
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


WINDOW = 64 << 10  # bytes read at a time while walking the range headers


def walk(read: Callable[[int, int], bytes], size: int) -> list[tuple[int, int, int]]:
    """The (s_addr, length, data offset) of every range of a LiME file of size bytes, its
    headers chained to the end of the file; read(offset, length) gives the file's bytes.
    Raises LayoutError at the first header that makes no sense."""
    if size == 0:
        raise LayoutError(0, "magic", "empty file", "empty file at offset 0x0")
    ranges: list[tuple[int, int, int]] = []
    pos = 0
    # Headers are read through a window of the file: a million small ranges cost a few
    # dozen reads, not a million.
    window, window_at = b"", 0
    while pos < size:
        if len(ranges) >= MAX_RANGES:
            raise LayoutError(pos, "magic", "too many ranges",
                              f"more than {MAX_RANGES} ranges at offset {pos:#x}")
        if not window_at <= pos <= window_at + len(window) - HEADER.size:
            window, window_at = read(pos, min(WINDOW, size - pos)), pos
            if len(window) < HEADER.size:
                raise LayoutError(pos, "magic", "truncated",
                                  f"truncated LiME range header at offset {pos:#x}")
        at = pos - window_at
        magic, version, s_addr, e_addr = unpack_header(window[at:at + HEADER.size])
        if magic == AVML_MAGIC:
            raise LayoutError(pos, "magic", "AVML", f"AVML-compressed image (magic {magic:#x}, "
                              f"version {version}) at offset {pos:#x}")
        if magic != LIME_MAGIC:
            raise LayoutError(pos, "magic", "bad", f"bad LiME magic {magic:#x} at offset "
                                                  f"{pos:#x}")
        if version != LIME_VERSION:
            raise LayoutError(pos + 4, "version", "unsupported", f"unsupported LiME version "
                                                                 f"{version} at offset {pos:#x}")
        if e_addr < s_addr:
            raise LayoutError(pos + 16, "e_addr", "below s_addr", f"range end {e_addr:#x} "
                              f"below its start {s_addr:#x} at offset {pos:#x}")
        length = e_addr - s_addr + 1
        data = pos + HEADER.size
        if data + length > size:
            raise LayoutError(pos + 16, "e_addr", "past the end of the file",
                              f"truncated range {s_addr:#x}-{e_addr:#x} at offset {pos:#x} "
                              f"(needs {length:#x} bytes at {data:#x}, file ends at {size:#x})")
        ranges.append((s_addr, length, data))
        pos = data + length
    return ranges
