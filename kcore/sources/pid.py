"""pid:PID:START-END@PHYS: a range of another process's memory standing for physical memory."""

from __future__ import annotations

import re

from kcore.errors import SourceError
from kcore.sources.base import Extent, MemorySource, check_extents
from kcore.sources.files import opened

_NUM = r"(?:0[xX][0-9a-fA-F]+|[0-9a-fA-F]+)"
_RANGE = re.compile(rf"^({_NUM})-({_NUM})@({_NUM})$")


def _num(text: str) -> int:
    """A hex number (with or without 0x), like /proc/PID/maps prints."""
    return int(text, 16)


def parse_pid_spec(body: str) -> tuple[int, list[Extent]]:
    """Parse `PID:START-END@PHYS[,START-END@PHYS...]` (END exclusive) into pid and extents."""
    pid_text, sep, ranges = body.partition(":")
    if not sep or not pid_text.isdigit():
        raise SourceError(f"pid:{body}: expected pid:PID:START-END@PHYS")
    extents = []
    for part in ranges.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise SourceError(f"pid:{body}: bad range {part!r} (expected START-END@PHYS, hex)")
        start, end, phys = (_num(g) for g in m.groups())
        if end <= start:
            raise SourceError(f"pid:{body}: range end {end:#x} is not above start {start:#x}")
        extents.append(Extent(phys, end - start, start))
    return int(pid_text), extents


class PidSource(MemorySource):
    """Guest physical memory seen in a process's address space (e.g. a VM's RAM mapping)."""

    kind = "pid"

    @classmethod
    def open(cls, body: str, spec: str | None = None, root: str = "/") -> PidSource:
        """Open /proc/PID/mem read-only for the ranges in `body`.

        The process is one of this host (e.g. the VM's), while `root` describes the kernel whose
        memory it holds (the guest): so /proc here is the host's, never root-relative.
        """
        pid, extents = parse_pid_spec(body)
        path = f"/proc/{pid}/mem"
        extents = check_extents(extents, path, SourceError)
        with opened(path) as fd:
            return cls(spec or f"pid:{body}", path, fd, extents)
