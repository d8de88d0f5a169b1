"""A kernel as kcore sees it (System), and what every architecture's discovery reads with.

Below kcore.arch: the architectures' builders (kcore.arch.x86_64, kcore.arch.arm64) read the
system root's files and the kernel's memory through these helpers; kcore.discover picks the
builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kcore.addrmap import AddressMap
from kcore.errors import InputError
from kcore.iomem import Iomem
from kcore.kclist import Kclist
from kcore.rootfiles import read_root_text
from kcore.vmcoreinfo import (
    MAX_VMCOREINFO_BYTES,
    VmcoreInfo,
    parse_note,
    parse_sysfs_vmcoreinfo,
)
from kcore.wire.elf import NHDR, align4

if TYPE_CHECKING:
    from kcore.sources.base import MemorySource

TASK_STRUCT_SANE = range(1024, 1 << 17)


def check_same_release(root: Path, osrelease: str, src: Any, info: VmcoreInfo) -> None:
    """The root's osrelease and the memory's VMCOREINFO name the same kernel."""
    if osrelease and info.osrelease and osrelease != info.osrelease:
        raise InputError(f"{root / 'proc/sys/kernel/osrelease'} says {osrelease}, but the "
                         f"VMCOREINFO in {src.spec} says {info.osrelease}: root and source "
                         "are from different kernels")


def online_memory_blocks(root: Path) -> frozenset[str] | None:
    """The memory blocks under sys/devices/system/memory that are online.

    kcore_callback() flags an update only on MEM_ONLINE and MEM_OFFLINE: a block that
    appears offline (a DIMM added, not yet onlined) changes nothing, so this set is what
    the need-update flag follows.
    """
    base = root / "sys/devices/system/memory"
    try:
        names = [p.name for p in base.iterdir() if p.name.startswith("memory")]
    except (OSError, ValueError):  # ValueError: a NUL byte in the root's path
        return None
    online = set()
    for name in names:
        try:
            if (base / name / "state").read_bytes().strip() == b"online":
                online.add(name)
        except OSError:
            continue
    return frozenset(online)


def online_memory_end_pfn(root: Path, page_size: int = 4096) -> int | None:
    """kcore_ram_list()'s end_pfn: the end of the highest online memory block, if known.

    The kernel walks System RAM only up to the highest node_end_pfn(); node spans grow
    when memory goes online and shrink when it goes offline, so hot-added memory that is
    not online lies past it even though /proc/iomem lists it.
    """
    base = root / "sys/devices/system/memory"
    online = online_memory_blocks(root)
    if not online:
        return None
    try:
        block = int((base / "block_size_bytes").read_bytes().strip(), 16)
    except (OSError, ValueError):
        return None
    numbers = [int(n[len("memory"):]) for n in online if n[len("memory"):].isdigit()]
    if not numbers or block <= 0:
        return None
    return ((max(numbers) + 1) * block) // page_size


@dataclass
class System:
    """One kernel as kcore sees it: where its files and memory are, and what kcore shows of it."""

    root: Path
    source: MemorySource
    addrmap: AddressMap
    vmcoreinfo: VmcoreInfo
    cmdline: str
    osrelease: str
    # sizeof(struct task_struct), NT_TASKSTRUCT's size: a number, or how to find it when a
    # header first needs it (arm64 reads proc/slabinfo, root only: `ranges` does without it)
    task_struct_size_of: int | Callable[[], int]
    kclist: Kclist
    symbols: dict[str, int] = field(default_factory=dict)
    task_struct: bytes | None = None  # known only when the source is a real kcore
    layout: str = "modern"

    @property
    def task_struct_size(self) -> int:
        """sizeof(struct task_struct), found on first use."""
        if callable(self.task_struct_size_of):
            self.task_struct_size_of = self.task_struct_size_of()
        return self.task_struct_size_of

    def close(self) -> None:
        """Close the memory source."""
        self.source.close()


class PhysReader:
    """Small physical reads for discovery, with errors that name what was being read."""

    def __init__(self, source: MemorySource) -> None:
        self.source = source

    def covered(self, paddr: int, length: int) -> bool:
        """Whether [paddr, paddr+length) lies inside the source's extents."""
        end = paddr + length
        for ext in self.source.extents:
            if ext.paddr <= paddr < ext.paddr + ext.length:
                if end <= ext.paddr + ext.length:
                    return True
                paddr = ext.paddr + ext.length
        return False

    def read(self, paddr: int, length: int, what: str) -> bytes:
        """length bytes at paddr; InputError (naming what) if the source lacks them."""
        if not self.covered(paddr, length):
            raise InputError(
                f"{what} at physical {paddr:#x} is outside the memory source {self.source.spec} "
                "(a source too small, or from another machine)"
            )
        data, stats = self.source.read_phys(paddr, length)
        if stats.pages_zero_filled:
            raise InputError(f"{what} at physical {paddr:#x} is unreadable in {self.source.spec}")
        return data

    def u64(self, paddr: int, what: str) -> int:
        """The little-endian u64 at paddr."""
        return int.from_bytes(self.read(paddr, 8, what), "little")


def load_vmcoreinfo(root: Path, reader: PhysReader) -> VmcoreInfo:
    """VMCOREINFO: the note sysfs points at in memory, else the source's own note."""
    text = read_root_text(root, "sys/kernel/vmcoreinfo", required=False)
    if text is None:
        if reader.source.vmcoreinfo:
            return VmcoreInfo.parse(reader.source.vmcoreinfo)
        raise InputError(f"{root / 'sys/kernel/vmcoreinfo'}: missing, and the memory source "
                         "carries no VMCOREINFO note")
    where = str(root / "sys/kernel/vmcoreinfo")
    # sysfs gives the note buffer's size (VMCOREINFO_NOTE_SIZE, 0x1024); the note inside is
    # shorter: read its header first, then exactly the note.
    paddr, _size = parse_sysfs_vmcoreinfo(text, where)
    what = f"the VMCOREINFO note ({where})"
    namesz, descsz, _ = NHDR.unpack(reader.read(paddr, NHDR.size, what))
    total = NHDR.size + align4(namesz) + descsz
    if namesz > 64 or descsz > MAX_VMCOREINFO_BYTES:
        raise InputError(f"{what}: no VMCOREINFO note at physical {paddr:#x} "
                         f"(namesz {namesz}, descsz {descsz}): root and source do not match")
    buf = reader.read(paddr, total, what)
    return VmcoreInfo.parse(parse_note(buf, f"VMCOREINFO note at physical {paddr:#x}"))


def check_source_size(src: MemorySource, iomem: Iomem) -> None:
    """A raw image must reach the end of System RAM that lies below its own end's region."""
    if getattr(src, "kind", None) not in ("raw", "padded") or not src.extents:
        return
    size = src.extents[-1].paddr + src.extents[-1].length
    ram = iomem.system_ram()
    # Below 4 GiB a RAM file maps physical addresses 1:1; a short file is truncated.
    low_end = max((e + 1 for s, e in ram if e < 1 << 32), default=0)
    if size < low_end:
        raise InputError(f"{src.path}: {size:#x} bytes, but System RAM reaches {low_end:#x}: "
                         "the image is truncated or from another machine")
