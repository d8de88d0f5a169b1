"""AVML images (compressed LiME, version 2) as sources: unpacked once into a temporary file."""

from __future__ import annotations

import os

from kcore.errors import LimeFormatError
from kcore.sources.base import Extent, MemorySource, Probe, check_extents
from kcore.sources.files import file_size, open_readonly, pread_full
from kcore.sources.kdump import temp_file
from kcore.wire import avml

WINDOW = 8 << 20  # compressed bytes read at once (a chunk is at most ~76 KiB)
MAX_BLOCKS = 1 << 22


class AvmlSource(MemorySource):
    """An AVML image: each block's snappy stream decompressed into a temporary raw file."""

    kind = "avml"

    @classmethod
    def open(cls, path: str, spec: str | None = None, root: str = "/") -> AvmlSource:
        """Open an AVML image and unpack it."""
        fd = open_readonly(path)
        out = -1
        try:
            out = temp_file(path)
            extents = unpack(fd, path, out)
            return cls(spec or f"avml:{path}", path, out,
                       check_extents(extents, path, LimeFormatError))
        except BaseException:
            if out >= 0:
                os.close(out)
            raise
        finally:
            os.close(fd)

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        """AVML's magic and version 2 at offset 0."""
        if len(probe.head) < 8:
            return False
        magic, version = avml.HEADER.unpack_from(probe.head.ljust(avml.HEADER.size, b"\0"))[:2]
        return magic == avml.AVML_MAGIC and version == avml.AVML_VERSION


def unpack(fd: int, path: str, out: int) -> list[Extent]:
    """Decompress every block of the AVML file at fd into out; return the extents."""
    from kcore import codecs  # here: only an AVML file being read needs the codecs

    size = file_size(fd)
    if size == 0:
        raise LimeFormatError(f"{path}: empty file at offset 0x0")
    extents: list[Extent] = []
    window = bytearray(WINDOW)
    dst = bytearray(WINDOW)
    pos = 0
    at = 0
    while pos < size:
        if len(extents) >= MAX_BLOCKS:
            raise LimeFormatError(f"{path}: more than {MAX_BLOCKS} blocks at offset {pos:#x}")
        head = pread_full(fd, avml.HEADER.size, pos)
        if len(head) < avml.HEADER.size:
            raise LimeFormatError(f"{path}: truncated AVML header at offset {pos:#x}")
        magic, version, start, end, _ = avml.HEADER.unpack(head)
        if magic != avml.AVML_MAGIC or version != avml.AVML_VERSION:
            raise LimeFormatError(f"{path}: not an AVML block (magic {magic:#x}, version "
                                  f"{version}) at offset {pos:#x}")
        if end < start:
            raise LimeFormatError(f"{path}: block end {end:#x} below its start {start:#x} at "
                                  f"offset {pos:#x}")
        length = end - start + 1
        stream = pos + avml.HEADER.size
        cur = stream
        left = length
        out_at = at
        while left:
            data = pread_full(fd, WINDOW, cur)
            window[:len(data)] = data
            want = min(left, len(dst))
            rc, got, used = codecs.snappy_unframe(memoryview(window)[:len(data)],
                                                  memoryview(dst)[:want])
            if rc:
                why = "CRC mismatch" if rc == -74 else "corrupt chunk"  # EBADMSG
                raise LimeFormatError(f"{path}: {why} in the snappy stream at offset "
                                      f"{cur + used:#x}")
            if got == 0 and used == 0:
                raise LimeFormatError(f"{path}: truncated snappy stream at offset {cur:#x} "
                                      f"(block at {pos:#x} needs {left:#x} more bytes)")
            _pwrite_nonzero(out, memoryview(dst)[:got], out_at)
            out_at += got
            left -= got
            cur += used
        trailer = pread_full(fd, avml.TRAILER.size, cur)
        if len(trailer) < avml.TRAILER.size:
            raise LimeFormatError(f"{path}: truncated block trailer at offset {cur:#x}")
        (stream_len,) = avml.TRAILER.unpack(trailer)
        if stream_len != cur - stream:
            raise LimeFormatError(f"{path}: block trailer at offset {cur:#x} says "
                                  f"{stream_len:#x} stream bytes, the stream has "
                                  f"{cur - stream:#x}")
        extents.append(Extent(start, length, at))
        at += length
        pos = cur + avml.TRAILER.size
    os.ftruncate(out, at)
    return extents


def _pwrite_nonzero(fd: int, data: memoryview, offset: int) -> None:
    """Write data at offset, leaving all-zero 64 KiB pieces as holes."""
    step = 1 << 16
    zero = bytes(step)
    for i in range(0, len(data), step):
        piece = data[i:i + step]
        if piece == zero[:len(piece)]:
            continue
        view = piece
        at = offset + i
        while view:
            n = os.pwrite(fd, view, at)
            view = view[n:]
            at += n

