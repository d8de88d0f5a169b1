"""arm64 guests (qemu-system-aarch64 -M virt, Debian's 6.1 and 6.12): the harness first."""

from __future__ import annotations

import json
from pathlib import Path

from elftools.elf.elffile import ELFFile

import kcore
from tests.helpers import elf_read, run_kcore
from tests.vm.arm64 import PAGE, guest_read, kcore_offset, loads, phys_read, symbol, vmcoreinfo
from tests.vm.guests import Guest, assert_same_header
from tests.vm.qemu_vm import host_kcore

EM_AARCH64 = 183
ALL_ONES = (1 << 64) - 1


def test_harness_reads_real_arm64_kcore(arm64_guest: Guest, tmp_path: Path) -> None:
    """The guest's real kcore is arm64's; its kernel text read with dd is the RAM at that
    physical address, and QEMU's dump-guest-memory core of the guest is an arm64 core."""
    g = arm64_guest
    assert g.kcore["e_machine"] == EM_AARCH64
    info = vmcoreinfo(g)
    stext = symbol(g, "_stext")
    voff = int(info["NUMBER(kimage_voffset)"], 16)
    (text,) = guest_read(g, [(kcore_offset(g, stext), 16, 0)])
    core = tmp_path / "core"
    with g.vm.paused(), g.vm.physical_image() as image:
        assert phys_read(image, stext - voff, len(text)) == text
        g.vm.dump_guest_memory(core)
    with open(core, "rb") as f:
        elf = ELFFile(f)
        assert elf["e_machine"] == "EM_AARCH64"
        starts = sorted(s["p_paddr"] for s in elf.iter_segments() if s["p_type"] == "PT_LOAD")
    ram = [p["p_paddr"] for p in loads(g) if p["p_paddr"] != (1 << 64) - 1 and
           p["p_vaddr"] != g.kcore["phdrs"][1]["p_vaddr"]]
    assert starts[0] == ram[0] == g.vm.arch.ram_base


def _kcore_ranges(g: Guest, source: str) -> dict:
    """`kcore ranges --json` of the guest's files and its paused memory."""
    r = host_kcore("ranges", "--json", "--root", str(g.root), "--source", source)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def test_ranges_and_header_equal_real_arm64_kcore(arm64_guest: Guest, tmp_path: Path) -> None:
    """Every PT_LOAD field by field and in the kernel's order, data_offset, the file size and
    the header bytes (the reading task's NT_TASKSTRUCT aside) are the real arm64 kcore's."""
    g = arm64_guest
    out = tmp_path / "head.bin"
    core = tmp_path / "qemu.core"
    with g.vm.paused(), g.vm.physical_image() as image:
        ours = _kcore_ranges(g, f"raw:{image}")
        r = host_kcore("header", "--root", str(g.root), "--source", f"raw:{image}",
                       "-o", str(out))
        g.vm.dump_guest_memory(core)
    assert r.returncode == 0, r.stderr.decode()
    # QEMU's own core of the guest (EM_AARCH64, physical addresses) as the source too
    assert _kcore_ranges(g, f"elf:{core}") == ours
    rows = [(int(x["vaddr"], 16), int(x["paddr"], 16), int(x["size"], 16), int(x["offset"], 16))
            for x in ours["ranges"]]
    assert rows == [(p["p_vaddr"], p["p_paddr"], p["p_filesz"], p["p_offset"]) for p in loads(g)]
    assert int(ours["data_offset"], 16) == g.kcore["data_offset"]
    assert int(ours["file_size"], 16) == g.kcore["st_size"]
    assert_same_header(g, out.read_bytes())


def _regions(g: Guest) -> list[tuple[str, int, int, bool]]:
    """(what, vaddr, pages, strict) of the areas compared: kernel text from _text (on 6.1 its
    first 64 KiB are unmapped), text's linear-map alias, struct pages of the text, the start
    of the vmalloc area (vmalloc'd pages, ioremaps, guard holes) and a module."""
    info = vmcoreinfo(g)
    text = next(p for p in loads(g) if p["p_paddr"] != ALL_ONES and
                p["p_vaddr"] >= int(info["NUMBER(MODULES_VADDR)"], 16))
    ram = next(p for p in loads(g) if p["p_paddr"] != ALL_ONES and p is not text)
    mid = text["p_vaddr"] + (1 << 20)
    linear = ram["p_vaddr"] + (mid - int(info["NUMBER(kimage_voffset)"], 16) - ram["p_paddr"])
    vmemmap = next(p for p in loads(g) if p["p_vaddr"] >= int(info["NUMBER(VMEMMAP_START)"], 16))
    vmalloc_start = int(info.get("NUMBER(VMALLOC_START)") or info["NUMBER(MODULES_END)"], 16)
    module = min(int(line.split()[-1], 16) for line in
                 (g.root / "proc/modules").read_text().splitlines())
    # Without KASLR _text is VMALLOC_START, and vmalloc() hands out the unmapped 64 KiB
    # before _stext (stacks): there the text head changes like any vmalloc area.
    head = g.vm.config.kaslr
    return [("text head", text["p_vaddr"], 16, head), ("text", text["p_vaddr"] + 16 * PAGE, 16,
                                                        True), ("text", mid, 16, True),
            ("linear map", linear, 16, True), ("vmemmap", vmemmap["p_vaddr"], 8, False),
            ("vmalloc", vmalloc_start, 48, False), ("module", module, 8, False)]


def _alike(a: bytes, b: bytes) -> bool:
    """At most an eighth of two pages' 8-byte words differ: live fields updated between the
    guest's read and ours (struct page counts and flags), not another page read in its place."""
    wa, wb = memoryview(a).cast("Q"), memoryview(b).cast("Q")
    return sum(x != y for x, y in zip(wa, wb, strict=True)) <= len(wa) // 8


def test_reads_equal_real_arm64_kcore(arm64_guest: Guest, tmp_path: Path) -> None:
    """kcore's reads through the arm64 page tables (text, vmalloc, modules, vmemmap) and the
    linear map equal the guest's own /proc/kcore page by page: text and its linear alias
    exactly; vmalloc, module and struct page areas change while the guest runs, so at most a
    quarter of their pages may differ by more than live fields (see _alike). The text of an
    elf dump equals the real kcore's too."""
    g = arm64_guest
    regions = _regions(g)
    offsets = [kcore_offset(g, va) for _, va, _, _ in regions]
    real = guest_read(g, [(off, pages, 0) for off, (_, _, pages, _) in
                          zip(offsets, regions, strict=True)])
    dump = tmp_path / "mem.elf"
    with g.vm.paused(), g.vm.physical_image() as image, \
            kcore.open(str(g.root), f"raw:{image}") as f:
        ours = [f.pread(len(r), off) for off, r in zip(offsets, real, strict=True)]
        r = run_kcore("dump", "--root", str(g.root), "--source", f"raw:{image}", "--format",
                      "elf", "--no-digest", "-q", "-o", str(dump))
        assert r.returncode == 0, r.stderr.decode()
    for (what, va, pages, strict), b in zip(regions, real, strict=True):
        if what.startswith("text") and strict:
            assert elf_read(dump, va, pages * PAGE) == b, f"elf dump, {what} at {va:#x}"
    for (what, va, pages, strict), a, b in zip(regions, ours, real, strict=True):
        assert len(a) == len(b) == pages * PAGE, what
        same = (bytes.__eq__ if strict else _alike)
        differ = [i for i in range(pages)
                  if not same(a[i * PAGE:(i + 1) * PAGE], b[i * PAGE:(i + 1) * PAGE])]
        if strict:
            assert not differ, f"{what} at {va:#x}: pages {differ} differ"
        else:
            assert len(differ) <= pages // 4, f"{what} at {va:#x}: pages {differ} differ"
    if g.vm.config.kaslr and g.vm.kernel.release.startswith("6.1.0-"):
        # 6.1 maps the kernel image from _stext: the 64 KiB before it read as zeros
        assert ours[0] == bytes(16 * PAGE) == real[0]
