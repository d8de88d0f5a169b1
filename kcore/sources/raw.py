"""Raw physical images: file offset = physical address (QEMU memory-backend-file, dd of RAM)."""

from __future__ import annotations

import os

from kcore.errors import SourceError
from kcore.sources.base import Extent, MemorySource, file_size, open_readonly


class RawSource(MemorySource):
    """A raw physical memory image: byte N of the file is physical address N."""

    kind = "raw"

    @classmethod
    def open(cls, path: str, spec: str | None = None) -> RawSource:
        """Open a raw image read-only; its one extent covers the whole file."""
        fd = open_readonly(path)
        try:
            size = file_size(fd)
            if size <= 0:
                raise SourceError(f"{path}: empty file at offset 0x0 (no memory to read)")
            return cls(spec or f"{cls.kind}:{path}", path, fd, [Extent(0, size, 0)])
        except BaseException:
            os.close(fd)
            raise
