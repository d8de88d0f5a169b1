"""Raw physical images: file offset = physical address (QEMU memory-backend-file, dd of RAM)."""

from __future__ import annotations

import stat
from typing import Any

from kcore.errors import SourceError
from kcore.manifest import ranges as manifest_ranges
from kcore.sources.base import Extent, MemorySource, Probe
from kcore.sources.checks import Region, Result, no_notes
from kcore.sources.files import file_size, opened
from kcore.wire import LayoutError


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

    @classmethod
    def check(cls, fd: int, path: str, res: Result,
              manifest: dict[str, Any] | None) -> list[Region] | None:
        """`kcore verify` of a raw or padded image: it has no structure, so only the ranges
        its manifest (PATH.json) lists, inside the file; None without such a manifest."""
        fmt = (manifest or {}).get("format")
        if manifest is None or fmt not in ("raw", "padded"):
            return None
        res.format = str(fmt)
        res.detail = ("physical image, file offset = physical address" if fmt == "raw"
                      else "physical image with zeros written (LiME padded)")
        regions = []
        for i, r in enumerate(manifest_ranges(manifest)):
            paddr, size = r.paddr, r.size
            if paddr is None:
                raise LayoutError(None, f"ranges[{i}]", "no paddr",
                                  f"the manifest's ranges[{i}] has no paddr")
            if paddr + size > res.size:
                raise LayoutError(res.size, f"ranges[{i}]", "past the end of the file",
                                  f"range {paddr:#x}+{size:#x} ends past the end of the file "
                                  f"({res.size:#x}): truncated")
            regions.append(Region(paddr, size, size, paddr))
        res.structure = f"{len(regions)} ranges of the manifest lie inside the file"
        res.ranges["count"] = len(regions)
        res.ranges["memory_bytes"] = sum(r.memsz for r in regions)
        no_notes(res, volatility="a raw physical image: Volatility's raw layer opens it",
                 drgn="drgn opens ELF and kdump-compressed cores, not raw images",
                 crash="crash opens a raw image only as `crash vmlinux FILE@0` (ramdump)")
        return regions
