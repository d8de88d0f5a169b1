"""`kcore dump --format kdump` in the live KASLR guest (its /proc/kcore): crash and drgn open it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import debug_vmlinux
from tests.vm.guests import Guest, Pool

pytestmark = pytest.mark.guest("kaslr")  # the fixture below takes it: run with its group

@pytest.fixture(scope="module")
def guest_kdump(vm_pool: Pool) -> tuple[Guest, Path, dict]:
    """The KASLR guest dumps itself (live /proc/kcore, its 2 CPUs) as zstd kdump."""
    guest = vm_pool.get("kaslr")
    out = guest.vm.share / "mem.kdump"
    r = guest.vm.kcore("dump", "--format", "kdump", "--quiet", "--json", "-o", str(out),
                       timeout=600).check()
    return guest, out, json.loads(r.stdout)


def banner(guest: Guest) -> int:
    """linux_banner's address in the guest's /proc/kallsyms."""
    for line in (guest.root / "proc/kallsyms").open():
        addr, _t, name = line.split()[:3]
        if name == "linux_banner":
            return int(addr, 16)
    raise AssertionError("no linux_banner")


def test_the_summary_says_what_was_compressed(guest_kdump) -> None:
    _guest, out, summary = guest_kdump
    c = summary["compression"]
    assert c["codec"] == "zstd" and c["output_bytes"] == out.stat().st_size
    assert c["ratio"] > 1.5 and summary["pages_zero_filled"] == 0
    assert out.read_bytes()[:8] == b"KDUMP   "


def test_drgn_reads_the_live_guests_kdump(guest_kdump) -> None:
    drgn = pytest.importorskip("drgn", reason="drgn is not installed (.ci/run installs it)")
    guest, out, _summary = guest_kdump
    prog = drgn.Program()
    prog.set_core_dump(str(out))
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL  # VMCOREINFO, KASLR offset included
    release = guest.vm.kernel.release
    assert prog.read(banner(guest), 64).startswith(f"Linux version {release}".encode())


def test_crash_opens_the_live_guests_kdump(guest_kdump) -> None:
    crash = shutil.which("crash")
    if crash is None:
        pytest.skip("crash is not installed (.ci/run installs it)")
    guest, out, _summary = guest_kdump
    release = guest.vm.kernel.release
    vmlinux = debug_vmlinux()
    if release not in vmlinux.name:
        pytest.skip(f"the debug vmlinux is {vmlinux.name}, the guest runs {release}")
    cmdline = (guest.root / "proc/cmdline").read_text().strip()
    r = subprocess.run([crash, "-s", str(vmlinux), str(out)],
                       input="sys\np saved_command_line\nlog\nps\nquit\n", capture_output=True,
                       text=True, timeout=600)
    assert f"RELEASE: {release}" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert f'"{cmdline}"' in r.stdout, r.stdout[-3000:]
    assert f"Linux version {release}" in r.stdout
    assert "swapper/0" in r.stdout
