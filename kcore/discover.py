"""Discovery: the kernel as kcore shows it, from a system root and a memory source."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from kcore.addrmap import (
    ALL_ONES,
    X86_64_KERNEL_IMAGE_SIZE,
    X86_64_START_KERNEL_MAP,
    AddressMap,
    x86_64_map,
)
from kcore.errors import InputError
from kcore.iomem import Iomem, parse_iomem
from kcore.kallsyms import parse_kallsyms
from kcore.kclist import (
    Kclist,
    KcoreEntry,
    KcoreList,
    KcoreType,
    RamRange,
    ram_ranges_from_resources,
)
from kcore.vmcoreinfo import (
    MAX_VMCOREINFO_BYTES,
    VmcoreInfo,
    parse_note,
    parse_sysfs_vmcoreinfo,
)
from kcore.wire.elf import (
    CORE_NAME,
    NHDR,
    NT_PRPSINFO,
    NT_TASKSTRUCT,
    align4,
    find_note,
    prpsinfo_psargs,
)

if TYPE_CHECKING:
    from kcore.sources.base import MemorySource

TASK_STRUCT_SANE = range(1024, 1 << 17)


@overload
def _read_text(root: Path, rel: str, *, required: Literal[True] = True) -> str: ...


@overload
def _read_text(root: Path, rel: str, *, required: bool) -> str | None: ...


def _read_text(root: Path, rel: str, *, required: bool = True) -> str | None:
    """A text file under the root; None if it is missing and not required."""
    path = root / rel
    try:
        return path.read_text(errors="surrogateescape")
    except FileNotFoundError:
        if required:
            raise InputError(
                f"{path}: missing (is --root a system root with proc/ and sys/?)"
            ) from None
        return None
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None


def online_memory_blocks(root: Path) -> frozenset[str] | None:
    """The memory blocks under sys/devices/system/memory that are online.

    kcore_callback() flags an update only on MEM_ONLINE and MEM_OFFLINE: a block that
    appears offline (a DIMM added, not yet onlined) changes nothing, so this set is what
    the need-update flag follows.
    """
    base = root / "sys/devices/system/memory"
    try:
        names = [p.name for p in base.iterdir() if p.name.startswith("memory")]
    except OSError:
        return None
    online = set()
    for name in names:
        try:
            if (base / name / "state").read_text().strip() == "online":
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
        block = int((base / "block_size_bytes").read_text().strip(), 16)
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
    task_struct_size: int
    kclist: Kclist
    symbols: dict[str, int] = field(default_factory=dict)
    task_struct: bytes | None = None  # known only when the source is a real kcore
    flavour: str = "modern"

    def close(self) -> None:
        """Close the memory source."""
        self.source.close()


class _Reader:
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
        return int.from_bytes(self.read(paddr, 8, what), "little")


def _open_source(source: str | MemorySource, root: Path) -> MemorySource:
    if not isinstance(source, str):
        return source
    from kcore.sources import open_source

    return open_source(source, str(root))


def discover(root: str | Path = "/", source: str | MemorySource = "auto", *,
             flavour: str = "modern") -> System:
    """Read a system root and a memory source; return the System kcore would show."""
    if flavour not in ("modern", "2.6"):
        raise InputError(f"unknown layout {flavour!r}: use modern or 2.6")
    root = Path(root)
    src = _open_source(source, root)
    try:
        if getattr(src, "kind", None) == "kcore":
            return _discover_from_kcore(root, src, flavour)
        return _discover(root, src, flavour)
    except BaseException:
        if isinstance(source, str):
            src.close()
        raise


def _load_vmcoreinfo(root: Path, reader: _Reader) -> VmcoreInfo:
    text = _read_text(root, "sys/kernel/vmcoreinfo", required=False)
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


def _discover(root: Path, src: MemorySource, flavour: str) -> System:
    """The System of a root and a memory source, by its architecture's builder (kcore.arch)."""
    from kcore import arch

    name = (_read_text(root, "proc/sys/kernel/arch", required=False) or "x86_64").strip()
    a = arch.get(name, str(root / "proc/sys/kernel/arch"))
    core = getattr(src, "core", None)  # an ELF core says which machine it is from
    if core is not None and core.e_machine:
        theirs = arch.by_machine(core.e_machine, src.spec)
        if theirs is not a:
            raise InputError(f"{src.spec} is a core of an {theirs.name} machine, but "
                             f"{root} describes an {a.name} one")
    return a.discover(root, src, flavour)


def _discover_x86_64(root: Path, src: MemorySource, flavour: str) -> System:
    """x86-64: the address map from kallsyms, VMCOREINFO and kernel variables in memory."""
    iomem_path = root / "proc/iomem"
    iomem = parse_iomem(_read_text(root, "proc/iomem"), str(iomem_path))
    syms = parse_kallsyms(_read_text(root, "proc/kallsyms") or "",
                          where=str(root / "proc/kallsyms"))
    cmdline = (_read_text(root, "proc/cmdline") or "").rstrip("\n")
    _check_source_size(src, iomem)
    reader = _Reader(src)
    info = _load_vmcoreinfo(root, reader)
    osrelease = (_read_text(root, "proc/sys/kernel/osrelease", required=False) or "").strip()
    if osrelease and info.osrelease and osrelease != info.osrelease:
        raise InputError(f"the root runs {osrelease} but the memory holds {info.osrelease}: "
                         "root and source are from different kernels")
    stext = info.symbol("_stext")
    if stext is not None and "_stext" in syms and stext != syms["_stext"]:
        raise InputError(f"kallsyms _stext {syms['_stext']:#x} != VMCOREINFO {stext:#x}: "
                         "root and source are from different boots")
    levels = 5 if info.number("pgtable_l5_enabled") else 4
    phys_base = info.number("phys_base") or 0
    image_size = info.number("KERNEL_IMAGE_SIZE") or X86_64_KERNEL_IMAGE_SIZE
    struct_page = info.size("page") or 64
    init_top_pgt = info.symbol("init_top_pgt")
    base = x86_64_map(text_start=syms["_text"], text_end=syms["_end"],
                      pgtable_levels=levels, phys_base=phys_base,
                      kernel_image_size=image_size, struct_page_size=struct_page)
    if syms["_text"] < X86_64_START_KERNEL_MAP:
        raise InputError(f"kallsyms _text {syms['_text']:#x} is not a kernel-image address")

    def kvar(name: str) -> int | None:
        if name not in syms:
            return None
        return reader.u64(base.pa_symbol(syms[name]), f"kernel variable {name}")

    # CONFIG_RANDOMIZE_MEMORY: the region bases are variables; their values live in memory.
    page_offset, vmalloc_start, vmemmap_start = (
        kvar("page_offset_base"), kvar("vmalloc_base"), kvar("vmemmap_base"))
    for name, value in (("page_offset_base", page_offset), ("vmalloc_base", vmalloc_start),
                        ("vmemmap_base", vmemmap_start)):
        if value is not None and value < 0xFF00000000000000:
            raise InputError(f"kernel variable {name} reads {value:#x}, not a kernel address: "
                             "the memory source does not match this root")
    amap = x86_64_map(
        text_start=syms["_text"], text_end=syms["_end"], pgtable_levels=levels,
        page_offset=page_offset, vmalloc_start=vmalloc_start, vmemmap_start=vmemmap_start,
        phys_base=phys_base, kernel_image_size=image_size, struct_page_size=struct_page,
        pgd_paddr=None if init_top_pgt is None else base.pa_symbol(init_top_pgt),
    )
    if "arch_task_struct_size" not in syms:
        raise InputError(f"{root / 'proc/kallsyms'}: no arch_task_struct_size symbol")
    task_size = int.from_bytes(
        reader.read(amap.pa_symbol(syms["arch_task_struct_size"]), 4,
                    "kernel variable arch_task_struct_size"), "little")
    if task_size not in TASK_STRUCT_SANE:
        raise InputError(f"arch_task_struct_size reads {task_size}: the memory source does "
                         "not match this root")

    def ram_source() -> list[RamRange]:
        text = _read_text(root, "proc/iomem")
        return ram_ranges_from_resources(parse_iomem(text, str(iomem_path)).system_ram(),
                                         amap.page_size,
                                         online_memory_end_pfn(root, amap.page_size))

    kclist = KcoreList(amap, ram_source, flavour=flavour,
                       hotplug_state=lambda: online_memory_blocks(root))
    return System(root=root, source=src, addrmap=amap, vmcoreinfo=info, cmdline=cmdline,
                  osrelease=osrelease or info.osrelease or "", task_struct_size=task_size,
                  kclist=kclist, symbols=syms, flavour=flavour)


def _check_source_size(src: MemorySource, iomem: Iomem) -> None:
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
        changed = new != self._entries
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


def _discover_from_kcore(root: Path, src: Any, flavour: str) -> System:
    """A real /proc/kcore as source: its own headers and notes are the truth."""
    psinfo = find_note(src.core, CORE_NAME, NT_PRPSINFO)
    cmdline = prpsinfo_psargs(psinfo).decode("utf-8", "surrogateescape") if psinfo else ""
    task = find_note(src.core, CORE_NAME, NT_TASKSTRUCT)
    vmci = src.vmcoreinfo  # the source's VMCOREINFO note
    if not vmci:
        raise InputError(f"{src.path}: no VMCOREINFO note (kernel older than 4.19?)")
    info = VmcoreInfo.parse(vmci)
    from kcore import arch

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

    osrelease = (_read_text(root, "proc/sys/kernel/osrelease", required=False) or "").strip()
    return System(root=root, source=src, addrmap=amap, vmcoreinfo=info, cmdline=cmdline,
                  osrelease=osrelease or info.osrelease or "",
                  task_struct_size=len(task) if task else 0,
                  kclist=SegmentKcoreList(load, amap), task_struct=task, flavour=flavour)


def x86_64_kcore_map(info: VmcoreInfo, segs: list[Any]) -> AddressMap:
    """x86-64: the address map of a real kcore, from its program headers and VMCOREINFO."""
    text = next((s for s in segs if s.paddr != ALL_ONES and s.vaddr >= X86_64_START_KERNEL_MAP),
                None)
    ram = [s for s in segs if s.paddr != ALL_ONES and s.vaddr < X86_64_START_KERNEL_MAP]
    vmalloc = [s for s in segs if s.paddr == ALL_ONES and s.vaddr < X86_64_START_KERNEL_MAP]
    levels = 5 if info.number("pgtable_l5_enabled") else 4
    phys_base = info.number("phys_base") or 0
    page_offset = (ram[0].vaddr - ram[0].paddr) if ram else None
    amap = x86_64_map(
        text_start=text.vaddr if text else 0, text_end=text.vaddr + text.size if text else 0,
        pgtable_levels=levels, page_offset=page_offset,
        vmalloc_start=vmalloc[0].vaddr if vmalloc else None,
        vmemmap_start=min((s.vaddr for s in vmalloc[1:]), default=None),
        phys_base=phys_base,
        kernel_image_size=info.number("KERNEL_IMAGE_SIZE") or X86_64_KERNEL_IMAGE_SIZE,
        struct_page_size=info.size("page") or 64,
        pgd_paddr=None,
    )
    pgd = info.symbol("init_top_pgt")
    if pgd is not None:
        amap = amap.with_(pgd_paddr=amap.pa_symbol(pgd))
    return amap


__all__ = ["System", "discover"]
