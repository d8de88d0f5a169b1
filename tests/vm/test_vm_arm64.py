"""arm64 guests (qemu-system-aarch64 -M virt, Debian's 6.1 and 6.12): the harness first."""

from __future__ import annotations

from pathlib import Path

from arm64 import guest_read, kcore_offset, loads, phys_read, symbol, vmcoreinfo
from elftools.elf.elffile import ELFFile
from guests import Guest

EM_AARCH64 = 183


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
