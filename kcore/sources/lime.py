"""LiME images: per range a 32-byte header {magic, version, s_addr, e_addr inclusive}, then data."""

from __future__ import annotations

from kcore.errors import LimeFormatError, SourceError
from kcore.sources.base import Extent, MemorySource, Probe, check_extents
from kcore.sources.files import file_size, opened, pread_exact
from kcore.wire.lime import AVML_MAGIC, HEADER, LIME_MAGIC, LIME_VERSION, MAX_RANGES, unpack_header

_WINDOW = 64 << 10  # bytes read at a time while walking the range headers


def parse_lime(fd: int, path: str) -> list[Extent]:
    """Walk a LiME file's range headers; return its extents or raise LimeFormatError."""
    size = file_size(fd)
    if size == 0:
        raise LimeFormatError(f"{path}: empty file at offset 0x0")
    extents: list[Extent] = []
    pos = 0
    # Headers are read through a window of the file: a million small ranges cost a few
    # dozen reads, not a million.
    window, window_at = b"", 0
    while pos < size:
        if len(extents) >= MAX_RANGES:
            raise LimeFormatError(f"{path}: more than {MAX_RANGES} ranges at offset {pos:#x}")
        if not window_at <= pos <= window_at + len(window) - HEADER.size:
            try:
                window = pread_exact(fd, pos, min(_WINDOW, size - pos), path,
                                     "LiME range header")
            except SourceError as exc:
                raise LimeFormatError(str(exc)) from None
            window_at = pos
            if len(window) < HEADER.size:
                raise LimeFormatError(f"{path}: truncated LiME range header at offset {pos:#x}")
        at = pos - window_at
        magic, version, s_addr, e_addr = unpack_header(window[at:at + HEADER.size])
        if magic == AVML_MAGIC:
            raise LimeFormatError(
                f"{path}: AVML-compressed image (magic {magic:#x}, version {version}) at offset "
                f"{pos:#x}: read it as avml:{path} (or name no kind: it is detected)")
        if magic != LIME_MAGIC:
            raise LimeFormatError(f"{path}: bad LiME magic {magic:#x} at offset {pos:#x}")
        if version != LIME_VERSION:
            raise LimeFormatError(f"{path}: unsupported LiME version {version} at offset {pos:#x}")
        if e_addr < s_addr:
            raise LimeFormatError(
                f"{path}: range end {e_addr:#x} below its start {s_addr:#x} at offset {pos:#x}")
        length = e_addr - s_addr + 1
        data = pos + HEADER.size
        if data + length > size:
            raise LimeFormatError(
                f"{path}: truncated range {s_addr:#x}-{e_addr:#x} at offset {pos:#x} "
                f"(needs {length:#x} bytes at {data:#x}, file ends at {size:#x})")
        extents.append(Extent(s_addr, length, data))
        pos = data + length
    return check_extents(extents, path, LimeFormatError)


class LimeSource(MemorySource):
    """A LiME `format=lime` image."""

    kind = "lime"

    @classmethod
    def open(cls, path: str, spec: str | None = None, root: str = "/") -> LimeSource:
        """Open and index a LiME image read-only."""
        with opened(path) as fd:
            return cls(spec or f"lime:{path}", path, fd, parse_lime(fd, path))

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        """LiME's magic (AVML's compressed images are AvmlSource's)."""
        return int.from_bytes(probe.head[:4], "little") == LIME_MAGIC
