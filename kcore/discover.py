"""Discovery: the kernel as kcore shows it, from a system root and a memory source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kcore import arch
from kcore.addrmap import ALL_ONES, AddressMap
from kcore.errors import InputError
from kcore.kclist import KcoreEntry, KcoreType
from kcore.rootfiles import root_word
from kcore.sources import open_source
from kcore.sources.base import MemorySource
from kcore.system import System
from kcore.vmcoreinfo import VmcoreInfo
from kcore.wire.elf import (
    CORE_NAME,
    NT_PRPSINFO,
    NT_TASKSTRUCT,
    find_note,
    prpsinfo_psargs,
)


def _open_source(source: str | MemorySource, root: Path) -> MemorySource:
    if not isinstance(source, str):
        return source
    return open_source(source, str(root))


def discover(root: str | Path = "/", source: str | MemorySource = "auto", *,
             layout: str = "modern") -> System:
    """Read a system root and a memory source; return the System kcore would show."""
    if layout not in ("modern", "2.6"):
        raise InputError(f"unknown layout {layout!r}: use modern or 2.6")
    root = Path(root)
    src = _open_source(source, root)
    try:
        if getattr(src, "kind", None) == "kcore":
            return _discover_from_kcore(root, src, layout)
        return _discover(root, src, layout)
    except BaseException:
        if isinstance(source, str):
            src.close()
        raise


def _discover(root: Path, src: MemorySource, layout: str) -> System:
    """The System of a root and a memory source, by its architecture's builder (kcore.arch)."""
    name = root_word(root, "proc/sys/kernel/arch") or "x86_64"
    a = arch.get(name, str(root / "proc/sys/kernel/arch"))
    core = getattr(src, "core", None)  # an ELF core says which machine it is from
    if core is not None and core.e_machine:
        theirs = arch.by_machine(core.e_machine, src.spec)
        if theirs is not a:
            raise InputError(f"{src.spec} is a core of an {theirs.name} machine, but "
                             f"{root} describes an {a.name} one")
    return a.discover(root, src, layout)


class SegmentKcoreList:
    """The kclist of a real /proc/kcore: its own program headers, re-read on refresh()."""

    def __init__(self, load: Any, amap: AddressMap) -> None:
        self._load = load
        self.addrmap = amap
        self.need_update = False
        self._entries: list[KcoreEntry] = []
        self.refresh()

    @property
    def entries(self) -> list[KcoreEntry]:
        """The entries, in the file's order."""
        return list(self._entries)

    def mark_need_update(self) -> None:
        """Re-read the program headers on the next refresh()."""
        self.need_update = True

    def refresh(self) -> bool:
        """Re-read the program headers; True when they changed."""
        new = self._load()
        changed: bool = new != self._entries
        self._entries = new
        self.need_update = False
        return changed


def classify_segment(vaddr: int, paddr: int, amap: AddressMap) -> tuple[KcoreType, str]:
    """The kclist type of a real kcore PT_LOAD, from its addresses."""
    if paddr != ALL_ONES:
        if vaddr == amap.text_start and amap.text_end > amap.text_start:
            return KcoreType.TEXT, ""
        return KcoreType.RAM, ""
    if vaddr == amap.vmalloc_start:
        return KcoreType.VMALLOC, "vmalloc area"
    if vaddr == amap.modules_start:
        return KcoreType.VMALLOC, "modules area"
    return KcoreType.VMEMMAP, ""


def _discover_from_kcore(root: Path, src: Any, layout: str) -> System:
    """A real /proc/kcore as source: its own headers and notes are the truth."""
    psinfo = find_note(src.core, CORE_NAME, NT_PRPSINFO)
    cmdline = prpsinfo_psargs(psinfo).decode("utf-8", "surrogateescape") if psinfo else ""
    task = find_note(src.core, CORE_NAME, NT_TASKSTRUCT)
    vmci = src.vmcoreinfo  # the source's VMCOREINFO note
    if not vmci:
        raise InputError(f"{src.path}: no VMCOREINFO note (kernel older than 4.19?)")
    info = VmcoreInfo.parse(vmci)
    amap = arch.by_machine(src.core.e_machine, src.path).kcore_map(info, list(src.segments))

    opened = [False]

    def load() -> list[KcoreEntry]:
        # open_kcore() rebuilds the RAM list after hotplug: open once more so that it runs,
        # then re-read the program headers, which read_kcore() builds from the new list.
        if opened[0]:
            type(src).open(src.path, src.spec).close()
            src.reload_segments()
        opened[0] = True
        out = []
        for s in src.segments:
            t, label = classify_segment(s.vaddr, s.paddr, amap)
            out.append(KcoreEntry(s.vaddr, s.size, t, paddr=s.paddr, label=label))
        return out

    osrelease = root_word(root, "proc/sys/kernel/osrelease") or ""
    return System(root=root, source=src, addrmap=amap, vmcoreinfo=info, cmdline=cmdline,
                  osrelease=osrelease or info.osrelease or "",
                  task_struct_size_of=len(task) if task else 0,
                  kclist=SegmentKcoreList(load, amap), task_struct=task, layout=layout)


__all__ = ["System", "discover"]
