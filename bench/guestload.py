"""A known load for bench guests, and the guest's core and system files taken after it.

The load (run in the guest, standard library only) fills SHARE of RAM: a tenth of it (64 MiB at
most) kernel slab (dentries and inodes of many empty files: a syscall each, slow under TCG),
the rest half page cache (a file in a tmpfs: shmem pages), half user data (a process's
anonymous memory, kept alive); the rest of RAM stays free. Its pages are random bytes, so
compression has to work for them. It prints what it put where (MiB).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.vm import qemu_vm

LOAD = r"""
import json, os, sys, time
share = float(sys.argv[1])
mem = {}
for line in open("/proc/meminfo"):
    k, v = line.split(":")
    mem[k] = int(v.split()[0]) << 10
target = max(0, int(mem["MemTotal"] * share) - (mem["MemTotal"] - mem["MemAvailable"])) >> 20
slab = min(target // 10, 64)  # each object is a syscall: TCG makes ~10k a second at best
third = (target - slab) // 2  # page cache and user data
pool = os.urandom(16 << 20)

def chunks(n):
    for i in range(n):
        at = (i * 4099 * 256) % (15 << 20)
        yield pool[at:at + (1 << 20)]

os.makedirs("/tmp/load", exist_ok=True)
assert os.system(f"mount -t tmpfs -o size={third + 64}m,nr_inodes=0 tmpfs /tmp/load") == 0
with open("/tmp/load/cache", "wb") as f:
    for c in chunks(third):
        f.write(c)
# user data: a child holding anonymous memory until the guest stops
r, w = os.pipe()
if os.fork() == 0:
    held = bytearray(third << 20)
    for i, c in enumerate(chunks(third)):
        held[i << 20:(i + 1) << 20] = c
    os.write(w, b"x")
    while True:
        time.sleep(3600)
os.read(r, 1)
# slab: dentries and inodes (~1 KiB of slab a file) until the slab grew by a third
def slab_kib():
    for line in open("/proc/meminfo"):
        if line.startswith("Slab:"):
            return int(line.split()[1])
start, made = slab_kib(), 0
os.makedirs("/tmp/load/slab", exist_ok=True)
while slab_kib() - start < slab << 10:
    d = f"/tmp/load/slab/{made // 4096}"
    os.mkdir(d)
    for i in range(4096):
        os.close(os.open(f"{d}/{i}", os.O_CREAT | os.O_WRONLY, 0o600))
    made += 4096
after = {}
for line in open("/proc/meminfo"):
    k, v = line.split(":")
    after[k] = int(v.split()[0]) >> 10
print(json.dumps({"cache_mib": third, "anon_mib": third, "slab_mib": (slab_kib() - start) >> 10,
                  "files": made, "free_mib": after["MemFree"], "total_mib": after["MemTotal"]}))
"""


def load(vm: qemu_vm.Vm, share: float, timeout: float = 3600) -> dict:
    """Run the load in vm until `share` of its RAM is in use; what it put where (MiB)."""
    r = vm.python(LOAD, str(share), timeout=timeout).check()
    return json.loads(r.stdout.strip().splitlines()[-1])


def capture(vm: qemu_vm.Vm, dest: Path, sparse: bool = False) -> Path:
    """Copy vm's system files to dest/root, stop it and write QEMU's core; the core's path.

    QEMU writes every byte of the core. sparse: it writes them into a FIFO instead, and dd
    (conv=sparse, 64 KiB blocks) leaves the all-zero blocks as holes, so the disk only ever
    holds the core's data: a 64 GiB guest's core fits beside its RAM file.
    """
    files = vm.share / "capture"
    vm.run(f'"$KCORE_PY" {qemu_vm.HERE / "guest_capture.py"} {files}\n', timeout=600).check()
    shutil.copytree(files / "root", dest / "root")
    vm.qmp.execute("stop")
    core = dest / "vmcore.elf"
    if not sparse:
        vm.dump_guest_memory(core)
    else:
        fifo = dest / "vmcore.fifo"
        os.mkfifo(fifo, 0o600)
        dd = subprocess.Popen(["dd", f"if={fifo}", f"of={core}", "bs=64K", "iflag=fullblock",
                               "conv=sparse", "status=none"])
        try:
            vm.dump_guest_memory(fifo)
        finally:
            if dd.wait(timeout=3600) != 0:
                raise RuntimeError(f"dd from QEMU's FIFO to {core} failed")
            fifo.unlink()
    core.chmod(0o600)
    qemu_vm.phdrs_after_ehdr(core)  # makedumpfile 1.7.2 and 1.7.8 alike need them there
    return core
