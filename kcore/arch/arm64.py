"""arm64 (aarch64): the kernel address map from VMCOREINFO, iomem and kallsyms, and the page walk.

Kernel facts (arch/arm64/include/asm/memory.h, pgtable-hwdef.h; Linux 6.1 and 6.12, 4 KiB
pages), checked against the real /proc/kcore of Debian's arm64 kernels in QEMU:
- PAGE_OFFSET = -(1 << VA_BITS), VA_BITS the configured maximum (NUMBER(VA_BITS)), even when
  the CPU runs fewer (TCR_EL1.T1SZ: 6.12 built for 52 bits runs 48 without LPA2). kcore's file
  offset of an address is (vaddr - PAGE_OFFSET) + data_offset (the generic
  kc_vaddr_to_offset()); the file ends at the highest segment end.
- The linear map: __va(pa) = (pa - PHYS_OFFSET) | PAGE_OFFSET, PHYS_OFFSET = memstart_addr,
  signed (below 0 when the linear map is randomized or a 52-bit kernel runs with 48 bits).
- The kernel image: __pa_symbol(x) = x - kimage_voffset; _text = KIMAGE_VADDR + KERNELOFFSET
  with KIMAGE_VADDR = MODULES_END (6.1's kallsyms has no _text or _end: no KALLSYMS_ALL);
  _end's physical address ends iomem's "Kernel data".
- vmemmap = VMEMMAP_START - (memstart_addr >> PAGE_SHIFT) struct pages.
- kclist order (proc_kcore_init(), kcore_ram_list()): text [_text, _end), vmalloc
  [VMALLOC_START, VMALLOC_END), modules [MODULES_VADDR, MODULES_END), then per System RAM
  range its linear map and its vmemmap.
- NT_TASKSTRUCT is sizeof(struct task_struct) (arm64 has no arch_task_struct_size): the
  task_struct slab's object size in /proc/slabinfo.
- Page tables (swapper_pg_dir, SYMBOL in VMCOREINFO): 4 KiB granule, 9 bits a level, as many
  levels as the VA bits in use need (39: 3, 48: 4, 52: 5, the top one of 16 entries).
  Descriptor bits [1:0]: 0b11 a table (a page at the last level), 0b01 a block (1 GiB, 2 MiB);
  output address bits [47:12] (+ [49:48], and [51:50] from bits [9:8] with LPA2, i.e. 52-bit
  VAs). The contiguous bit is a TLB hint: every entry still holds its own address.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kcore.addrmap import ULONG_MAX, AddressMap
from kcore.errors import InputError
from kcore.iomem import parse_iomem
from kcore.kallsyms import parse_kallsyms
from kcore.kclist import KcoreList, RamRange, kcore_text_arm64, ram_ranges_from_resources
from kcore.rootfiles import read_root_text, root_word
from kcore.system import (
    PhysReader,
    System,
    check_same_release,
    load_vmcoreinfo,
    online_memory_blocks,
    online_memory_end_pfn,
)
from kcore.vmem import PageWalker, Run, add_run

PAGE_SIZE = 4096
PAGE_SHIFT = 12
_VALID = 1
_TYPE_MASK = 3
_TYPE_TABLE = 3  # a table (a page at the last level)
_TYPE_BLOCK = 1
_OA_MASK = ((1 << 50) - 1) & ~(PAGE_SIZE - 1)  # output address bits [49:12]
_KERNEL_DATA = re.compile(r"^\s+([0-9a-fA-F]+)-([0-9a-fA-F]+) : Kernel data$", re.M)
LEVELS = {39: 3, 48: 4, 52: 5}  # VA bits in use -> page-table levels (4 KiB granule)
_SLAB_TASK = re.compile(r"^task_struct\s+\d+\s+\d+\s+(\d+)\s", re.M)


def _signed(v: int) -> int:
    """A 64-bit value as the kernel's s64."""
    v &= ULONG_MAX
    return v - (1 << 64) if v >> 63 else v


def _need(info: Any, key: str) -> int:
    """NUMBER(key) of VMCOREINFO, or a one-line InputError saying it is missing."""
    v: int | None = info.number(key)
    if v is None:
        raise InputError(f"VMCOREINFO has no NUMBER({key}): not an arm64 kernel kcore knows "
                         "(Linux 5.x+ exports it)")
    return v


def address_map(info: Any, syms: dict[str, int], iomem_text: str) -> AddressMap:
    """The arm64 kernel address map of one boot, from VMCOREINFO, kallsyms and /proc/iomem."""
    page = info.pagesize or PAGE_SIZE
    if page != PAGE_SIZE:
        raise InputError(f"arm64 kernel with {page // 1024} KiB pages: kcore supports 4 KiB "
                         "pages only")
    va_bits = _need(info, "VA_BITS")
    t1sz = info.number("TCR_EL1_T1SZ")
    va_bits_actual = 64 - t1sz if t1sz else va_bits
    if va_bits_actual not in LEVELS:
        raise InputError(f"arm64 kernel with {va_bits_actual}-bit virtual addresses: kcore "
                         "supports 39, 48 and 52 with 4 KiB pages")
    page_offset = (-(1 << va_bits)) & ULONG_MAX
    phys_offset = _need(info, "PHYS_OFFSET") & ULONG_MAX
    kimage_voffset = _need(info, "kimage_voffset") & ULONG_MAX
    modules_start = _need(info, "MODULES_VADDR") & ULONG_MAX
    modules_end = _need(info, "MODULES_END") & ULONG_MAX
    vmalloc_start = (info.number("VMALLOC_START") or modules_end) & ULONG_MAX
    vmalloc_end = _need(info, "VMALLOC_END") & ULONG_MAX
    vmemmap_region = _need(info, "VMEMMAP_START") & ULONG_MAX
    struct_page = info.size("page") or 64
    # vmemmap = (struct page *)VMEMMAP_START - (memstart_addr >> PAGE_SHIFT)
    vmemmap = (vmemmap_region - (_signed(phys_offset) >> PAGE_SHIFT) * struct_page) & ULONG_MAX
    text_start = syms.get("_text")
    if text_start is None:
        text_start = (modules_end + info.kerneloffset) & ULONG_MAX  # KIMAGE_VADDR + offset
    text_end = syms.get("_end")
    if text_end is None:
        m = _KERNEL_DATA.search(iomem_text)
        if not m:
            raise InputError("arm64: kallsyms has no _end and /proc/iomem no 'Kernel data' "
                             "line: cannot tell where the kernel image ends")
        text_end = (int(m.group(2), 16) + 1 + kimage_voffset) & ULONG_MAX
    stext = syms.get("_stext")
    if stext is not None and not text_start <= stext < text_end:
        raise InputError(f"kallsyms _stext {stext:#x} is outside the kernel image "
                         f"[{text_start:#x}, {text_end:#x}) VMCOREINFO describes: root and "
                         "source are from different boots")
    pgd = info.symbol("swapper_pg_dir")
    levels = LEVELS[va_bits_actual]
    return AddressMap(
        arch="aarch64",
        page_offset=page_offset,
        vmalloc_start=vmalloc_start,
        vmalloc_size=vmalloc_end - vmalloc_start,
        modules_start=modules_start,
        modules_size=modules_end - modules_start,
        vmemmap_start=vmemmap,
        text_start=text_start,
        text_end=text_end,
        start_kernel_map=kimage_voffset,  # __pa_symbol(x) = x - kimage_voffset
        phys_base=0,
        pgtable_levels=levels,
        page_size=PAGE_SIZE,
        struct_page_size=struct_page,
        virtual_mask_shift=va_bits,
        max_physmem_bits=info.number("MAX_PHYSMEM_BITS") or 48,
        phys_offset=phys_offset,
        pgd_paddr=None if pgd is None else (pgd - kimage_voffset) & ULONG_MAX,
        extra={"va_bits_actual": va_bits_actual, "vmemmap_region_start": vmemmap_region},
    )


def task_struct_size(root: Path) -> int:
    """sizeof(struct task_struct): the task_struct slab's object size in proc/slabinfo."""
    path = root / "proc/slabinfo"
    try:
        text = path.read_bytes().decode("ascii", "replace")
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}: arm64 needs it for the size of struct "
                         "task_struct (NT_TASKSTRUCT); run as root") from None
    m = _SLAB_TASK.search(text)
    if not m:
        raise InputError(f"{path}: no task_struct cache: cannot tell the size of NT_TASKSTRUCT")
    return int(m.group(1))


class Arm64PageWalker(PageWalker):
    """Translate and read kernel virtual addresses through arm64's TTBR1 tables."""

    def __init__(self, read_phys: Any, pgd_paddr: int, va_bits: int = 48, *,
                 readinto_phys: Any = None) -> None:
        if va_bits not in LEVELS:
            raise ValueError(f"arm64 with 4 KiB pages runs 39, 48 or 52 VA bits, not {va_bits}")
        super().__init__(read_phys, pgd_paddr, 4, readinto_phys=readinto_phys)
        self.pgd_paddr = pgd_paddr & ~(PAGE_SIZE - 1)
        self.levels = LEVELS[va_bits]
        self.lpa2 = va_bits == 52  # 4 KiB pages reach 52 bits only with LPA2's format
        self._top_shift = PAGE_SHIFT + 9 * (self.levels - 1)  # 30, 39 or 48
        self._top_mask = (1 << (va_bits - self._top_shift)) - 1  # 511, or 15 at 52 bits
        self._block_max = 39 if self.lpa2 else 30  # a level-0 block exists only with LPA2

    def _oa(self, entry: int) -> int:
        """The output address of a descriptor."""
        pa = entry & _OA_MASK
        if self.lpa2:
            pa |= ((entry >> 8) & 3) << 50
        return pa

    def translate(self, vaddr: int) -> tuple[int, int] | None:
        """The physical address of vaddr and the size of its mapping, or None if unmapped."""
        table = self._table(self.pgd_paddr)
        shift = self._top_shift
        mask = self._top_mask
        while True:
            entry = table[(vaddr >> shift) & mask]
            mask = 511
            if not entry & _VALID:
                return None
            size = 1 << shift
            kind = entry & _TYPE_MASK
            if shift == PAGE_SHIFT:
                if kind != _TYPE_TABLE:
                    return None
                return self._oa(entry) + (vaddr & (size - 1)), size
            if kind == _TYPE_BLOCK:
                if shift > self._block_max:
                    return None
                return (self._oa(entry) & ~(size - 1)) + (vaddr & (size - 1)), size
            table = self._table(self._oa(entry))
            shift -= 9

    def _runs(self, table_paddr: int, shift: int, start: int, end: int,
              out: list[Run]) -> None:
        """Collect runs for [start, end) from one table level (recursion depth <= levels)."""
        self._visit(table_paddr, shift, start)
        table = self._table(table_paddr)
        size = 1 << shift
        low = size - 1
        block_ok = shift <= self._block_max
        mask = self._top_mask if shift == self._top_shift else 511
        va = start
        while va < end:
            nxt = min(end, (va | low) + 1)
            entry = table[(va >> shift) & mask]
            if entry & _VALID:
                kind = entry & _TYPE_MASK
                leaf = (kind == _TYPE_TABLE) if shift == PAGE_SHIFT else \
                    (kind == _TYPE_BLOCK and block_ok)
                if leaf:
                    pa = (self._oa(entry) & ~low) + (va & low)
                    self._mapped(nxt - va, va)
                    add_run(out, va, pa, nxt - va)
                elif kind == _TYPE_TABLE and shift > PAGE_SHIFT:
                    self._runs(self._oa(entry), shift - 9, va, nxt, out)
            va = nxt


def walker(system: Any, source: Any) -> Arm64PageWalker | None:
    """The page walker of an arm64 system (None without swapper_pg_dir)."""
    amap = system.addrmap
    if amap.pgd_paddr is None:
        return None
    walker = Arm64PageWalker(source.read_phys, amap.pgd_paddr,
                             amap.extra.get("va_bits_actual", 48),
                             readinto_phys=source.readinto_phys)
    walker.bound_by(source)
    return walker


kcore_text = kcore_text_arm64  # the kernel-image PT_LOAD of a real arm64 /proc/kcore


def kcore_map(info: Any, segs: list[Any]) -> AddressMap:
    """The address map of a real arm64 /proc/kcore: VMCOREINFO, the text from its PT_LOAD."""
    _need(info, "MODULES_VADDR")
    text = kcore_text(info, segs)
    syms = {"_text": text.vaddr, "_end": text.vaddr + text.size} if text else {}
    return address_map(info, syms, "")


def discover(root: Path, src: Any, layout: str) -> System:
    """An arm64 System from a system root (proc/, sys/ files) and a memory source."""
    iomem_path = root / "proc/iomem"
    iomem_text = read_root_text(root, "proc/iomem") or ""
    iomem = parse_iomem(iomem_text, str(iomem_path))
    kallsyms = read_root_text(root, "proc/kallsyms") or ""
    syms = parse_kallsyms(kallsyms, where=str(root / "proc/kallsyms"), required=("_stext",))
    cmdline = (read_root_text(root, "proc/cmdline") or "").rstrip("\n")
    reader = PhysReader(src)
    info = load_vmcoreinfo(root, reader)
    osrelease = root_word(root, "proc/sys/kernel/osrelease") or ""
    check_same_release(root, osrelease, src, info)
    amap = address_map(info, syms, iomem_text)

    def ram_source() -> list[RamRange]:
        text = read_root_text(root, "proc/iomem") or ""
        return ram_ranges_from_resources(parse_iomem(text, str(iomem_path)).system_ram(),
                                         amap.page_size,
                                         online_memory_end_pfn(root, amap.page_size))

    del iomem
    kclist = KcoreList(amap, ram_source, layout=layout,
                       hotplug_state=lambda: online_memory_blocks(root))
    return System(root=root, source=src, addrmap=amap, vmcoreinfo=info, cmdline=cmdline,
                    osrelease=osrelease or info.osrelease or "",
                    task_struct_size_of=lambda: task_struct_size(root), kclist=kclist,
                    symbols=syms, layout=layout)
