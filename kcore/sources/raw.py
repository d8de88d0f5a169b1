"""Raw physical images: file offset = physical address (QEMU memory-backend-file, dd of RAM)."""

from __future__ import annotations

import stat

from kcore.errors import SourceError
from kcore.sources.base import Extent, MemorySource, Probe
from kcore.sources.files import file_size, opened


class RawSource(MemorySource):
    """A raw physical memory image: byte N of the file is physical address N."""

    kind = "raw"

    @classmethod
    def open(cls, path: str, spec: str | None = None, root: str = "/") -> RawSource:
        """Open a raw image read-only; its one extent covers the whole file."""
        with opened(path) as fd:
            size = file_size(fd)
            if size <= 0:
                raise SourceError(f"{path}: empty file at offset 0x0 (no memory to read)")
            return cls(spec or f"{cls.kind}:{path}", path, fd, [Extent(0, size, 0)])

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        """Any regular file or block device (tried last: no magic to check)."""
        return stat.S_ISREG(probe.st.st_mode) or stat.S_ISBLK(probe.st.st_mode)
