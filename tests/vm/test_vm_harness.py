"""The harness itself: the guest runs this checkout, and its captures are the real kernel's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.vm import qemu_vm
from tests.vm.guests import Guest
from tests.vm.pagecmp import differing_pages

PT_NOTE, PT_LOAD = 4, 1
ALL_ONES = (1 << 64) - 1
PAGE = 4096


def loads(guest: Guest) -> list[dict]:
    """The real kcore's PT_LOADs, in file order."""
    return [p for p in guest.kcore["phdrs"] if p["p_type"] == PT_LOAD]


def system_ram(guest: Guest) -> list[tuple[int, int]]:
    """Top-level System RAM ranges of the guest's /proc/iomem, as (start, end inclusive)."""
    out = []
    for line in (guest.root / "proc/iomem").read_text().splitlines():
        if not line.startswith(" ") and line.endswith(": System RAM"):
            lo, hi = line.split(" : ")[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def test_guest_runs_this_checkout(guest: Guest) -> None:
    """The guest boots the cached kernel, with the host's Python importing this checkout."""
    out = guest.vm.python(
        "import json, os, platform, kcore\n"
        "print(json.dumps([platform.release(), kcore.__file__, open('/proc/cmdline').read(),"
        " os.path.exists('/proc/kcore')]))\n"
    ).check().stdout
    release, kcore_file, cmdline, has_kcore = json.loads(out)
    assert release == guest.vm.kernel.release
    assert kcore_file.startswith(str(qemu_vm.REPO / "kcore"))
    assert ("nokaslr" in cmdline.split()) == (not guest.vm.config.kaslr)
    assert has_kcore


def test_real_kcore_layout(guest: Guest) -> None:
    """The captured real kcore has the modern x86-64 shape of docs/kernel-facts.md section 2."""
    k = guest.kcore
    assert (k["e_type"], k["e_machine"], k["e_phoff"]) == (4, 62, 64)
    note = k["phdrs"][0]
    assert note["p_type"] == PT_NOTE and note["p_offset"] == 64 + 56 * k["e_phnum"]
    assert [(n["name"], n["type"]) for n in k["notes"]] == [
        ("CORE", 1), ("CORE", 3), ("CORE", 4), ("VMCOREINFO", 0)]
    assert [n["descsz"] for n in k["notes"][:2]] == [336, 136]
    segs = loads(guest)
    for p in segs:
        assert p["p_offset"] == (p["p_vaddr"] & ((1 << 47) - 1)) + k["data_offset"]
        assert (p["p_flags"], p["p_align"], p["p_filesz"]) == (7, PAGE, p["p_memsz"])
    assert k["st_size"] == max(p["p_offset"] + p["p_filesz"] for p in segs)
    # TEXT, vmalloc, modules, then each RAM range and its vmemmap
    assert segs[0]["p_paddr"] != ALL_ONES and segs[0]["p_vaddr"] >= 0xFFFFFFFF80000000
    assert segs[1]["p_paddr"] == segs[2]["p_paddr"] == ALL_ONES
    ram = segs[3::2]
    assert all(p["p_paddr"] != ALL_ONES for p in ram)
    assert all(p["p_paddr"] == ALL_ONES for p in segs[4::2])
    page_offset = ram[0]["p_vaddr"] - ram[0]["p_paddr"]
    assert all(p["p_vaddr"] - p["p_paddr"] == page_offset for p in ram)
    assert (page_offset == 0xFFFF888000000000) == (not guest.vm.config.kaslr)
    # walk_system_ram_range: whole pages only (start rounded up, end rounded down)
    pages = [(-(-lo // PAGE) * PAGE, (hi + 1) // PAGE * PAGE) for lo, hi in system_ram(guest)]
    iomem = [(lo, hi - lo) for lo, hi in pages if hi > lo]
    assert [(p["p_paddr"], p["p_filesz"]) for p in ram] == iomem


def test_ram_file_is_guest_physical_memory(small_guest: Guest) -> None:
    """Below 4 GiB the RAM file holds physical memory: the real kcore's TEXT bytes are there."""
    guest = small_guest
    text = loads(guest)[0]
    out = guest.vm.share / "text.bin"
    guest.vm.run(f"dd if=/proc/kcore of={out} bs=1M count=2 iflag=skip_bytes "
                 f"skip={text['p_offset']} 2>/dev/null\n").check()
    with guest.vm.paused(), open(guest.vm.ram_path, "rb") as ram:
        ram.seek(text["p_paddr"])
        assert ram.read(2 << 20) == out.read_bytes()
    out.unlink()


def test_ram_above_4g(big_guest: Guest) -> None:
    """Above the PCI hole: QEMU's core puts RAM at p_paddr 4 GiB, where the real kcore reads it."""
    guest = big_guest
    ram = loads(guest)[3::2]
    high = next(p for p in ram if p["p_paddr"] == 1 << 32)
    low_end = max(p["p_paddr"] + p["p_filesz"] for p in ram if p["p_paddr"] < 1 << 32)
    out = guest.vm.share / "high.bin"
    vmcore = qemu_vm.SHM / (guest.vm.workdir.name + ".vmcore")
    try:
        # stable pages: the first 4 MiB above 4 GiB are untouched free memory or page tables
        guest.vm.run(f"dd if=/proc/kcore of={out} bs=1M count=4 iflag=skip_bytes "
                     f"skip={high['p_offset']} 2>/dev/null\n").check()
        with guest.vm.paused():
            guest.vm.dump_guest_memory(vmcore, begin=1 << 32, length=4 << 20)
            with open(guest.vm.ram_path, "rb") as f:
                # QEMU pc: RAM above 4 GiB follows the below-4G part in the RAM file
                f.seek(-(-low_end // (1 << 30)) << 30)
                in_ram_file = f.read(4 << 20)
        with open(vmcore, "rb") as f:
            elf = ELFFile(f)
            notes = [n for s in elf.iter_segments("PT_NOTE") for n in s.iter_notes()]
            info = next(n for n in notes if n["n_name"] == "VMCOREINFO")
            real = next(n for n in guest.kcore["notes"] if n["name"] == "VMCOREINFO")
            assert info["n_descdata"] == bytes.fromhex(real["desc"])
            (seg,) = elf.iter_segments("PT_LOAD")
            assert (seg["p_paddr"], seg["p_filesz"]) == (1 << 32, 4 << 20)
            assert seg.data() == in_ram_file
            # the kernel kept running between the guest's read and the pause
            drift = differing_pages(out.read_bytes(), in_ram_file)
            print(f"pages changed above 4 GiB between read and pause: {len(drift)} of 1024")
            assert len(drift) <= 64
    finally:
        vmcore.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


def _ours(tag: str) -> list[str]:
    """Processes, RAM files and work directories of this pytest run whose name has `tag`."""
    prefix = f"kcore-vm-{os.getpid()}-{tag}-"
    found = [str(p) for p in [*qemu_vm.SHM.glob(prefix + "*"),
                              *(qemu_vm.CACHE / "runs").glob(prefix + "*")]]
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and prefix in (proc / "cmdline").read_text():
                found.append(f"pid {proc.name}")
        except OSError:
            pass
    return found


def test_failed_boot_leaves_nothing(vm_pool) -> None:
    """A guest that panics at boot raises VmError; its QEMU, RAM file and files are gone."""
    config = qemu_vm.VmConfig("broken", mem_mib=256, extra_append="rdinit=/nonexistent")
    with pytest.raises(qemu_vm.VmError, match="panic|exited"):
        qemu_vm.boot(config)
    assert _ours("broken") == []


def test_guest_command_timeout(nokaslr_guest: Guest) -> None:
    """A guest command past its timeout is killed in the guest (rc 124); the next one runs."""
    r = nokaslr_guest.vm.run("sleep 60\n", timeout=1)
    assert r.rc == 124 and r.seconds < 30
    assert nokaslr_guest.vm.run("echo ok\n").check().stdout == "ok\n"
