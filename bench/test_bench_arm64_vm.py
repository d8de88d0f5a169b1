"""`kcore dump` of a 1 GiB arm64 guest's core vs dd of it, and vs an x86-64 guest's core.

Two guests of the tests/vm harness boot with 1 GiB each: Debian's 6.1 arm64 kernel under
qemu-system-aarch64 (-M virt, TCG) and its 6.1 amd64 kernel under qemu-system-x86_64. Each
fills FILL_MIB of a tmpfs with non-zero bytes, its system files are captured, and QEMU's
`dump-guest-memory` core (with VMCOREINFO) is written; the guests are shut down before timing.
Interleaved rounds: dd of the arm64 core to /dev/null (bs=1M), `kcore dump --source elf:CORE
--format elf` of the arm64 core and of the x86-64 core (to a file in the same directory).

Run: python3 -m pytest bench/test_bench_arm64_vm.py --benchmark-only  (~5 GiB free in /dev/shm)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench_dump import ratio_line, run_timed

from tests.vm import qemu_vm

REPO = Path(__file__).resolve().parent.parent

ROUNDS = int(os.environ.get("KCORE_BENCH_ROUNDS", "5"))
SHM = Path(os.environ.get("KCORE_BENCH_DIR", "/dev/shm"))
MEM_MIB = 1024
FILL_MIB = 256
GB = 1e9
# busybox or the host's sh alike: a tmpfs filled with a 16 MiB random block, repeated
FILL = f"""
mkdir -p /tmp/fill && mount -t tmpfs -o size={FILL_MIB + 32}m tmpfs /tmp/fill
dd if=/dev/urandom of=/tmp/fill/block bs=1048576 count=16 2>/dev/null
i=0; while [ $i -lt {FILL_MIB // 16 - 1} ]; do cat /tmp/fill/block; i=$((i+1)); done \\
    > /tmp/fill/data
"""


def make_core(d: Path, name: str, config: qemu_vm.VmConfig) -> tuple[Path, Path, float]:
    """Boot, fill, capture and dump one guest: (root, core, boot seconds)."""
    vm = qemu_vm.boot(config)
    try:
        vm.run(FILL, timeout=600).check()
        capture = vm.share / "capture"
        if vm.arch.host_root:
            vm.run(f'"$KCORE_PY" {qemu_vm.HERE / "guest_capture.py"} {capture}\n').check()
        else:
            vm.run(f"sh {vm.share / 'guest_capture.sh'} {capture}\n").check()
        shutil.copytree(capture / "root", d / f"{name}-root")
        vm.qmp.execute("stop")
        core = vm.dump_guest_memory(d / f"{name}.core")
        core.chmod(0o600)
        return d / f"{name}-root", core, vm.boot_seconds
    finally:
        vm.close()


@pytest.fixture(scope="module")
def cores():
    """{arch: (root, core, boot seconds)} of the two 1 GiB guests."""
    for arch in ("arm64", "x86_64"):
        reason = qemu_vm.unavailable_reason(arch)
        if reason:
            pytest.skip(f"QEMU cannot run {arch} guests here: {reason}")
    st = os.statvfs(SHM)
    if st.f_bavail * st.f_frsize < 5 * (1 << 30):
        pytest.skip(f"{SHM} has less than 5 GiB free (guest RAM, two cores and outputs)")
    qemu_vm.ensure_built()
    d = SHM / f"kcore-bench-arm64-{os.getpid()}"
    d.mkdir()
    try:
        yield {
            "arm64": make_core(d, "arm64", qemu_vm.VmConfig(
                "bench-arm64", mem_mib=MEM_MIB, kaslr=True, arch="arm64",
                kernel=qemu_vm.ARM64_KERNELS["6.1"])),
            "x86_64": make_core(d, "x86_64", qemu_vm.VmConfig(
                "bench-x86", mem_mib=MEM_MIB, kaslr=True)),
        }
    finally:
        shutil.rmtree(d, ignore_errors=True)


def kcore_dump(root: Path, core: Path, out: Path) -> float:
    """Wall seconds of kcore dump --format elf of a core (output removed afterwards)."""
    cmd = [sys.executable, "-m", "kcore", "dump", "--root", str(root), "--source",
           f"elf:{core}", "--format", "elf", "--quiet", "--json", "-o", str(out)]
    wall, _ = run_timed(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)))
    for p in (out, Path(f"{out}.sha256"), Path(f"{out}.json")):
        p.unlink(missing_ok=True)
    return wall


def test_arm64_core_dump_vs_dd_and_x86(benchmark, cores, record, note):
    """Interleaved rounds: dd of the arm64 core, kcore dump of the arm64 and x86-64 cores."""
    a_root, a_core, a_boot = cores["arm64"]
    x_root, x_core, x_boot = cores["x86_64"]
    for core in (a_core, x_core):
        subprocess.run(["cat", str(core)], stdout=subprocess.DEVNULL, check=True)
    out = a_core.parent / "out.elf"
    dd, arm, x86 = [], [], []
    for _ in range(ROUNDS):
        dd.append(run_timed(["dd", f"if={a_core}", "of=/dev/null", "bs=1M"])[0])
        arm.append(kcore_dump(a_root, a_core, out))
        x86.append(kcore_dump(x_root, x_core, out))
    arm.append(benchmark.pedantic(kcore_dump, args=(a_root, a_core, out), rounds=1))
    size = a_core.stat().st_size
    load = os.getloadavg()
    ratio_line(record, "1 GiB arm64 guest (Debian 6.1 arm64, TCG): dd of QEMU's core to "
               "/dev/null / kcore dump --source elf: of it (elf, whole command)",
               min(dd), min(arm), 0.0, f"; core {size / GB:.2f} GB")
    ratio_line(record, "same dump of a 1 GiB x86-64 guest's core (Debian 6.1 amd64) / of the "
               "arm64 core", min(x86), min(arm), 0.0, f"; x86 core {x_core.stat().st_size / GB:.2f}"
               " GB")
    note(f"Guests: {MEM_MIB} MiB each, {FILL_MIB} MiB of non-zero bytes in a tmpfs, booted in "
         f"{a_boot:.0f} s (arm64) and {x_boot:.0f} s (x86-64). Best of {ROUNDS} interleaved "
         f"rounds: dd {min(dd):.2f}-{max(dd):.2f} s, kcore arm64 {min(arm):.2f}-{max(arm):.2f} s,"
         f" kcore x86-64 {min(x86):.2f}-{max(x86):.2f} s; load average "
         f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end.")
    print(json.dumps({"dd": dd, "kcore_arm64": arm, "kcore_x86_64": x86, "core": size,
                      "load": load}, indent=1))
