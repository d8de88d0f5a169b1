"""Memory sources: where kernel memory is read (raw, padded, lime, avml, elf, kcore, kdump...).

Each kind of source is a MemorySource subclass in its own module: `kind` (the KIND: prefix
of --source KIND:PATH), `open(path, spec, root)`, and `detect(probe)` which recognises its
own magic when --source names a bare PATH. Adding a source: write `kcore/sources/NAME.py`
with such a class (open it with `files.opened(path)`, which closes the fd if opening fails)
and add the class to SOURCES below, where the order is the order of detection.
"""

from __future__ import annotations

import os
import stat

from kcore.errors import SourceError
from kcore.sources.avml import AvmlSource
from kcore.sources.base import PROBE_BYTES, Extent, MemorySource, Probe
from kcore.sources.devmem import DevmemSource
from kcore.sources.elf import ElfSource
from kcore.sources.files import open_readonly, pread_full
from kcore.sources.kcore import KcoreSource
from kcore.sources.kdump import KdumpSource
from kcore.sources.lime import LimeSource
from kcore.sources.live import open_auto
from kcore.sources.padded import PaddedSource
from kcore.sources.pid import PidSource
from kcore.sources.raw import RawSource

__all__ = [
    "AvmlSource",
    "KdumpSource",
    "DevmemSource",
    "ElfSource",
    "Extent",
    "KcoreSource",
    "LimeSource",
    "MemorySource",
    "PaddedSource",
    "PidSource",
    "RawSource",
    "SOURCES",
    "detect",
    "detect_kind",
    "open_auto",
    "open_source",
]

# Every kind of source, in the order detect() asks them (raw, which takes any file, last).
SOURCES: tuple[type[MemorySource], ...] = (
    DevmemSource,
    KcoreSource,
    ElfSource,
    KdumpSource,
    AvmlSource,
    LimeSource,
    PidSource,
    PaddedSource,
    RawSource,
)
BY_KIND: dict[str, type[MemorySource]] = {cls.kind: cls for cls in SOURCES}


def open_source(spec: str, root: str = "/") -> MemorySource:
    """Open a memory source from a spec: KIND:PATH, a bare PATH (detected), or auto."""
    if spec == "auto":
        return open_auto(root)
    kind, sep, rest = spec.partition(":")
    cls = BY_KIND.get(kind) if sep else None
    if cls is None:
        return detect(spec, root)
    if not rest:
        raise SourceError(f"{spec}: missing path after {kind}:")
    return cls.open(rest, spec, root)


def detect_kind(probe: Probe) -> type[MemorySource] | None:
    """The first kind of source in SOURCES that recognises the probed file (None: none)."""
    for cls in SOURCES:
        if cls.detect(probe):
            return cls
    return None


def detect(path: str, root: str = "/") -> MemorySource:
    """Open `path` as the first source in SOURCES whose detect() recognises its contents."""
    fd = open_readonly(path)
    try:
        st = os.fstat(fd)
        head = b""
        if not stat.S_ISCHR(st.st_mode):  # a device's offset 0 is not read to guess
            try:
                head = pread_full(fd, PROBE_BYTES, 0)
            except OSError as exc:
                raise SourceError(f"{path}: cannot read at offset 0x0: "
                                  f"{os.strerror(exc.errno or 0)}") from None
            if stat.S_ISREG(st.st_mode) and st.st_size == 0 or not head:
                raise SourceError(f"{path}: empty file at offset 0x0 (no memory to read)")
        cls = detect_kind(Probe(path, fd, st, head))
        if cls is not None:
            return cls.open(path, path, root)
        if stat.S_ISCHR(st.st_mode):
            raise SourceError(f"{path}: a character device that is not /dev/mem or /dev/crash")
        raise SourceError(f"{path}: no kind of memory source recognises it; name one "
                          f"(KIND:PATH)")
    finally:
        os.close(fd)
