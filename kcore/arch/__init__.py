"""Architectures kcore knows: one record each (ELF machine, note sizes, address map, page walk).

Everything that differs between kernel architectures is reached through `ARCHES` (keyed by
the kernel's own name, as /proc/sys/kernel/arch and VMCOREINFO's machine give it) or
`by_machine()` (an ELF core's e_machine); an architecture missing here is refused with one
line (InputError, exit 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kcore.arch import arm64, x86_64
from kcore.errors import InputError
from kcore.wire.elf import EM_BY_ARCH, PRPSINFO, PRSTATUS_SIZE

if TYPE_CHECKING:
    from pathlib import Path

    from kcore.addrmap import AddressMap
    from kcore.sources.base import MemorySource
    from kcore.system import System
    from kcore.vmem import PageWalker


@dataclass(frozen=True)
class Arch:
    """One architecture's facts and builders."""

    name: str  # the kernel's name: x86_64, aarch64
    e_machine: int  # ELF e_machine of its cores
    prstatus_size: int  # sizeof(struct elf_prstatus): kcore's NT_PRSTATUS descriptor
    prpsinfo_size: int  # sizeof(struct elf_prpsinfo)
    # discover(root, source, layout) -> System: the address map from a system root + memory
    discover: Callable[[Path, MemorySource, str], System]
    # walker(system, source) -> a page walker of the kernel's page tables, or None
    walker: Callable[[Any, Any], PageWalker | None]
    # kcore_map(vmcoreinfo, segments) -> AddressMap: the map of a real /proc/kcore
    kcore_map: Callable[[Any, list[Any]], AddressMap]
    # kcore_text(vmcoreinfo or None, segments) -> the kernel-image PT_LOAD of a real
    # /proc/kcore (its p_paddr aliases RAM's), or None
    kcore_text: Callable[[Any, list[Any]], Any]


def _arch(name: str, module: Any) -> Arch:
    """A record of an arch module's builders; its ELF numbers from the wire module."""
    return Arch(name, EM_BY_ARCH[name], PRSTATUS_SIZE[name], PRPSINFO.size, module.discover,
                module.walker, module.kcore_map, module.kcore_text)


# arm64's struct elf_prstatus (34 registers: x0-x30, sp, pc, pstate) is 392 bytes, as the
# real /proc/kcore of Debian's 6.1 and 6.12 arm64 kernels shows.
ARCHES: dict[str, Arch] = {
    "x86_64": _arch("x86_64", x86_64),
    "aarch64": _arch("aarch64", arm64),
}
ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}


def get(name: str, where: str = "") -> Arch:
    """The record of an architecture by the kernel's name; InputError if kcore lacks it."""
    arch = ARCHES.get(ALIASES.get(name, name))
    if arch is None:
        known = ", ".join(ARCHES)
        raise InputError(f"{where + ': ' if where else ''}architecture {name!r} is not one "
                         f"kcore knows ({known})")
    return arch


def by_machine(e_machine: int, where: str = "") -> Arch:
    """The record of an ELF machine number; InputError if kcore lacks it."""
    for arch in ARCHES.values():
        if arch.e_machine == e_machine:
            return arch
    known = ", ".join(f"{a.name} ({a.e_machine})" for a in ARCHES.values())
    raise InputError(f"{where + ': ' if where else ''}ELF machine {e_machine} is not an "
                     f"architecture kcore knows ({known})")


def walker_for(system: Any, source: Any = None) -> PageWalker | None:
    """The page walker of a discovered system (cached on it), or None without a PGD."""
    source = source if source is not None else system.source
    amap = system.addrmap
    if amap.pgd_paddr is None:
        return None
    cached = getattr(system, "_page_walker", None)
    if cached is not None and cached[0] is source:
        hit: PageWalker | None = cached[1]
        return hit
    walker = get(getattr(amap, "arch", "x86_64")).walker(system, source)
    system._page_walker = (source, walker)
    return walker
