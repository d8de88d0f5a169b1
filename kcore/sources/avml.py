"""AVML images (compressed LiME, version 2) as sources: unpacked once into a temporary file."""

from __future__ import annotations

import os
from typing import Any

from kcore.errors import LimeFormatError, SourceError
from kcore.sources.base import Extent, MemorySource, Probe, check_extents
from kcore.sources.checks import PAGE, ZERO_PAGE, Region, Result, layout_error, no_notes
from kcore.sources.files import file_size, open_readonly, pread_full
from kcore.sources.kdump import temp_file
from kcore.wire import LayoutError, avml


class AvmlSource(MemorySource):
    """An AVML image: each block's snappy stream decompressed into a temporary raw file."""

    kind = "avml"
    signatures = ("AVML",)

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
        return bool(magic == avml.AVML_MAGIC and version == avml.AVML_VERSION)

    @classmethod
    def check(cls, fd: int, path: str, res: Result,
              manifest: dict[str, Any] | None) -> list[Region] | None:
        """`kcore verify` of an AVML image: every block's header, snappy stream (each chunk's
        CRC-32C) and trailer, every block decompressed and its zero pages counted."""
        res.format, res.detail = "avml", "AVML image (snappy-compressed blocks)"
        zero, pending = 0, bytearray()  # pending: the start of a page the next piece ends

        def count(data: memoryview, _at: int) -> None:
            nonlocal zero
            if pending:
                take = min(PAGE - len(pending), len(data))
                pending.extend(data[:take])
                data = data[take:]
                if len(pending) == PAGE:
                    zero += pending == ZERO_PAGE
                    pending.clear()
            whole = len(data) // PAGE * PAGE
            for i in range(0, whole, PAGE):
                zero += data[i:i + PAGE] == ZERO_PAGE
            pending.extend(data[whole:])

        def read(offset: int, length: int) -> bytes:
            return pread_full(fd, length, offset)

        try:
            blocks = avml.walk(read, res.size, count)
        except SourceError as exc:
            raise layout_error(exc, path) from None
        if pending:  # a last partial page: zero if all its bytes are
            zero += pending == ZERO_PAGE[:len(pending)]
        memory = sum(length for _s, length, _o in blocks)
        pages = sum(-(-length // PAGE) for _s, length, _o in blocks)
        res.structure = (f"{len(blocks)} AVML blocks chained to the end of the file, "
                         f"{len(blocks)} decompressed: valid")
        if pages:
            res.pages = {"memory": pages, "zero": zero, "zero_share": round(zero / pages, 4),
                         "unreadable": None, "unreadable_share": None}
        res.ranges["count"] = len(blocks)
        res.ranges["memory_bytes"] = memory
        res.elided_in_manifest = True  # zero runs left out: only the manifest counts them
        no_notes(res, volatility="Volatility's AVMLLayer opens it when the snappy library is "
                                 "installed",
                 drgn="drgn does not open AVML images (avml-convert makes a LiME image)",
                 crash="crash does not open AVML images")
        return []


def unpack(fd: int, path: str, out: int) -> list[Extent]:
    """Decompress every block of the AVML file at fd into out (kcore.wire.avml's walker);
    return the extents."""
    def read(offset: int, length: int) -> bytes:
        return pread_full(fd, length, offset)

    try:
        blocks = avml.walk(read, file_size(fd), lambda data, at: _pwrite_nonzero(out, data, at))
    except LayoutError as exc:
        raise LimeFormatError(f"{path}: {exc}", offset=exc.offset, field=exc.field) from None
    extents = [Extent(*b) for b in blocks]
    os.ftruncate(out, sum(e.length for e in extents))
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

