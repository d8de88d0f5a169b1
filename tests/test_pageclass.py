"""The mem_map found through both SPARSEMEM section layouts, on small synthetic images.

The real captures are SPARSEMEM_EXTREME with VMEMMAP (tests/test_dumplevel.py). Here a
sparse raw image holds a mem_section tree laid out as include/linux/mmzone.h lays it, either
the EXTREME one (SYMBOL(mem_section) is an array of root pointers) or the static one
(SYMBOL(mem_section) is the array of sections itself), with the struct pages in the direct
map as SPARSEMEM without VMEMMAP places them, and a few free blocks (PageBuddy, order 10).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from kcore.pageclass import classify, mem_map_sections, page_rules
from kcore.sources import open_source
from kcore.vmcoreinfo import VmcoreInfo

PAGE_OFFSET = 0xFFFF888000000000
RAM = 1 << 30  # 8 sections of 128 MiB
SECTIONS = 0x100000  # physical: the mem_section data
MEM_MAP = 0x400000  # physical: the struct pages (16 MiB for 1 GiB)
FIELDS = """OSRELEASE=6.1.0-56-amd64
PAGESIZE=4096
SIZE(mem_section)=32
OFFSET(mem_section.section_mem_map)=0
NUMBER(SECTION_SIZE_BITS)=27
NUMBER(MAX_PHYSMEM_BITS)=46
SIZE(page)=64
OFFSET(page.flags)=0
OFFSET(page.mapping)=24
OFFSET(page._mapcount)=48
OFFSET(page.private)=40
OFFSET(page.compound_head)=8
OFFSET(page.compound_order)=17
OFFSET(page.compound_dtor)=16
LENGTH(zone.free_area)=11
NUMBER(PG_lru)=4
NUMBER(PG_private)=13
NUMBER(PG_swapcache)=10
NUMBER(PG_slab)=9
NUMBER(PG_hwpoison)=23
NUMBER(PG_head_mask)=65536
NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129
"""
FREE_BLOCKS = (1024, 40960, 200704)  # pfns of order-10 free blocks


def image(tmp_path, extreme: bool):
    """(system, path): a 1 GiB synthetic kernel whose section 3 has no mem_map."""
    path = tmp_path / "ram.raw"
    coded = ((PAGE_OFFSET + MEM_MAP) | 1).to_bytes(8, "little")  # present, one block
    sections = b"".join((bytes(32) if nr == 3 else coded + bytes(24)) for nr in range(8))
    with open(path, "wb") as f:
        f.truncate(RAM)
        if extreme:  # root 0 -> its 128 sections, a page after the root array
            f.seek(SECTIONS)
            f.write((PAGE_OFFSET + SECTIONS + 4096).to_bytes(8, "little"))
            f.seek(SECTIONS + 4096)
        else:
            f.seek(SECTIONS)
        f.write(sections)
        for pfn in FREE_BLOCKS:
            f.seek(MEM_MAP + pfn * 64 + 40)
            f.write((10).to_bytes(8, "little") + (-129 & 0xFFFFFFFF).to_bytes(4, "little"))
    length = 4096 if extreme else 1 << 19  # NR_SECTION_ROOTS either way
    text = (FIELDS + f"SYMBOL(mem_section)={PAGE_OFFSET + SECTIONS:x}\n"
            f"LENGTH(mem_section)={length}\n")
    amap = SimpleNamespace(page_size=4096, page_offset=PAGE_OFFSET, max_physmem_bits=46,
                           phys_offset=0, pgd_paddr=None, arch="x86_64")
    source = open_source(f"raw:{path}")
    return SimpleNamespace(vmcoreinfo=VmcoreInfo.parse(text.encode()), addrmap=amap,
                           source=source)


@pytest.mark.parametrize("extreme", [True, False], ids=["extreme", "static"])
def test_sections_and_free_blocks(tmp_path, extreme):
    system = image(tmp_path, extreme)
    try:
        npfn = RAM // 4096
        sections = mem_map_sections(system, npfn)
        assert [s.pfn_start for s in sections] == [n << 15 for n in (0, 1, 2, 4, 5, 6, 7)]
        assert all(s.mem_map == PAGE_OFFSET + MEM_MAP + s.pfn_start * 64 for s in sections)
        pc = classify(system, 16, [(0, RAM)])
    finally:
        system.source.close()
    assert pc.counts["free"] == 1024 * len(FREE_BLOCKS)
    assert pc.no_mem_map == 1 << 15  # section 3: kept, counted
    for pfn in FREE_BLOCKS:
        assert not any(pc.bitmap[(pfn + i) >> 3] >> ((pfn + i) & 7) & 1 for i in range(1024))
    assert pc.kept_pages(0, RAM) == npfn - 1024 * len(FREE_BLOCKS)


MEM_MAP_72 = Path(__file__).resolve().parent / "data" / "x86_64-7.2-mem_map"


def _kept_of_group(vmcoreinfo: str) -> tuple[set[int], list[str], int]:
    """(pfns kept at -d 31, the kernel's word on each, first pfn) for the captured group."""
    from kcore._native import ffi, lib

    said = json.loads((MEM_MAP_72 / "kernel-says.json").read_text())
    first, kinds = said["first_pfn"], said["kinds"]
    structs = (MEM_MAP_72 / "struct-pages.bin").read_bytes()
    rules = page_rules(VmcoreInfo.parse(vmcoreinfo.encode()), 31)
    end = first + len(kinds)
    bitmap = bytearray(-(-end // 8))
    for pfn in range(first, end):
        bitmap[pfn >> 3] |= 1 << (pfn & 7)
    counts, skip = ffi.new("struct kc_page_counts *"), ffi.new("uint64_t *")
    assert lib.kc_classify_pages(rules, ffi.from_buffer(structs), len(kinds), first,
                                 ffi.from_buffer(bitmap), end, skip, counts) == 0
    kept = {pfn for pfn in range(first, end) if bitmap[pfn >> 3] >> (pfn & 7) & 1}
    return kept, kinds, first


def test_7x_slab_tail_pages_are_kept() -> None:
    """7.x renamed page.compound_head to compound_info in VMCOREINFO: a slab's tail pages are
    still known as tails and kept with their head at -d 31 (real struct pages of a 7.2.13
    guest; the kernel's word on each from drgn: tests/vm/capture_mem_map.py)."""
    text = (MEM_MAP_72 / "vmcoreinfo").read_text()
    assert "OFFSET(page.compound_info)=" in text and "compound_head" not in text
    kept, kinds, first = _kept_of_group(text)
    slab = {first + i for i, k in enumerate(kinds) if k.endswith("-slab")}
    assert any(k == "tail-slab" for k in kinds)
    assert slab <= kept
    # the data holds the case: read as before (no tail marker), slab tails were left out
    old, _, _ = _kept_of_group(text.replace("OFFSET(page.compound_info)", "OFFSET(page.x)"))
    assert slab - old
