"""The kclist: the kernel memory ranges /proc/kcore exposes, built by fs/proc/kcore.c's rules."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kcore.addrmap import ALL_ONES, ULONG_MAX, X86_64_START_KERNEL_MAP, AddressMap
from kcore.wire.elf import EM_BY_ARCH


class KcoreType(enum.IntEnum):
    """enum kcore_type (include/linux/kcore.h)."""

    TEXT = 0
    VMALLOC = 1
    RAM = 2
    VMEMMAP = 3
    USER = 4


@dataclass(frozen=True)
class KcoreEntry:
    """One kclist entry: a PT_LOAD of /proc/kcore."""

    vaddr: int
    size: int
    type: KcoreType
    paddr: int = ALL_ONES
    label: str = ""

    @property
    def end(self) -> int:
        """The first address past the entry."""
        return self.vaddr + self.size

    @property
    def kind(self) -> str:
        """A readable name: KCORE_TEXT, KCORE_VMALLOC(modules area)..."""
        name = f"KCORE_{self.type.name}"
        return f"{name}({self.label})" if self.label else name


@dataclass(frozen=True)
class RamRange:
    """A range of System RAM, in page frames, as walk_system_ram_range() hands it out."""

    pfn: int
    nr_pages: int


def ram_ranges_from_resources(
    resources: Iterable[tuple[int, int]], page_size: int = 4096, max_pfn: int | None = None
) -> list[RamRange]:
    """walk_system_ram_range(0, max_pfn): [start, end] byte ranges -> whole pages inside each."""
    shift = page_size.bit_length() - 1
    out = []
    for start, end in resources:
        pfn = (start + page_size - 1) >> shift  # PFN_UP(res.start)
        end_pfn = (end + 1) >> shift  # PFN_DOWN(res.end + 1)
        if max_pfn is not None:
            end_pfn = min(end_pfn, max_pfn)
        if end_pfn > pfn:
            out.append(RamRange(pfn, end_pfn - pfn))
    return out


def _vmemmap_entry(
    ram: KcoreEntry, head: Sequence[KcoreEntry], amap: AddressMap
) -> KcoreEntry | None:
    """get_sparsemem_vmemmap_info(): the struct page range of a RAM entry, trimmed for overlap."""
    page_mask = ~(amap.page_size - 1) & ULONG_MAX
    pfn = amap.pa(ram.vaddr) >> amap.page_shift
    nr_pages = ram.size >> amap.page_shift
    start = amap.pfn_to_page(pfn) & page_mask
    end = (amap.pfn_to_page(pfn + nr_pages) - 1) & ULONG_MAX
    end = (end + amap.page_size - 1) & page_mask  # PAGE_ALIGN
    # "overlap check (because we have to align page)": the kernel's own rule, kept as is,
    # including that an overlapping range is cut back to the earlier entry's start.
    for tmp in head:
        if tmp.type != KcoreType.VMEMMAP:
            continue
        if start < tmp.vaddr + tmp.size and end > tmp.vaddr:
            end = tmp.vaddr
    if start < end:
        return KcoreEntry(start, end - start, KcoreType.VMEMMAP)
    return None


def ram_entries(
    ranges: Iterable[RamRange], amap: AddressMap, layout: str = "modern", vmemmap: bool = True
) -> list[KcoreEntry]:
    """kcore_ram_list(): RAM entries (each followed by its VMEMMAP entry) by kclist_add_private."""
    head: list[KcoreEntry] = []
    direct_map_base = amap.va(amap.phys_offset)  # __va(0) / PAGE_OFFSET
    for r in ranges:
        phys = r.pfn << amap.page_shift
        addr = amap.va(phys)
        size = r.nr_pages << amap.page_shift
        if layout == "2.6":
            # "Sanity check: Can happen in 32bit arch...maybe"
            if addr < direct_map_base:
                continue
        else:
            # virt_addr_valid(): inside the direct map and below MAX_PHYSMEM_BITS.
            if addr < direct_map_base or (phys >> amap.max_physmem_bits):
                continue
        # "cut not-mapped area. ....from ppc-32 code."
        if ULONG_MAX - addr < size:
            size = ULONG_MAX - addr
        if layout == "2.6":
            # "cut when vmalloc() area is higher than direct-map area"
            if amap.vmalloc_start > direct_map_base:
                if addr > amap.vmalloc_start:
                    continue
                if amap.vmalloc_start - addr < size:
                    size = amap.vmalloc_start - addr
        elif amap.vmalloc_start > addr and amap.vmalloc_start - addr < size:
            size = amap.vmalloc_start - addr
        ent = KcoreEntry(addr, size, KcoreType.RAM, paddr=amap.pa(addr))
        head.append(ent)
        if vmemmap:
            vmm = _vmemmap_entry(ent, head, amap)
            if vmm is not None:
                head.append(vmm)
    return head


def highmem_ram_entries(max_low_pfn: int, amap: AddressMap) -> list[KcoreEntry]:
    """The CONFIG_HIGHMEM kcore_update_ram(): one RAM entry [__va(0), max_low_pfn pages)."""
    addr = amap.va(amap.phys_offset)
    return [KcoreEntry(addr, max_low_pfn << amap.page_shift, KcoreType.RAM,
                       paddr=amap.pa(addr))]


def static_entries(amap: AddressMap) -> list[KcoreEntry]:
    """proc_kcore_init(): the text, vmalloc and modules entries, in the kernel's order."""
    out = []
    if amap.text_end > amap.text_start:  # proc_kcore_text_init()
        out.append(KcoreEntry(amap.text_start, amap.text_end - amap.text_start,
                              KcoreType.TEXT, paddr=amap.pa_symbol(amap.text_start)))
    out.append(KcoreEntry(amap.vmalloc_start, amap.vmalloc_size, KcoreType.VMALLOC,
                          label="vmalloc area"))
    # add_modules_range(): only where the modules area is not inside the vmalloc area.
    if (amap.modules_size and amap.modules_start != amap.vmalloc_start
            and amap.modules_start + amap.modules_size != amap.vmalloc_end):
        out.append(KcoreEntry(amap.modules_start, amap.modules_size, KcoreType.VMALLOC,
                              label="modules area"))
    return out


class Kclist(Protocol):
    """What readers need of a kclist: its entries, and open_kcore()'s refresh."""

    @property
    def entries(self) -> list[KcoreEntry]:
        """The entries, in the order the header lists them."""
        ...

    def mark_need_update(self) -> None:
        """Rebuild on the next refresh() (memory hotplug)."""
        ...

    def refresh(self) -> bool:
        """Rebuild if an update is pending; True if the entries changed."""
        ...


class KcoreList:
    """The kclist with kcore's update protocol: RAM rebuilt on open when hotplug flagged it."""

    def __init__(
        self,
        amap: AddressMap,
        ram_source: Callable[[], list[RamRange]],
        *,
        layout: str = "modern",
        hotplug_state: Callable[[], object] | None = None,
        highmem_max_low_pfn: int | None = None,
    ) -> None:
        self.addrmap = amap
        self.layout = layout
        self._ram_source = ram_source
        self._hotplug_state = hotplug_state
        self._max_low_pfn = highmem_max_low_pfn
        self._lock = threading.RLock()
        self._static = static_entries(amap)
        self._entries: list[KcoreEntry] = list(self._static)
        self._hotplug_seen: object = None
        self.need_update = True  # "static int kcore_need_update = 1;"
        self.refresh()

    @property
    def entries(self) -> list[KcoreEntry]:
        """A snapshot of the entries, in the kernel's order."""
        with self._lock:
            return list(self._entries)

    def mark_need_update(self) -> None:
        """kcore_callback(): memory went online or offline; rebuild RAM on the next open."""
        with self._lock:
            self.need_update = True

    def _poll(self) -> object:
        """Read the memory-block states once; flag an update if they moved since the build."""
        if self._hotplug_state is None:
            return None
        state = self._hotplug_state()
        with self._lock:
            if state != self._hotplug_seen:
                self.need_update = True
        return state

    def refresh(self) -> bool:
        """open_kcore(): rebuild RAM/VMEMMAP entries if an update is pending; True if rebuilt."""
        state = self._poll()
        with self._lock:
            if not self.need_update:
                return False
            if self._max_low_pfn is not None:
                ram = highmem_ram_entries(self._max_low_pfn, self.addrmap)
            else:
                ram = ram_entries(self._ram_source(), self.addrmap, self.layout)
            # __kcore_update_ram(): replace every RAM/VMEMMAP entry with the new list.
            kept = [e for e in self._entries if e.type not in (KcoreType.RAM, KcoreType.VMEMMAP)]
            self._entries = kept + ram
            self._hotplug_seen = state
            self.need_update = False
            return True


def kcore_text_x86_64(info: Any, segs: list[Any]) -> Any:
    """The kernel-text PT_LOAD of a real x86-64 /proc/kcore (above __START_KERNEL_map, its
    p_paddr aliasing RAM), or None."""
    return next((s for s in segs if s.paddr != ALL_ONES and s.vaddr >= X86_64_START_KERNEL_MAP),
                None)


def kcore_text_arm64(info: Any, segs: list[Any]) -> Any:
    """The kernel-image PT_LOAD of a real arm64 /proc/kcore (p_paddr = __pa_symbol, aliasing
    RAM): the one with a physical address above MODULES_VADDR, where the linear map is not;
    None without it, or without VMCOREINFO to say where that is."""
    modules = None if info is None else info.number("MODULES_VADDR")
    if modules is None:
        return None
    return next((s for s in segs if s.paddr != ULONG_MAX and s.vaddr >= modules & ULONG_MAX),
                None)


# The kernel-image PT_LOAD of a real /proc/kcore, by ELF machine (x86-64's rule elsewhere):
# kcore.sources.kcore keeps it out of the physical view, kcore.arch builds the address map.
KCORE_TEXT: dict[int, Callable[[Any, list[Any]], Any]] = {
    EM_BY_ARCH["x86_64"]: kcore_text_x86_64, EM_BY_ARCH["aarch64"]: kcore_text_arm64}
