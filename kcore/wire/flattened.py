"""makedumpfile's flattened format (makedumpfile -F): a dump as (offset, size, bytes) records.

A 4096-byte header {signature "makedumpfile" in 16 bytes, type 1, version 1}, then records of
a 16-byte header {offset, buf_size} and buf_size bytes, ending with {-1, -1}; every integer
big-endian. `makedumpfile -R` (and `kcore rebuild`) writes each record's bytes at its offset.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

SIGNATURE = b"makedumpfile"
TYPE_FLAT_HEADER = 1
VERSION_FLAT_HEADER = 1
HEADER_SIZE = 4096  # MAX_SIZE_MDF_HEADER
HEADER = struct.Struct(">16sqq")
RECORD = struct.Struct(">qq")  # offset, buf_size
END_FLAG = -1
COPY_BLOCK = 1 << 20
MAX_OFFSET = 1 << 52  # larger than any dump; bounds what a hostile record makes us write
MAX_HOLES = 64 << 20  # bytes of a rebuilt file no record wrote, at most (beyond half of it)


class FlatFormatError(ValueError):
    """A flattened stream is truncated or inconsistent (the message names the offset)."""


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


def _read_exactly(read: Callable[[int], bytes], n: int, at: int, what: str) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = read(min(n - len(out), COPY_BLOCK))
        if not chunk:
            raise FlatFormatError(f"truncated {what} at offset {at:#x} "
                                  f"(needs {n:#x} bytes, the stream ends after {len(out):#x})")
        out += chunk
    return bytes(out)


def rebuild(read: Callable[[int], bytes], dst_fd: int,
            progress: Callable[[int], None] | None = None) -> int:
    """Write a flattened stream's records at their offsets in dst_fd; return the file's size.

    read(n) returns up to n bytes of the stream (b"" at its end), as os.read does on a pipe.
    """
    head = _read_exactly(read, HEADER_SIZE, 0, "flattened header")
    sig, ftype, version = HEADER.unpack_from(head)
    if sig.rstrip(b"\0") != SIGNATURE:
        raise FlatFormatError("not a flattened dump: no \"makedumpfile\" signature at offset 0x0")
    if ftype != TYPE_FLAT_HEADER or version != VERSION_FLAT_HEADER:
        raise FlatFormatError(f"unknown flattened type {ftype} / version {version} at offset 0x10")
    pos = HEADER_SIZE
    size = written = 0
    while True:
        offset, length = RECORD.unpack(_read_exactly(read, RECORD.size, pos, "record header"))
        if offset == END_FLAG:
            if size - written > max(written, MAX_HOLES):
                # a dump file is dense (headers, bitmaps, descriptors, pages): records that
                # leave most of it unwritten are not a dump (and would be hashed for hours)
                raise FlatFormatError(f"the records write {written:#x} bytes but reach offset "
                                      f"{size:#x}: most of the file would be holes")
            return size
        if offset < 0 or length <= 0 or offset + length > MAX_OFFSET:
            raise FlatFormatError(f"bad record (offset {offset:#x}, size {length:#x}) at offset "
                                  f"{pos:#x}")
        rec_at, pos = pos, pos + RECORD.size
        at = offset
        left = length
        while left:
            chunk = _read_exactly(read, min(left, COPY_BLOCK), pos, "record data")
            view = memoryview(chunk)
            while view:
                try:
                    n = os.pwrite(dst_fd, view, at)
                except OSError as exc:  # say which record was being written
                    exc.strerror = (f"{exc.strerror} (writing the record at stream offset "
                                    f"{rec_at:#x}, at {at:#x})")
                    raise
                view = view[n:]
                at += n
            pos += len(chunk)
            left -= len(chunk)
            if progress is not None:
                progress(len(chunk))
        size = max(size, offset + length)
        written += length
