"""What a dump writes: a Plan of header blobs, source copies and zero runs, and the Request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kcore.sources.base import MemorySource
    from kcore.system import System

DEFAULT_GRANULE = 1 << 16  # zero runs shorter than this are kept (bounds the range count)
SCAN_CHUNK = 256 << 20  # bytes per zero-run scan call (a multiple of any granule <= 256 MiB)


@dataclass(frozen=True)
class Blob:
    """Literal bytes at an output offset (headers)."""

    dst: int
    data: bytes


@dataclass(frozen=True)
class Copy:
    """length bytes from the source fd at src to the output at dst."""

    dst: int
    src: int
    length: int


@dataclass(frozen=True)
class Zeros:
    """length zero bytes at dst: a hole in a seekable output, written for a stream."""

    dst: int
    length: int


Item = Blob | Copy | Zeros


@dataclass
class Plan:
    """A complete output: items in dst order, its size, and what it holds."""

    items: list[Item]
    size: int
    ranges: list[dict[str, Any]] = field(default_factory=list)  # for the manifest
    elided: int = 0  # bytes of zero runs left out
    scan_stats: Any = None  # CopyStats of the zero-run scan, if one ran
    estimate: bool = False  # size is an upper bound of the space needed (holes)
    warnings: list[str] = field(default_factory=list)  # said in the summary and the manifest
    # compressed formats: codec, input_bytes (memory read), output_bytes, ratio...
    compression: dict[str, Any] | None = None

    @property
    def copy_bytes(self) -> int:
        """Bytes copied from the source."""
        return sum(i.length for i in self.items if isinstance(i, Copy))

    @property
    def contiguous(self) -> bool:
        """Whether the items cover [0, size) in order, each byte once (as a stream needs)."""
        pos = 0
        for i in self.items:
            if i.dst != pos:
                return False
            pos += len(i.data) if isinstance(i, Blob) else i.length
        return pos == self.size

    @property
    def space_needed(self) -> int:
        """Upper bound of the disk space the output takes."""
        return sum(i.length if isinstance(i, Copy) else len(i.data)
                   for i in self.items if not isinstance(i, Zeros))


@dataclass
class Request:
    """What to dump and how."""

    system: System
    source: MemorySource
    text: bool = True
    vmalloc: bool = False
    modules: bool = False
    elide: bool = True
    granule: int = DEFAULT_GRANULE  # 0: no zero scan (keep every byte the source holds)
    strict: bool = False
    layout: str = "modern"
    progress: Callable[[int], None] | None = None  # bytes scanned for zero runs
    threads: int = 1  # copy/scan threads (engine)
    dump_level: int | None = None  # -d N, applied (req.source holds only the kept pages)
    compress: str = "zstd"  # the page codec of compressed formats (kcore.codecs)
    symbols: Any = None  # kcore.symbols.SymbolFiles kept with the memory (None: --no-symbols)
