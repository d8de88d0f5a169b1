"""The kclist rules of fs/proc/kcore.c on synthetic inputs, against values worked out by hand."""

from __future__ import annotations

from pathlib import Path

from kcore.addrmap import x86_64_map
from kcore.iomem import parse_iomem
from kcore.kclist import (
    KcoreList,
    KcoreType,
    RamRange,
    highmem_ram_entries,
    ram_entries,
    ram_ranges_from_resources,
)
from kcore.system import online_memory_blocks, online_memory_end_pfn

TEXT = dict(text_start=0xFFFFFFFF81000000, text_end=0xFFFFFFFF84430000)
L4 = x86_64_map(**TEXT)


def pairs(entries):
    return [(e.type, e.vaddr, e.size) for e in entries]


def test_walk_system_ram_range_rounds_inward_to_whole_pages():
    # 00001000-0009fbff: PFN_UP(0x1000)=1, PFN_DOWN(0x9fc00)=0x9f
    assert ram_ranges_from_resources([(0x1000, 0x9FBFF), (0x100, 0x7FF)]) == [RamRange(1, 0x9E)]


def test_ram_above_4g_gets_direct_map_and_vmemmap_addresses():
    ents = ram_entries([RamRange(0x100000, 0x80000)], L4)
    assert pairs(ents) == [
        (KcoreType.RAM, 0xFFFF888000000000 + 0x100000000, 0x80000000),
        # vmemmap_base + pfn * sizeof(struct page) = 0xffffea0000000000 + 0x100000 * 64
        (KcoreType.VMEMMAP, 0xFFFFEA0004000000, 0x80000 * 64),
    ]
    assert ents[0].paddr == 0x100000000


def test_5_level_defaults():
    l5 = x86_64_map(pgtable_levels=5, **TEXT)
    ents = ram_entries([RamRange(0x100, 0x100)], l5)
    assert pairs(ents) == [
        (KcoreType.RAM, 0xFF11000000100000, 0x100000),
        (KcoreType.VMEMMAP, 0xFFD4000000004000, 0x4000),
    ]
    assert l5.kc_vaddr_to_offset(0xFF11000000100000) == 0x11000000100000  # & (2^56 - 1)


def test_ulong_max_cut_leaves_the_kernels_unaligned_size():
    lay = L4.with_(page_offset=0xFFFFFFFF00000000, vmalloc_start=0xFFFF000000000000)
    ents = ram_entries([RamRange(0xF0000, 0x20000)], lay, vmemmap=False)
    # addr = 0xfffffffff0000000; ULONG_MAX - addr = 0xfffffff < 0x20000000
    assert pairs(ents) == [(KcoreType.RAM, 0xFFFFFFFFF0000000, 0xFFFFFFF)]


def test_cut_at_vmalloc_start_and_seed_drops_ranges_above_it():
    lay = L4.with_(vmalloc_start=0xFFFF888000000000 + 0x30000000)
    ranges = [RamRange(0, 0x40000), RamRange(0x50000, 0x100)]
    modern = ram_entries(ranges, lay, vmemmap=False)
    seed = ram_entries(ranges, lay, "2.6", vmemmap=False)
    assert pairs(seed) == [(KcoreType.RAM, 0xFFFF888000000000, 0x30000000)]
    # Linux >= 4.19 trims only ranges that start below VMALLOC_START.
    assert pairs(modern) == [
        (KcoreType.RAM, 0xFFFF888000000000, 0x30000000),
        (KcoreType.RAM, 0xFFFF888050000000, 0x100000),
    ]


def test_sanity_check_drops_ranges_that_wrap_below_the_direct_map():
    # __va(0x800000000000) wraps past 2^64 to 0x0000088000000000 < PAGE_OFFSET
    for layout in ("modern", "2.6"):
        assert ram_entries([RamRange(0x800000000, 0x10)], L4, layout) == []


def test_vmemmap_overlap_between_adjacent_small_ranges():
    ents = ram_entries([RamRange(1, 0x9E), RamRange(0xA0, 0x20), RamRange(0xC0, 0x140)], L4)
    assert pairs(ents) == [
        (KcoreType.RAM, 0xFFFF888000001000, 0x9E000),
        (KcoreType.VMEMMAP, 0xFFFFEA0000000000, 0x3000),  # [0x40, 0x27c0) page-aligned
        # pfn 0xa0-0xc0 -> [0x2000, 0x3000): overlaps, end cut to 0 -> no entry
        (KcoreType.RAM, 0xFFFF8880000A0000, 0x20000),
        (KcoreType.RAM, 0xFFFF8880000C0000, 0x140000),
        (KcoreType.VMEMMAP, 0xFFFFEA0000003000, 0x5000),  # [0x3000, 0x8000)
    ]


def test_vmemmap_overlap_cuts_back_to_the_earlier_entry():
    ents = ram_entries([RamRange(0x100, 0x100), RamRange(0x40, 0xE0)], L4)
    # second: [0x1000, ALIGN(0x4800 - 1)=0x5000) overlaps [0x4000, 0x8000): end = 0x4000
    assert pairs(ents)[3] == (KcoreType.VMEMMAP, 0xFFFFEA0000001000, 0x3000)


def test_highmem_variant_is_one_range_from_va_zero():
    assert pairs(highmem_ram_entries(0x38000, L4)) == [
        (KcoreType.RAM, 0xFFFF888000000000, 0x38000000)
    ]


def test_static_entries_order_and_paddr():
    kl = KcoreList(L4, lambda: [RamRange(1, 0x9E)])
    kinds = [e.kind for e in kl.entries]
    assert kinds == ["KCORE_TEXT", "KCORE_VMALLOC(vmalloc area)", "KCORE_VMALLOC(modules area)",
                     "KCORE_RAM", "KCORE_VMEMMAP"]
    text = kl.entries[0]
    assert text.paddr == 0x1000000  # __pa_symbol(0xffffffff81000000), phys_base 0
    assert kl.entries[1].size == 32 * (1 << 40) - 1  # VMALLOC_END - VMALLOC_START
    assert (kl.entries[2].vaddr, kl.entries[2].size) == (0xFFFFFFFFC0000000, 0x3F000000)


def _write_root(root: Path, iomem: str, blocks: dict[str, str]) -> None:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/iomem").write_text(iomem)
    for name, state in blocks.items():
        d = root / "sys/devices/system/memory" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "state").write_text(state + "\n")


def test_hotplug_rebuilds_ram_on_next_refresh(tmp_path: Path):
    base = "00001000-0009fbff : System RAM\n00100000-3fffffff : System RAM\n"
    _write_root(tmp_path, base, {"memory0": "online", "memory8": "offline"})

    def ram():
        return ram_ranges_from_resources(
            parse_iomem((tmp_path / "proc/iomem").read_text()).system_ram())

    kl = KcoreList(L4, ram, hotplug_state=lambda: online_memory_blocks(tmp_path))
    assert len(kl.entries) == 3 + 4
    assert kl.refresh() is False  # nothing changed: no rebuild

    # A DIMM comes online: iomem gains a range and a memory block changes state.
    _write_root(tmp_path, base + "100000000-13fffffff : System RAM\n", {"memory8": "online"})
    assert kl.refresh() is True
    ram_entries_now = [e for e in kl.entries if e.type == KcoreType.RAM]
    assert ram_entries_now[-1].vaddr == 0xFFFF888000000000 + 0x100000000
    assert ram_entries_now[-1].size == 0x40000000

    # A DIMM added but not onlined is no MEM_ONLINE event: the kclist stays as it was.
    _write_root(tmp_path, base + "100000000-13fffffff : System RAM\n"
                "140000000-17fffffff : System RAM\n", {"memory10": "offline"})
    assert kl.refresh() is False
    assert [e.vaddr for e in kl.entries if e.type == KcoreType.RAM][-1] == (
        0xFFFF888000000000 + 0x100000000)

    # And goes away again.
    _write_root(tmp_path, base, {"memory8": "offline"})
    (tmp_path / "sys/devices/system/memory/memory10/state").unlink()
    (tmp_path / "sys/devices/system/memory/memory10").rmdir()
    assert kl.refresh() is True
    assert [e.vaddr for e in kl.entries if e.type == KcoreType.RAM] == [
        0xFFFF888000001000, 0xFFFF888000100000]
    assert [e.kind for e in kl.entries[:3]] == [
        "KCORE_TEXT", "KCORE_VMALLOC(vmalloc area)", "KCORE_VMALLOC(modules area)"]


def test_offline_hot_added_memory_lies_past_the_walk(tmp_path: Path):
    """kcore_ram_list() walks System RAM up to the highest online block's end only."""
    iomem = ("00001000-0009fbff : System RAM\n00100000-3fffffff : System RAM\n"
             "100000000-13fffffff : System RAM\n")
    blocks = {f"memory{i}": "online" for i in range(8)}  # 8 x 128 MiB blocks: 0-1 GiB
    blocks.update({f"memory{i}": "offline" for i in range(32, 40)})  # the DIMM at 4 GiB
    _write_root(tmp_path, iomem, blocks)
    (tmp_path / "sys/devices/system/memory/block_size_bytes").write_text("8000000\n")
    end = online_memory_end_pfn(tmp_path)
    assert end == (1 << 30) >> 12
    ranges = ram_ranges_from_resources(parse_iomem(iomem).system_ram(), 4096, end)
    assert ranges == [RamRange(1, 0x9E), RamRange(0x100, 0x40000 - 0x100)]
    # Onlined, the DIMM's blocks move the end past it.
    _write_root(tmp_path, iomem, {f"memory{i}": "online" for i in range(32, 40)})
    assert online_memory_end_pfn(tmp_path) == (0x140000000 >> 12)


def test_sysfs_vmcoreinfo_is_two_hex_numbers():
    from kcore.vmcoreinfo import parse_sysfs_vmcoreinfo

    # the fixture kernel's /sys/kernel/vmcoreinfo: "%lx %x" of the note's address and
    # VMCOREINFO_NOTE_SIZE (2 * 12 + 12 + 4096 = 0x1024 bytes)
    assert parse_sysfs_vmcoreinfo("0x0000000004bb4000 1024\n", "x") == (0x4BB4000, 0x1024)


def test_kallsyms_takes_core_kernel_symbols_only():
    from kcore.kallsyms import parse_kallsyms

    text = ("ffffffff81000000 T _stext\n"
            "ffffffffc0001000 t _text\t[fake_mod]\n"  # a module's symbol of the same name
            "ffffffff81000000 T _text\n"
            "ffffffff82000000 D my_text\n"
            "ffffffff84430000 B _end\n")
    syms = parse_kallsyms(text)
    assert syms["_text"] == 0xFFFFFFFF81000000 and syms["_end"] == 0xFFFFFFFF84430000
    assert "my_text" not in syms


def test_kallsyms_hidden_by_kptr_restrict_says_run_as_root():
    import pytest

    from kcore.errors import InputError
    from kcore.kallsyms import parse_kallsyms

    with pytest.raises(InputError, match="run as root"):
        parse_kallsyms("0000000000000000 T _text\n0000000000000000 B _end\n")
