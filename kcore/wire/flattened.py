"""makedumpfile's flattened format (makedumpfile -F): a dump as (offset, size, bytes) records.

A 4096-byte header {signature "makedumpfile" in 16 bytes, type 1, version 1}, then records of
a 16-byte header {offset, buf_size} and buf_size bytes, ending with {-1, -1}; every integer
big-endian. `makedumpfile -R` (and `kcore rebuild`) writes each record's bytes at its offset.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from kcore.wire import LayoutError

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


class FlatFormatError(LayoutError):
    """A flattened stream is truncated or inconsistent: its stream offset and field."""


def file_header() -> bytes:
    """The flattened file's header block."""
    return HEADER.pack(SIGNATURE, TYPE_FLAT_HEADER, VERSION_FLAT_HEADER).ljust(HEADER_SIZE, b"\0")


def is_flattened(head: bytes) -> bool:
    """Whether a file's first bytes are a flattened header."""
    if len(head) < HEADER.size:
        return False
    sig, ftype, _version = HEADER.unpack_from(head)
    return bool(sig.rstrip(b"\0") == SIGNATURE and ftype == TYPE_FLAT_HEADER)


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
            raise FlatFormatError(at, what, "truncated", f"truncated {what} at offset {at:#x} "
                                  f"(needs {n:#x} bytes, the stream ends after {len(out):#x})")
        out += chunk
    return bytes(out)


def walk(read: Callable[[int], bytes], place: Callable[[int, memoryview, int], None],
         progress: Callable[[int], None] | None = None) -> tuple[int, int, int]:
    """Check a flattened stream record by record, handing each record's bytes to
    place(offset in the dump, bytes, stream offset of the record); return the rebuilt dump's
    size, the number of records and the stream bytes up to the end marker.

    read(n) returns up to n bytes of the stream (b"" at its end), as os.read does on a pipe.
    """
    head = _read_exactly(read, HEADER_SIZE, 0, "flattened header")
    sig, ftype, version = HEADER.unpack_from(head)
    if sig.rstrip(b"\0") != SIGNATURE:
        raise FlatFormatError(0, "signature", "not makedumpfile", "not a flattened dump: no "
                              "\"makedumpfile\" signature at offset 0x0")
    if ftype != TYPE_FLAT_HEADER or version != VERSION_FLAT_HEADER:
        raise FlatFormatError(16, "type", "unknown", f"unknown flattened type {ftype} / "
                              f"version {version} at offset 0x10")
    pos = HEADER_SIZE
    size = written = records = 0
    while True:
        offset, length = RECORD.unpack(_read_exactly(read, RECORD.size, pos, "record header"))
        if offset == END_FLAG:
            if size - written > max(written, MAX_HOLES):
                # a dump file is dense (headers, bitmaps, descriptors, pages): records that
                # leave most of it unwritten are not a dump (and would be hashed for hours)
                raise FlatFormatError(pos, "offset", "mostly holes", f"the records write "
                                      f"{written:#x} bytes but reach offset {size:#x}: most of "
                                      f"the file would be holes")
            return size, records, pos + RECORD.size
        if offset < 0 or length <= 0 or offset + length > MAX_OFFSET:
            raise FlatFormatError(pos, "offset" if offset < 0 or length > 0 else "buf_size",
                                  "out of range", f"bad record (offset {offset:#x}, size "
                                  f"{length:#x}) at offset {pos:#x}")
        records += 1
        rec_at, pos = pos, pos + RECORD.size
        at = offset
        left = length
        while left:
            chunk = _read_exactly(read, min(left, COPY_BLOCK), pos, "record data")
            place(at, memoryview(chunk), rec_at)
            at += len(chunk)
            pos += len(chunk)
            left -= len(chunk)
            if progress is not None:
                progress(len(chunk))
        size = max(size, offset + length)
        written += length


def rebuild(read: Callable[[int], bytes], dst_fd: int,
            progress: Callable[[int], None] | None = None) -> int:
    """Write a flattened stream's records at their offsets in dst_fd; return the file's size."""
    def place(at: int, view: memoryview, rec_at: int) -> None:
        while view:
            try:
                n = os.pwrite(dst_fd, view, at)
            except OSError as exc:  # say which record was being written
                exc.strerror = (f"{exc.strerror} (writing the record at stream offset "
                                f"{rec_at:#x}, at {at:#x})")
                raise
            view = view[n:]
            at += n

    return walk(read, place, progress)[0]
