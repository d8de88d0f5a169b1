"""The 2.6 (seed) header layout and the psargs rules, checked with pyelftools."""

from __future__ import annotations

import io
import json

from elftools.elf.elffile import ELFFile

from tests.helpers import FIXTURE_NAMES, fixture_memory, shared_fixture


def test_psargs_strncpy_in_the_seed_and_strscpy_since():
    from kcore.elfcore import prpsinfo

    cmdline = "console=ttyS0 " + "x" * 90
    seed, modern = prpsinfo(cmdline, "2.6"), prpsinfo(cmdline)
    assert len(seed) == len(modern) == 136  # sizeof(struct elf_prpsinfo) on x86-64
    assert seed[1:2] == modern[1:2] == b"R"
    assert seed[40:56] == modern[40:56] == b"vmlinux" + bytes(9)
    assert seed[56:136] == cmdline.encode()[:80]  # strncpy: no NUL at 80 chars
    assert modern[56:136] == cmdline.encode()[:79] + b"\0"  # strscpy: always terminated


def test_seed_layout_header_follows_the_seed_formulas():
    from kcore.discover import discover
    from kcore.elfcore import build_header

    name = FIXTURE_NAMES[0]
    fx = shared_fixture(name)
    system = discover(fx / "root", f"raw:{fixture_memory(name)}", layout="2.6")
    try:
        hdr = build_header(system, "2.6")
        page_offset = system.addrmap.page_offset
    finally:
        system.close()
    elf = ELFFile(io.BytesIO(hdr.data))
    segs = list(elf.iter_segments())
    nphdr = len(segs)
    assert nphdr == 8 and elf["e_phnum"] == 8
    # the kernel's arch_task_struct_size: its real kcore's NT_TASKSTRUCT descsz
    real = json.loads((fx / "expected/kcore.json").read_text())
    task = next(n["descsz"] for n in real["notes"] if (n["name"], n["type"]) == ("CORE", 4))
    # elf_buflen = PAGE_ALIGN(ehdr + (nphdr+2)*phdr + 3*(nhdr + "CORE" padded) + prstatus
    #                         + prpsinfo + task_struct)
    buflen = 64 + (nphdr + 2) * 56 + 3 * (12 + 8) + 336 + 136 + task
    assert hdr.data_offset == (buflen + 4095) & ~4095 == len(hdr.data)
    note = segs[0]
    assert note["p_type"] == "PT_NOTE" and note["p_offset"] == 64 + nphdr * 56
    assert note["p_filesz"] == (12 + 8 + 336) + (12 + 8 + 136) + (12 + 8 + task)
    names = [(n["n_name"], n["n_type"]) for n in note.iter_notes()]
    assert names == [("CORE", "NT_PRSTATUS"), ("CORE", "NT_PRPSINFO"), ("CORE", "NT_TASKSTRUCT")]
    for seg in segs[1:]:
        assert seg["p_paddr"] == 0
        # the seed's default kc_vaddr_to_offset(v) = v - PAGE_OFFSET
        assert seg["p_offset"] == seg["p_vaddr"] - page_offset + hdr.data_offset
