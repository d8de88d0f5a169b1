"""LiME images: per range a 32-byte header {magic, version, s_addr, e_addr inclusive}, then data."""

from __future__ import annotations

from typing import Any

from kcore.errors import LimeFormatError, SourceError
from kcore.sources.base import Extent, MemorySource, Probe, check_extents
from kcore.sources.checks import Region, Result, layout_error, no_notes
from kcore.sources.files import file_size, opened, pread_exact
from kcore.wire import LayoutError, lime


def parse_lime(fd: int, path: str) -> list[Extent]:
    """Walk a LiME file's range headers (kcore.wire.lime.walk); return its extents or raise
    LimeFormatError naming the file and offset."""
    def read(offset: int, length: int) -> bytes:
        return pread_exact(fd, offset, length, path, "LiME range header")

    try:
        ranges = lime.walk(read, file_size(fd))
    except LayoutError as exc:
        hint = (f": read it as avml:{path} (or name no kind: it is detected)"
                if exc.why == "AVML" else "")
        raise LimeFormatError(f"{path}: {exc}{hint}", offset=exc.offset,
                              field=exc.field) from None
    except SourceError as exc:
        raise LimeFormatError(str(exc), offset=exc.offset) from None
    return check_extents([Extent(*r) for r in ranges], path, LimeFormatError)


class LimeSource(MemorySource):
    """A LiME `format=lime` image."""

    kind = "lime"
    signatures = ("LiME",)

    @classmethod
    def open(cls, path: str, spec: str | None = None, root: str = "/") -> LimeSource:
        """Open and index a LiME image read-only."""
        with opened(path) as fd:
            return cls(spec or f"lime:{path}", path, fd, parse_lime(fd, path))

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        """LiME's magic (AVML's compressed images are AvmlSource's)."""
        return int.from_bytes(probe.head[:4], "little") == lime.LIME_MAGIC

    @classmethod
    def check(cls, fd: int, path: str, res: Result,
              manifest: dict[str, Any] | None) -> list[Region] | None:
        """`kcore verify` of a LiME image: its range headers chained to the end of the file."""
        try:
            extents = parse_lime(fd, path)
        except SourceError as exc:
            raise layout_error(exc, path) from None
        res.format, res.detail = "lime", "LiME image"
        res.structure = f"{len(extents)} LiME range headers chained to the end of the file: valid"
        res.ranges["count"] = len(extents)
        res.ranges["memory_bytes"] = sum(e.length for e in extents)
        res.file_ranges = {(e.offset, e.length) for e in extents}
        res.elided_in_manifest = True  # zero runs left out: only the manifest counts them
        no_notes(res, volatility="LiME: Volatility's LimeLayer opens it",
                 drgn="drgn opens ELF and kdump-compressed cores, not LiME (kcore dump --source "
                      "lime:FILE --format elf converts it)",
                 crash="crash opens ELF and kdump cores, not LiME (convert with kcore dump)")
        return [Region(e.offset, e.length, e.length, e.paddr) for e in
                sorted(extents, key=lambda e: e.offset)]
