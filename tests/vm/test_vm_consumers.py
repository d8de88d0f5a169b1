"""`kcore dump` run in the guest (its live /proc/kcore as source), opened by drgn and Volatility."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.helpers import debug_vmlinux, volatility_cmd
from tests.vm import qemu_vm
from tests.vm.guests import Guest, Pool
from tests.vm.test_vm_data import segment_offset
from tests.vm.test_vm_harness import loads

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


def test_crash_opens_the_guest_dump(kaslr_guest: Guest, guest_dump: GuestDump) -> None:
    """crash, with the kernel's debug vmlinux, on the dump of the live KASLR guest (read on
    its 2 CPUs): the release, the command line the guest booted with, the kernel log."""
    crash = shutil.which("crash")
    if crash is None:
        pytest.skip("crash is not installed (.ci/run installs it)")
    release = guest_dump.guest.vm.kernel.release
    vmlinux = debug_vmlinux()
    if release not in vmlinux.name:
        pytest.skip(f"the debug vmlinux is {vmlinux.name}, the guest runs {release}")
    cmdline = (guest_dump.guest.root / "proc/cmdline").read_text().strip()
    r = subprocess.run([crash, "-s", str(vmlinux), str(guest_dump.path)],
                       input="sys\np saved_command_line\nlog\nquit\n", capture_output=True,
                       text=True, timeout=600)
    assert f"RELEASE: {release}" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert f'"{cmdline}"' in r.stdout, r.stdout[-3000:]
    assert f"Linux version {release}" in r.stdout


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


_CODE_CHECK = r"""
import os, sys
from elftools.elf.elffile import ELFFile
line = next(x for x in open("/proc/iomem") if "Kernel code" in x)
lo, hi = (int(v, 16) for v in line.split(":")[0].strip().split("-"))
hi += 1
with open("/proc/kcore", "rb") as f:
    seg = next(s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"
               and s["p_paddr"] <= lo and hi <= s["p_paddr"] + s["p_filesz"]
               and s["p_vaddr"] < 0xffffffff80000000)  # the direct map's RAM segment
    real = os.pread(f.fileno(), hi - lo, seg["p_offset"] + lo - seg["p_paddr"])
with open(sys.argv[1], "rb") as d:
    got = os.pread(d.fileno(), hi - lo, lo)  # raw: file offset = physical address
print(len(real) // 4096, sum(real[i:i + 4096] != got[i:i + 4096]
                             for i in range(0, len(real), 4096)))
"""


def test_threaded_dump_of_the_live_kcore(kaslr_guest: Guest) -> None:
    """Threads reading the live /proc/kcore each need their own open file: 6.1's read_kcore()
    copies every page through one bounce page per open file, and with one fd shared by four
    threads on this 2-CPU guest a quarter of the kernel code pages came out as other pages.
    The kernel code (static, from /proc/iomem) of a 4-thread raw dump equals the real kcore's.
    """
    vm = kaslr_guest.vm
    assert vm.run("nproc\n").check().stdout.strip() == "2"
    out = vm.share / "threads.raw"
    vm.kcore("dump", "--format", "raw", "--source", "kcore:/proc/kcore", "--threads", "4",
             "--quiet", "--no-digest", "-o", str(out), timeout=600).check()
    try:
        pages, differing = vm.python(_CODE_CHECK, str(out)).check().stdout.split()
        assert int(pages) > 1000 and int(differing) == 0
    finally:
        out.unlink(missing_ok=True)
