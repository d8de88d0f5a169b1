"""Per-architecture kernel address-space constants, and the translations built on them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

ULONG_MAX = (1 << 64) - 1
ALL_ONES = ULONG_MAX  # p_paddr of segments with no physical address (vmalloc, modules, vmemmap)
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT  # x86-64's page (and arm64's 4K granule): the unit of reads

TiB = 1 << 40

# x86-64 (arch/x86/include/asm/pgtable_64_types.h, page_64_types.h) for Linux >= 4.19.
X86_64_START_KERNEL_MAP = 0xFFFFFFFF80000000  # __START_KERNEL_map
X86_64_MODULES_END = 0xFFFFFFFFFF000000  # MODULES_END
X86_64_L4 = {
    "page_offset": 0xFFFF888000000000,  # __PAGE_OFFSET_BASE_L4
    "vmalloc_start": 0xFFFFC90000000000,  # __VMALLOC_BASE_L4
    "vmalloc_size_tb": 32,  # VMALLOC_SIZE_TB_L4
    "vmemmap_start": 0xFFFFEA0000000000,  # __VMEMMAP_BASE_L4
    "virtual_mask_shift": 47,  # __VIRTUAL_MASK_SHIFT
    "max_physmem_bits": 46,  # MAX_PHYSMEM_BITS
}
X86_64_L5 = {
    "page_offset": 0xFF11000000000000,  # __PAGE_OFFSET_BASE_L5
    "vmalloc_start": 0xFFA0000000000000,  # __VMALLOC_BASE_L5
    "vmalloc_size_tb": 12800,  # VMALLOC_SIZE_TB_L5
    "vmemmap_start": 0xFFD4000000000000,  # __VMEMMAP_BASE_L5
    "virtual_mask_shift": 56,
    "max_physmem_bits": 52,
}
# KERNEL_IMAGE_SIZE: 1 GiB with CONFIG_RANDOMIZE_BASE (every distribution kernel), else 512 MiB.
X86_64_KERNEL_IMAGE_SIZE = 1 << 30


@dataclass(frozen=True)
class AddressMap:
    """The kernel's virtual address map for one boot, with the translations kcore needs."""

    arch: str
    page_offset: int
    vmalloc_start: int
    vmalloc_size: int
    modules_start: int
    modules_size: int
    vmemmap_start: int
    text_start: int
    text_end: int
    phys_base: int = 0
    start_kernel_map: int = X86_64_START_KERNEL_MAP
    pgtable_levels: int = 4
    page_size: int = 4096
    struct_page_size: int = 64
    virtual_mask_shift: int = 47
    max_physmem_bits: int = 46
    phys_offset: int = 0  # arm64 PHYS_OFFSET (memstart_addr); 0 on x86-64
    highmem: bool = False
    pgd_paddr: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def page_shift(self) -> int:
        """log2 of the page size."""
        return self.page_size.bit_length() - 1

    @property
    def vmalloc_end(self) -> int:
        """VMALLOC_END (inclusive, as the kernel defines it on x86-64)."""
        return self.vmalloc_start + self.vmalloc_size

    def va(self, paddr: int) -> int:
        """__va(): the direct-map address of a physical address (wraps like unsigned long)."""
        return (paddr - self.phys_offset + self.page_offset) & ULONG_MAX

    def pa(self, vaddr: int) -> int:
        """__pa() of a direct-map address."""
        return (vaddr - self.page_offset + self.phys_offset) & ULONG_MAX

    def pa_symbol(self, vaddr: int) -> int:
        """__pa_symbol(): the physical address of a kernel-image address."""
        return (vaddr - self.start_kernel_map + self.phys_base) & ULONG_MAX

    def pfn_to_page(self, pfn: int) -> int:
        """pfn_to_page() under SPARSEMEM_VMEMMAP: the struct page address of a pfn."""
        return (self.vmemmap_start + pfn * self.struct_page_size) & ULONG_MAX

    def kc_vaddr_to_offset(self, vaddr: int, layout: str = "modern") -> int:
        """kc_vaddr_to_offset(): where an address's bytes sit, relative to data_offset."""
        if layout == "2.6" or self.arch != "x86_64":
            return (vaddr - self.page_offset) & ULONG_MAX  # the seed's default
        return vaddr & ((1 << self.virtual_mask_shift) - 1)  # x86-64: v & __VIRTUAL_MASK

    def in_direct_map(self, vaddr: int) -> bool:
        """Whether an address lies in the direct map (below the vmalloc area)."""
        return self.page_offset <= vaddr < self.vmalloc_start

    def with_(self, **changes: Any) -> AddressMap:
        """A copy with some fields changed."""
        return replace(self, **changes)


def x86_64_map(
    *,
    text_start: int,
    text_end: int,
    pgtable_levels: int = 4,
    page_offset: int | None = None,
    vmalloc_start: int | None = None,
    vmemmap_start: int | None = None,
    phys_base: int = 0,
    kernel_image_size: int = X86_64_KERNEL_IMAGE_SIZE,
    struct_page_size: int = 64,
    pgd_paddr: int | None = None,
) -> AddressMap:
    """The x86-64 layout; None bases take the non-KASLR defaults of the paging mode."""
    if pgtable_levels not in (4, 5):
        raise ValueError(f"x86-64 has 4- or 5-level paging, not {pgtable_levels}")
    d = X86_64_L4 if pgtable_levels == 4 else X86_64_L5
    vstart = d["vmalloc_start"] if vmalloc_start is None else vmalloc_start
    modules_start = X86_64_START_KERNEL_MAP + kernel_image_size  # MODULES_VADDR
    return AddressMap(
        arch="x86_64",
        page_offset=d["page_offset"] if page_offset is None else page_offset,
        vmalloc_start=vstart,
        # VMALLOC_END = VMALLOC_START + (VMALLOC_SIZE_TB << 40) - 1; kcore adds END - START.
        vmalloc_size=(d["vmalloc_size_tb"] * TiB) - 1,
        modules_start=modules_start,
        modules_size=X86_64_MODULES_END - modules_start,
        vmemmap_start=d["vmemmap_start"] if vmemmap_start is None else vmemmap_start,
        text_start=text_start,
        text_end=text_end,
        phys_base=phys_base & ULONG_MAX,
        pgtable_levels=pgtable_levels,
        struct_page_size=struct_page_size,
        virtual_mask_shift=d["virtual_mask_shift"],
        max_physmem_bits=d["max_physmem_bits"],
        pgd_paddr=pgd_paddr,
    )
