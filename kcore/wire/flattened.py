"""makedumpfile's flattened format (makedumpfile -F): a dump as (offset, size, bytes) records.

A 4096-byte header {signature "makedumpfile" in 16 bytes, type 1, version 1}, then records of
a 16-byte header {offset, buf_size} and buf_size bytes, ending with {-1, -1}; every integer
big-endian. `makedumpfile -R` (and `kcore rebuild`) writes each record's bytes at its offset.
"""

from __future__ import annotations

import struct

SIGNATURE = b"makedumpfile"
TYPE_FLAT_HEADER = 1
VERSION_FLAT_HEADER = 1
HEADER_SIZE = 4096  # MAX_SIZE_MDF_HEADER
HEADER = struct.Struct(">16sqq")
RECORD = struct.Struct(">qq")  # offset, buf_size
END_FLAG = -1


def file_header() -> bytes:
    """The flattened file's header block."""
    return HEADER.pack(SIGNATURE, TYPE_FLAT_HEADER, VERSION_FLAT_HEADER).ljust(HEADER_SIZE, b"\0")


def is_flattened(head: bytes) -> bool:
    """Whether a file's first bytes are a flattened header."""
    if len(head) < HEADER.size:
        return False
    sig, ftype, _version = HEADER.unpack_from(head)
    return sig.rstrip(b"\0") == SIGNATURE and ftype == TYPE_FLAT_HEADER


def record(offset: int, size: int) -> bytes:
    """A record header: size bytes to place at offset follow it."""
    return RECORD.pack(offset, size)


def end_record() -> bytes:
    """The record that ends a flattened file."""
    return RECORD.pack(END_FLAG, END_FLAG)
