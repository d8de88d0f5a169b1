"""Make the real-kernel captures of ../shared/fixtures in a clone that lacks them.

`capture(name)` boots Debian's linux-image-6.1.0-56-amd64 the way the shared captures were made
(TCG, `-cpu max,la57=off`, 1 vCPU, 512 MiB, `-machine pc`; nokaslr, or KASLR), lets the guest
record its own /proc and /sys files and what its real /proc/kcore gives (fixture_guest.py), then
pauses it and takes its memory: the RAM file (nokaslr, `memory/guestram.bin`, sparse) or QEMU's
dump-guest-memory ELF core (KASLR, `memory/vmcore.elf`).  The result goes to
KCORE_VM_CACHE/fixtures/<name>/ once, under a lock (several pytest runs may share the cache),
with the layout of /work/shared/fixtures/<name>/ (memory uncompressed).

    python -m tests.vm.fixture_capture [NAME...]     # make them ahead of a test run
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.vm import qemu_vm

HERE = Path(__file__).resolve().parent

# The captures the tests use, and how each guest boots (the shared fixtures' way).
CONFIGS = {
    "linux-6.1.0-56-nokaslr-512M": qemu_vm.VmConfig("fixture-nokaslr", mem_mib=512),
    "linux-6.1.0-56-kaslr-512M": qemu_vm.VmConfig("fixture-kaslr", mem_mib=512, kaslr=True),
}
DONE = "COMPLETE-2"  # written last: a folder without it is an interrupted (or older) capture


def folder(name: str) -> Path:
    """Where capture `name` is kept (made or not)."""
    return qemu_vm.CACHE / "fixtures" / name


def unavailable_reason(name: str) -> str | None:
    """Why `name` cannot be made here (None when it can)."""
    if name not in CONFIGS:
        return f"no recipe for a capture named {name!r}"
    if qemu_vm.PINNED_PACKAGE != "linux-image-6.1.0-56-amd64" or \
            os.environ.get("KCORE_VM_KERNEL"):
        return "KCORE_VM_KERNEL picks another kernel than the captures' linux-image-6.1.0-56-amd64"
    reason = qemu_vm.unavailable_reason()
    return f"QEMU cannot run here: {reason}" if reason else None


def capture(name: str) -> Path:
    """The capture `name` under KCORE_VM_CACHE/fixtures, made first if needed (VmError on
    failure)."""
    out = folder(name)
    if (out / DONE).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be making it: wait, then reuse it
        if (out / DONE).exists():
            return out
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
        try:
            _make(CONFIGS[name], work)
            (work / DONE).write_text(f"{qemu_vm.PINNED_PACKAGE}\n")
            shutil.rmtree(out, ignore_errors=True)
            work.rename(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def _make(config: qemu_vm.VmConfig, work: Path) -> None:
    """Boot, capture root/ and expected/ in the guest, take memory/ paused, shut down."""
    for attempt in range(3):
        vm = qemu_vm.boot(config)
        try:
            guest_out = vm.share / "fixture"
            vm.run(f'"$KCORE_PY" {HERE / "fixture_guest.py"} {guest_out}\n',
                   timeout=300).check()
            # x86-64 KASLR may draw offset 0 (one slot of ~500): a KASLR capture must be one
            if config.kaslr and _kernel_offset(guest_out) == 0 and attempt < 2:
                continue
            (work / "memory").mkdir()
            with vm.paused():
                if config.kaslr:
                    vm.dump_guest_memory(work / "memory" / "vmcore.elf")
                    _dig_holes(work / "memory" / "vmcore.elf")
                else:
                    _sparse_copy(vm.ram_path, work / "memory" / "guestram.bin")
            for sub in ("root", "expected"):
                shutil.copytree(guest_out / sub, work / sub)
            return
        finally:
            vm.close()


def _kernel_offset(capture: Path) -> int:
    """KERNELOFFSET in the VMCOREINFO note of a capture's expected/kcore.json (0 without)."""
    kcore = json.loads((capture / "expected/kcore.json").read_text())
    for note in kcore["notes"]:
        for line in note.get("text", "").splitlines():
            if line.startswith("KERNELOFFSET="):
                return int(line.partition("=")[2], 16)
    return 0


def _sparse_copy(src: Path, dst: Path) -> None:
    """Copy src to dst (another filesystem) with its zero pages left as holes."""
    chunk = 1 << 20
    zero = bytes(chunk)
    with open(src, "rb") as f, open(dst, "wb") as out:
        size = os.fstat(f.fileno()).st_size
        for pos in range(0, size, chunk):
            data = os.pread(f.fileno(), chunk, pos)
            if data != zero[:len(data)]:
                os.pwrite(out.fileno(), data, pos)
        out.truncate(size)


def _dig_holes(path: Path) -> None:
    """Make the zero pages of path holes (util-linux's fallocate; kept whole without it)."""
    if shutil.which("fallocate"):
        subprocess.run(["fallocate", "--dig-holes", str(path)], capture_output=True)


if __name__ == "__main__":
    for arg in sys.argv[1:] or list(CONFIGS):
        why = unavailable_reason(arg)
        if why:
            sys.exit(f"{arg}: {why}")
        print(capture(arg))
