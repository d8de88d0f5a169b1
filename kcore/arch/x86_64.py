"""x86-64: the kernel address map from kallsyms, VMCOREINFO and kernel variables in memory.

Kernel facts (arch/x86/include/asm/page_64_types.h, pgtable_64_types.h; docs/kernel-facts.md):
the image at __START_KERNEL_map, the direct map at page_offset_base, vmalloc at vmalloc_base,
vmemmap at vmemmap_base (variables in memory under CONFIG_RANDOMIZE_MEMORY), 4 or 5 page-table
levels (VMCOREINFO's pgtable_l5_enabled) from init_top_pgt.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kcore.addrmap import (
    ALL_ONES,
    X86_64_KERNEL_IMAGE_SIZE,
    X86_64_START_KERNEL_MAP,
    AddressMap,
    x86_64_map,
)
from kcore.errors import InputError
from kcore.iomem import parse_iomem
from kcore.kallsyms import parse_kallsyms
from kcore.kclist import KcoreList, RamRange, kcore_text_x86_64, ram_ranges_from_resources
from kcore.rootfiles import read_root_text, root_word
from kcore.system import (
    TASK_STRUCT_SANE,
    PhysReader,
    System,
    check_same_release,
    check_source_size,
    load_vmcoreinfo,
    online_memory_blocks,
    online_memory_end_pfn,
)
from kcore.vmcoreinfo import VmcoreInfo
from kcore.vmem import PageWalker

if TYPE_CHECKING:
    from kcore.sources.base import MemorySource


def discover(root: Path, src: MemorySource, layout: str) -> System:
    """x86-64: the address map from kallsyms, VMCOREINFO and kernel variables in memory."""
    iomem_path = root / "proc/iomem"
    iomem = parse_iomem(read_root_text(root, "proc/iomem"), str(iomem_path))
    syms = parse_kallsyms(read_root_text(root, "proc/kallsyms") or "",
                          where=str(root / "proc/kallsyms"))
    cmdline = (read_root_text(root, "proc/cmdline") or "").rstrip("\n")
    check_source_size(src, iomem)
    reader = PhysReader(src)
    info = load_vmcoreinfo(root, reader)
    osrelease = root_word(root, "proc/sys/kernel/osrelease") or ""
    check_same_release(root, osrelease, src, info)
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
        text = read_root_text(root, "proc/iomem")
        return ram_ranges_from_resources(parse_iomem(text, str(iomem_path)).system_ram(),
                                         amap.page_size,
                                         online_memory_end_pfn(root, amap.page_size))

    kclist = KcoreList(amap, ram_source, layout=layout,
                       hotplug_state=lambda: online_memory_blocks(root))
    return System(root=root, source=src, addrmap=amap, vmcoreinfo=info, cmdline=cmdline,
                  osrelease=osrelease or info.osrelease or "", task_struct_size_of=task_size,
                  kclist=kclist, symbols=syms, layout=layout)


def walker(system: Any, source: Any) -> PageWalker | None:
    """The page walker of an x86-64 system (None without init_top_pgt)."""
    amap = system.addrmap
    if amap.pgd_paddr is None:
        return None
    info = getattr(system, "vmcoreinfo", None)
    sme = (info.number("sme_mask") if info is not None else 0) or 0
    return PageWalker.for_source(source, amap.pgd_paddr, amap.pgtable_levels, sme_mask=sme)


kcore_text = kcore_text_x86_64  # the kernel-text PT_LOAD of a real x86-64 /proc/kcore


def kcore_map(info: VmcoreInfo, segs: list[Any]) -> AddressMap:
    """x86-64: the address map of a real kcore, from its program headers and VMCOREINFO."""
    text = kcore_text(info, segs)
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
