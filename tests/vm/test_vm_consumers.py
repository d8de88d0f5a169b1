"""`kcore dump` run in the guest (its live /proc/kcore as source), opened by drgn and Volatility."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import qemu_vm
from elftools.elf.elffile import ELFFile
from guests import Guest, Pool
from test_vm_data import segment_offset
from test_vm_harness import loads

from tests.conftest import volatility_cmd

RELEASE_BANNER = b"Linux version "


@dataclass
class GuestDump:
    """A dump made in the guest, and what the real kcore held at a few addresses then."""

    guest: Guest
    path: Path
    summary: dict
    real: dict[int, bytes]


def kallsyms(guest: Guest, *names: str) -> dict[str, int]:
    """Addresses of symbols in the guest's captured /proc/kallsyms."""
    out: dict[str, int] = {}
    for line in (guest.root / "proc/kallsyms").open():
        addr, _t, name = line.split()[:3]
        if name in names and name not in out:
            out[name] = int(addr, 16)
    return out


@pytest.fixture(scope="module")
def guest_dump(vm_pool: Pool) -> GuestDump:
    """`kcore dump --modules` (and --format lime) in the KASLR guest; real bytes to compare."""
    guest = vm_pool.get("kaslr")
    vm = guest.vm
    out = vm.share / "mem.elf"
    r = vm.kcore("dump", "--modules", "--quiet", "--json", "--no-digest", "-o", str(out),
                 timeout=300).check()
    summary = json.loads(r.stdout)
    vm.kcore("dump", "--format", "lime", "--quiet", "--no-digest", "-o",
             str(out.with_suffix(".lime")), timeout=300).check()
    # what the real kcore holds, read right after the dump: banner, module text, kernel text
    syms = kallsyms(guest, "linux_banner", "_text")
    module = int((guest.root / "proc/modules").read_text().split()[5], 16)
    real = {}
    for vaddr, size in ((syms["linux_banner"], 256), (module, 8192), (syms["_text"], 65536)):
        off = segment_offset(guest, vaddr, size)
        got = vm.run(f"dd if=/proc/kcore bs=4k iflag=skip_bytes,count_bytes skip={off} "
                     f"count={size} 2>/dev/null | od -An -v -tx1\n").check().stdout
        real[vaddr] = bytes.fromhex("".join(got.split()))
    return GuestDump(guest, out, summary, real)


def test_drgn_reads_the_guest_dump(kaslr_guest: Guest, guest_dump: GuestDump) -> None:
    """drgn finds VMCOREINFO; banner, kernel text and module text read as the real kcore did."""
    drgn = pytest.importorskip("drgn", reason="drgn is not installed (.ci/run installs it)")
    prog = drgn.Program()
    prog.set_core_dump(str(guest_dump.path))
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    for vaddr, real in guest_dump.real.items():
        assert prog.read(vaddr, len(real)) == real, hex(vaddr)
    release = guest_dump.guest.vm.kernel.release.encode()
    assert any(r.startswith(RELEASE_BANNER + release) for r in guest_dump.real.values())


@pytest.mark.parametrize("fmt", ["elf", "lime"])
def test_volatility_finds_the_guest_banner(kaslr_guest: Guest, guest_dump: GuestDump, fmt: str,
                                          tmp_path: Path) -> None:
    """Volatility 3's banners plugin finds this kernel's banner in the guest's ELF and LiME."""
    cmd = volatility_cmd()
    image = guest_dump.path.with_suffix(f".{fmt}")
    r = subprocess.run([*cmd, "-q", "--cache-path", str(tmp_path), "-f", str(image),
                        "banners.Banners"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path)))
    release = guest_dump.guest.vm.kernel.release
    assert f"Linux version {release}" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_dump_matches_real_kcore(kaslr_guest: Guest, guest_dump: GuestDump) -> None:
    """The dump's VMCOREINFO is the real one; its physical segments lie in the real RAM/TEXT."""
    real = guest_dump.guest.kcore
    phys = [(p["p_paddr"], p["p_paddr"] + p["p_filesz"]) for p in loads(guest_dump.guest)
            if p["p_paddr"] != qemu_vm.ALL_ONES]
    with open(guest_dump.path, "rb") as f:
        elf = ELFFile(f)
        notes = [n for s in elf.iter_segments("PT_NOTE") for n in s.iter_notes()]
        info = next(n for n in notes if n["n_name"] == "VMCOREINFO")
        assert info["n_descdata"] == bytes.fromhex(real["notes"][3]["desc"])
        for seg in elf.iter_segments("PT_LOAD"):
            if seg["p_paddr"] != qemu_vm.ALL_ONES:
                end = seg["p_paddr"] + seg["p_filesz"]
                assert any(lo <= seg["p_paddr"] and end <= hi for lo, hi in phys)
    assert guest_dump.summary["pages_zero_filled"] == 0
