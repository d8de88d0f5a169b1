"""/proc/iomem: the physical resource tree; kcore needs its top-level System RAM ranges.

Each line is "START-END : NAME" in hex, END inclusive; children are indented by two spaces
per level (kernel/resource.c, r_show()). Without CAP_SYS_ADMIN every address reads as 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kcore.errors import InputError

_IOMEM_LINE = re.compile(r"^( *)([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*)$")


@dataclass
class Iomem:
    """Parsed /proc/iomem: top-level resources as (start, end inclusive, name)."""

    top: list[tuple[int, int, str]]

    def system_ram(self) -> list[tuple[int, int]]:
        """Top-level "System RAM" resources (what walk_system_ram_range() visits)."""
        return [(s, e) for s, e, name in self.top if name.startswith("System RAM")]


def parse_iomem(text: str, where: str = "proc/iomem") -> Iomem:
    """Parse /proc/iomem; raise InputError naming the first malformed line."""
    top = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _IOMEM_LINE.match(line)
        if not m:
            raise InputError(f"{where}:{n}: malformed line {line.strip()[:60]!r}")
        start, end = int(m.group(2), 16), int(m.group(3), 16)
        if end >= 1 << 64:
            raise InputError(f"{where}:{n}: address {end:#x} does not fit in 64 bits")
        if end < start:
            raise InputError(f"{where}:{n}: range end {end:#x} is below its start {start:#x}")
        if not m.group(1):
            top.append((start, end, m.group(4).strip()))
    ram = [(s, e) for s, e, name in top if name.startswith("System RAM")]
    if not ram:
        raise InputError(f"{where}: no top-level 'System RAM' line")
    if all(s == 0 and e == 0 for s, e in ram):
        raise InputError(f"{where}: addresses read as zero (hidden from non-root): run as root")
    return Iomem(top)
