"""The guests the vm tests boot, and a pool that keeps one of them running at a time."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.vm import guest_capture, qemu_vm
from tests.vm.qemu_vm import Vm, VmConfig

# The guests the suite boots, in the order the tests run.  "nokaslr" can take a DIMM (hotplug
# tests run last on it); "big" has more than 4 GiB, so part of System RAM sits above the PCI
# hole at 4 GiB, where RAM-file offsets stop being physical addresses.
CONFIGS = {
    "nokaslr": VmConfig("nokaslr", mem_mib=1024, hotplug_slots=2, maxmem_mib=2048),
    "kaslr": VmConfig("kaslr", mem_mib=512, kaslr=True, smp=2),  # 2 CPUs: threaded dumps
    "big": VmConfig("big", mem_mib=4608, kaslr=True),
    # Kernel lockdown (kcore check's verdicts): integrity forbids /dev/mem, confidentiality
    # /proc/kcore too.
    "lockdown-integrity": VmConfig("lockdown-integrity", mem_mib=384,
                                   extra_append="lockdown=integrity"),
    "lockdown-confidentiality": VmConfig("lockdown-confidentiality", mem_mib=384,
                                         extra_append="lockdown=confidentiality"),
}
# Guests only some tests boot (not in the `guest` fixture's round): bookworm-backports' 6.12
# with KASLR (tests/vm/test_vm_symbols.py)
EXTRA_CONFIGS = {
    "kaslr-6.12": VmConfig("kaslr-6.12", mem_mib=512, kaslr=True, kernel=qemu_vm.X86_KERNEL_612),
    # the KASLR guest again, for tests/vm/test_vm_readback.py alone: its dumps (3 of the KASLR
    # group's 8 minutes) then run on the other xdist worker, beside the rest of that group
    "kaslr-readback": VmConfig("kaslr-readback", mem_mib=512, kaslr=True, smp=2),
}
# Guests whose /proc/kcore cannot be read (no capture is taken after boot).
NO_CAPTURE = {"lockdown-confidentiality"}
# arm64 guests (qemu-system-aarch64 -M virt, TCG, -cpu max): Debian 12's 6.1 and the 6.12 of
# bookworm-backports (configured for 52-bit VAs with LPA2), each with KASLR; one 6.1 guest
# without KASLR whose RAM is two NUMA nodes.  Busybox only: the captures are dd and cat.
ARM64_CONFIGS = {
    "arm64-6.1": VmConfig("arm64-6.1", mem_mib=512, kaslr=True, arch="arm64",
                          kernel=qemu_vm.ARM64_KERNELS["6.1"]),
    "arm64-6.12": VmConfig("arm64-6.12", mem_mib=512, kaslr=True, arch="arm64",
                           kernel=qemu_vm.ARM64_KERNELS["6.12"]),
    # a CPU without LPA2: 6.12 runs with 48-bit VAs; its 44 physical address bits leave
    # room to randomize the linear map (PHYS_OFFSET "negative")
    "arm64-6.12-48": VmConfig("arm64-6.12-48", mem_mib=512, kaslr=True, arch="arm64",
                              cpu="cortex-a72", kernel=qemu_vm.ARM64_KERNELS["6.12"]),
    "arm64-numa": VmConfig("arm64-numa", mem_mib=1024, arch="arm64", numa_nodes=2,
                           cpu="cortex-a72", kernel=qemu_vm.ARM64_KERNELS["6.1"]),
}
# The one-file kcore (make dist) in x86-64 guests whose initramfs holds Debian's busybox-static
# and that file only, the root read-only (khro: /tmp too; /dev/shm a tmpfs): Debian 12's 6.1
# and 6.12.  The test adds the file (extra_files) when it has built it.
ONEFILE_CONFIGS = {
    f"onefile-{v}": VmConfig(f"onefile-{v}", mem_mib=256, kaslr=True, arch="x86_64-initramfs",
                             extra_append="khro", kernel=package)
    for v, package in (("6.1", qemu_vm.PINNED_PACKAGE), ("6.12", "linux-image-6.12-amd64"))
}
# The aarch64 one file (make dist-aarch64) in an arm64 guest (busybox only, as every arm64
# guest), the root read-only as the x86-64 ones': Debian 12's 6.1.  The test adds the file.
ONEFILE_ARM64_CONFIGS = {
    "onefile-arm64": VmConfig("onefile-arm64", mem_mib=256, kaslr=True, arch="arm64",
                              extra_append="khro", kernel=qemu_vm.ARM64_KERNELS["6.1"]),
}
# On each guest: the harness checks first; tests that change the guest for good (memory
# hotplug) last.
FILE_ORDER = ("test_vm_harness", "test_vm_ranges_header", "test_vm_data", "test_vm_bench",
              "test_vm_consumers", "test_vm_check", "test_vm_hotplug")


@dataclass
class Guest:
    """A booted guest and the capture of its real /proc/kcore taken right after boot."""

    vm: Vm
    capture: Path
    kcore: dict

    @property
    def name(self) -> str:
        """The config name."""
        return self.vm.config.name

    @property
    def root(self) -> Path:
        """The captured system root (proc/, sys/ files) on the host."""
        return self.capture / "root"


def parse_head(capture: Path) -> dict:
    """kcore.json's contents from a busybox capture (kcore-head.bin, kcore-size)."""
    with open(capture / "kcore-head.bin", "rb") as f:
        info = guest_capture.parse_kcore(f.fileno())
    info["st_size"] = int((capture / "kcore-size").read_text())
    (capture / "kcore.json").write_text(json.dumps(info, indent=1))
    (capture / "kcore-head.bin").write_bytes(
        (capture / "kcore-head.bin").read_bytes()[:info["data_offset"]])
    return info


def assert_same_header(guest: Guest, header: bytes) -> None:
    """header is the real kcore's header region byte for byte (captured at boot), but for the
    reading task's NT_TASKSTRUCT descriptor."""
    ours = bytearray(header)
    real = bytearray((guest.capture / "kcore-head.bin").read_bytes())
    assert len(ours) == len(real) == guest.kcore["data_offset"]
    task = next(n for n in guest.kcore["notes"] if (n["name"], n["type"]) == ("CORE", 4))
    at, size = task["desc_offset"], task["descsz"]
    ours[at:at + size] = real[at:at + size] = bytes(size)
    assert ours == real


def kernel_offset(kcore: dict) -> int | None:
    """KERNELOFFSET from the VMCOREINFO note of a guest's kcore.json (None: not there)."""
    for note in kcore.get("notes", []):
        if note["name"] == "VMCOREINFO" and "desc" in note:
            for line in bytes.fromhex(note["desc"]).decode(errors="replace").splitlines():
                if line.startswith("KERNELOFFSET="):
                    return int(line.partition("=")[2], 16)
    return None


POOLS: list[Pool] = []  # every pool made this session (tests/vm/conftest.py sweeps them)


class Pool:
    """Boots guests on demand, keeps only one running (2 cores: one pool per xdist worker),
    closes them all at the end."""

    def __init__(self) -> None:
        self.current: Guest | None = None
        self.booted_files: set[str] = set()  # the current guest's share entries after boot
        POOLS.append(self)

    def get(self, name: str, config: VmConfig | None = None) -> Guest:
        """The running guest `name`, booting it (and closing any other) if needed; `config`
        stands for the named one (a one-file guest's, with its file)."""
        if self.current is not None and self.current.name == name:
            return self.current
        self.close()
        config = config or CONFIGS.get(name) or EXTRA_CONFIGS.get(name) or ARM64_CONFIGS[name]
        for attempt in range(3):
            vm = qemu_vm.boot(config)
            try:
                capture = vm.share / "capture"
                kcore: dict = {}
                if name in NO_CAPTURE:
                    pass
                elif vm.arch.host_root:
                    vm.run(f'"$KCORE_PY" {qemu_vm.HERE / "guest_capture.py"} {capture}\n').check()
                    kcore = json.loads((capture / "kcore.json").read_text())
                else:
                    vm.run(f"sh {vm.share / 'guest_capture.sh'} {capture}\n").check()
                    kcore = parse_head(capture)
            except BaseException:
                vm.close()
                raise
            # x86-64 KASLR draws the kernel's offset from ~500 slots, 0 among them (seen once in
            # a CI run): a KASLR guest whose offset came out 0 is booted again
            if not (config.kaslr and vm.arch.deb_arch == "amd64" and kernel_offset(kcore) == 0) \
                    or attempt == 2:
                break
            vm.close()
        self.current = Guest(vm, capture, kcore)
        self.booted_files = {p.name for p in vm.share.iterdir()}
        return self.current

    def sweep(self) -> None:
        """Remove what tests left in the running guest's share (dumps of its RAM, mostly)."""
        if self.current is None:
            return
        for path in self.current.vm.share.iterdir():
            if path.name in self.booted_files:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Shut the running guest down."""
        if self.current is not None:
            guest, self.current = self.current, None
            guest.vm.close()


