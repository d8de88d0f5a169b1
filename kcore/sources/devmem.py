"""/dev/mem and /dev/crash: offset = physical address; RAM from the root's proc/iomem."""

from __future__ import annotations

import os
import stat

from kcore.errors import InputError, SourceError
from kcore.iomem import parse_iomem
from kcore.sources.base import Extent, MemorySource, Probe, check_extents
from kcore.sources.files import opened


def system_ram(root: str) -> list[Extent]:
    """Top-level "System RAM" ranges of root/proc/iomem as extents at offset = paddr."""
    path = os.path.join(root, "proc/iomem")
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    return [Extent(start, end - start + 1, start)
            for start, end in parse_iomem(text, path).system_ram()]


class DevmemSource(MemorySource):
    """/dev/mem or /dev/crash: reads at offset = physical address, RAM ranges from iomem."""

    kind = "devmem"
    # /dev/mem bounces each read through a buffer of its own call, but /dev/crash's driver is
    # out of tree: give threads fds of their own as for /proc/kcore (they cost nothing).
    concurrent_reads_safe = False

    @classmethod
    def open(cls, path: str, spec: str | None = None, root: str = "/") -> DevmemSource:
        """Open a physical-memory device read-only; extents are root's System RAM."""
        extents = system_ram(root)
        with opened(path) as fd:
            return cls(spec or f"devmem:{path}", path, fd,
                       check_extents(extents, path, SourceError))

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        """A character device named mem or crash (after symlinks)."""
        return stat.S_ISCHR(probe.st.st_mode) and os.path.basename(
            os.path.realpath(probe.path)) in ("mem", "crash")
