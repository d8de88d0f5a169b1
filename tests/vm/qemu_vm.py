"""Boot Debian's kernel under QEMU for the vm tests: kernel cache, initramfs, QMP, commands."""

from __future__ import annotations

import ctypes
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile

from tests.helpers import locked

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("KCORE_VM_CACHE", "/var/tmp/kcore-vm-cache"))
# The kernel the fixtures were captured from; KCORE_VM_KERNEL picks another linux-image package.
PINNED_PACKAGE = "linux-image-6.1.0-56-amd64"
QEMU = os.environ.get("KCORE_VM_QEMU", "qemu-system-x86_64")
SHM = Path("/dev/shm")
ALL_ONES = (1 << 64) - 1
# What the guest needs to mount the host's / over virtio-9p; dependencies are resolved from
# each module's .modinfo, giving virtio_ring virtio ... netfs fscache 9pnet 9pnet_virtio 9p.
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "qemu_fw_cfg")
BOOT_TIMEOUT = float(os.environ.get("KCORE_VM_BOOT_TIMEOUT", "180"))


@dataclass(frozen=True)
class GuestArch:
    """What differs between guest architectures: QEMU, Debian packages, console, RAM base."""

    name: str
    deb_arch: str
    qemu: str
    pinned: str  # linux-image package tried first (KCORE_VM_KERNEL overrides it)
    meta: str  # the meta package whose Depends names the current kernel
    console: str
    ram_base: int  # guest physical address of the RAM file's first byte
    modules: tuple[str, ...]
    host_root: bool  # the guest runs the host's binaries (same arch): / over 9p


ARCHES = {
    "x86_64": GuestArch("x86_64", "amd64", QEMU, PINNED_PACKAGE, "linux-image-amd64", "ttyS0",
                        0, GUEST_MODULES, True),
    # arm64: QEMU's virt machine, RAM from 1 GiB; the guest runs Debian's arm64 busybox from
    # its initramfs (the host's binaries are x86), the share over 9p and the host's "run N"
    # over a virtio serial port (virt has one UART).
    "arm64": GuestArch("arm64", "arm64", os.environ.get("KCORE_VM_QEMU_ARM64",
                                                        "qemu-system-aarch64"),
                       "linux-image-6.1.0-56-arm64", "linux-image-arm64", "ttyAMA0", 0x40000000,
                       ("virtio_pci", "9pnet_virtio", "9p", "qemu_fw_cfg", "virtio_console"),
                       False),
    # x86-64 with nothing of the host: busybox-static (Debian's amd64 package) and the files a
    # test adds in the initramfs, only the share mounted, "run N" over a virtio serial port as
    # on arm64 (the one-file kcore of `make dist` runs there: tests/vm/test_vm_onefile.py).
    "x86_64-initramfs": GuestArch("x86_64-initramfs", "amd64", QEMU, PINNED_PACKAGE,
                                  "linux-image-amd64", "ttyS0", 0,
                                  (*GUEST_MODULES, "virtio_console"), False),
}
# The arm64 kernels of the tests: Debian 12's 6.1 and the 6.12 of bookworm-backports.
ARM64_KERNELS = {"6.1": "linux-image-6.1.0-56-arm64", "6.12": "linux-image-6.12-arm64"}
# bookworm-backports' 6.12 for x86-64 (the symbols tests: a second BTF and kallsyms layout)
X86_KERNEL_612 = "linux-image-6.12-amd64"
# Where a package the host's release lacks is looked for (KCORE_VM_KERNEL=linux-image-7.2...)
NEWEST_SUITE = "unstable"


class VmError(RuntimeError):
    """The guest did not boot, a command timed out, or QEMU went away."""


def unavailable_reason(arch: str = "x86_64") -> str | None:
    """Why QEMU cannot run `arch` guests on this machine (None when it can)."""
    qemu = ARCHES[arch].qemu
    if shutil.which(qemu) is None:
        pkg = "qemu-system-x86" if arch.startswith("x86_64") else "qemu-system-arm"
        return f"{qemu} is not installed (apt-get install {pkg})"
    if arch != "x86_64" and not (CACHE / "kernels").is_dir() and shutil.which("apt-get") is None:
        return f"no cached kernel and no apt-get to download linux-image-*-{arch}"
    if not SHM.is_dir() or not os.access(SHM, os.W_OK):
        return "/dev/shm is missing or not writable (guest RAM is a file there)"
    if shutil.which("busybox") is None:
        return "busybox is not installed (apt-get install busybox-static)"
    if not (CACHE / "kernels").is_dir() and shutil.which("apt-get") is None:
        return "no cached kernel and no apt-get to download linux-image-*-amd64"
    return None


@dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel package: vmlinuz, modules and config."""

    package: str
    release: str
    root: Path
    arch: str = "x86_64"

    def _boot_file(self, name: str) -> Path:
        """boot/NAME-RELEASE, or where Debian 7.x packages put it: usr/lib/modules/RELEASE/NAME."""
        boot = self.root / "boot" / f"{name}-{self.release}"
        split = self.root / "usr" / "lib" / "modules" / self.release / name
        return split if not boot.exists() and split.exists() else boot

    @property
    def vmlinuz(self) -> Path:
        """The bzImage QEMU boots."""
        return self._boot_file("vmlinuz")

    @property
    def system_map(self) -> Path:
        """The package's System.map (every symbol, data too)."""
        return self._boot_file("System.map")

    @property
    def modules(self) -> Path:
        """lib/modules/RELEASE (merged-/usr packages keep it under usr/)."""
        for base in (self.root / "lib", self.root / "usr" / "lib"):
            if (base / "modules" / self.release).is_dir():
                return base / "modules" / self.release
        raise VmError(f"no modules directory for {self.release} under {self.root}")

    def config(self, name: str) -> str | None:
        """The value of CONFIG_NAME in the package's config (None if unset)."""
        text = self._boot_file("config").read_text()
        m = re.search(rf"^CONFIG_{name}=(.*)$", text, re.M)
        return m.group(1) if m else None


def _codename() -> str:
    """The host's Debian release (its arm64 packages are fetched from the same one)."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return "bookworm"
    m = re.search(r"^VERSION_CODENAME=(\w+)", text, re.M)
    return m.group(1) if m else "bookworm"


def _foreign_apt(arch: GuestArch, suite: str | None = None) -> list[str]:
    """apt options for `arch` packages: own sources, lists and cache; the host's are untouched.

    The lists live in the cache (updated once a day); the sources are Debian's release,
    -updates, -security and -backports (6.12 for 12/bookworm) of the host's release, or
    `suite` alone (NEWEST_SUITE: the kernels no release has yet).
    """
    base = CACHE / (f"apt-{arch.deb_arch}-{suite}" if suite else f"apt-{arch.deb_arch}")
    code = _codename()
    opts = [f"-oAPT::Architecture={arch.deb_arch}", f"-oAPT::Architectures={arch.deb_arch}",
            f"-oDir::Etc::SourceList={base / 'sources.list'}", "-oDir::Etc::SourceParts=-",
            f"-oDir::State::Lists={base / 'lists'}", f"-oDir::State::Status={base / 'status'}",
            f"-oDir::Cache={base / 'cache'}", "-oAPT::Sandbox::User=root"]
    lists = base / "lists"
    stamp = base / "updated"
    if stamp.exists() and time.time() - stamp.stat().st_mtime < 86400:
        return opts
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (base / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (base / "status").touch()
    key = "/usr/share/keyrings/debian-archive-keyring.gpg"
    suites = (("http://deb.debian.org/debian", suite),) if suite else (
        ("http://deb.debian.org/debian", code), ("http://deb.debian.org/debian", f"{code}-updates"),
        ("http://deb.debian.org/debian-security", f"{code}-security"),
        ("http://deb.debian.org/debian", f"{code}-backports"))
    sources = (not suite and os.environ.get("KCORE_VM_APT_SOURCES")) or "".join(
        f"deb [arch={arch.deb_arch} signed-by={key}] {url} {name} main\n" for url, name in suites)
    (base / "sources.list").write_text(sources)
    r = subprocess.run(["apt-get", *opts, "-qq", "update"], capture_output=True, text=True)
    if r.returncode != 0:
        raise VmError(f"apt-get update ({arch.deb_arch} lists) failed:\n{r.stderr[-2000:]}")
    stamp.touch()
    return opts


def _apt_options(arch: GuestArch) -> list[str]:
    """apt options for packages of `arch` (none for the host's own)."""
    return [] if arch.host_root else _foreign_apt(arch)


def _candidate(package: str, opts: list[str]) -> bool:
    """True if apt has a version of `package` to download."""
    policy = subprocess.run(["apt-cache", *opts, "policy", package], capture_output=True,
                            text=True)
    return "Candidate:" in policy.stdout and "Candidate: (none)" not in policy.stdout


def _apt_package(arch: GuestArch, wanted: str | None = None, suite: str | None = None) -> str:
    """The kernel package: `wanted` or the pinned one if apt has it, else what the arch's
    linux-image meta package depends on; a meta package (linux-image-6.12-arm64) is resolved
    to the kernel it depends on. `suite`: look in that Debian suite alone (NEWEST_SUITE)."""
    opts = _foreign_apt(arch, suite) if suite else _apt_options(arch)
    for name in (wanted or arch.pinned, arch.meta):
        if not _candidate(name, opts):
            continue
        deps = subprocess.run(["apt-cache", *opts, "depends", name], capture_output=True,
                              text=True).stdout
        m = re.search(rf"Depends: (linux-image-\d\S*-{arch.deb_arch})$", deps, re.M)
        return m.group(1) if m else name
    raise VmError(f"cannot find a linux-image-*-{arch.deb_arch} package (apt-get update?)")


def _download(package: str, arch: GuestArch, debs: Path) -> Path:
    """The cached .deb of `package`, fetched with apt-get download if missing: from the
    arch's release, else (a newer kernel, its -dbg) from Debian's NEWEST_SUITE."""
    debs.mkdir(parents=True, exist_ok=True)
    name = package.split(":")[0]
    found = sorted(debs.glob(f"{name}_*_{arch.deb_arch}.deb")) or sorted(
        debs.glob(f"{name}_*_all.deb"))
    if not found:
        opts = _apt_options(arch)
        if not _candidate(name, opts):
            opts = _foreign_apt(arch, NEWEST_SUITE)
        r = subprocess.run(["apt-get", *opts, "download", package], cwd=debs,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise VmError(f"apt-get download {package} failed:\n{r.stderr[-2000:]}")
        found = sorted(debs.glob(f"{name}_*_{arch.deb_arch}.deb"))
    if not found:
        raise VmError(f"apt-get download {package} left no .deb in {debs}")
    return found[-1]


def _unpack(deb: Path, root: Path, *more: Path) -> None:
    """dpkg-deb -x the packages into root (atomically: a half-unpacked tree is never seen)."""
    tmp = Path(tempfile.mkdtemp(prefix="unpack-", dir=CACHE))
    try:
        for each in (deb, *more):
            subprocess.run(["dpkg-deb", "-x", str(each), str(tmp)], check=True)
        shutil.rmtree(root, ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_kernel(arch: str = "x86_64", package: str | None = None) -> Kernel:
    """Download (apt-get download) and unpack the kernel package once into the cache.

    `package`: a linux-image package or meta package such as linux-image-6.12-arm64
    (resolved once, remembered in the cache). Without it, x86_64: KCORE_VM_KERNEL, else the
    pinned package (remembered in the cache); other architectures: the arch's pinned one.
    """
    a = ARCHES[arch]
    with locked(CACHE / "kernel.lock"):
        if a.host_root and package is None:
            pin = CACHE / "kernel-package"
            package = os.environ.get("KCORE_VM_KERNEL") or (pin.read_text().strip()
                                                            if pin.exists() else _apt_package(a))
            if not os.environ.get("KCORE_VM_KERNEL"):
                pin.write_text(package + "\n")
        else:
            pin = CACHE / f"kernel-package-{a.deb_arch}-{package or a.pinned}"
            package = pin.read_text().strip() if pin.exists() else _apt_package(a, package)
            pin.write_text(package + "\n")
        release = package.removeprefix("linux-image-")
        kernel = Kernel(package, release, CACHE / "kernels" / release, arch)
        if not kernel.vmlinuz.exists():
            deb = _download(package, a, CACHE / "debs")
            parts = [_download(p, a, CACHE / "debs") for p in split_parts(deb, release)]
            _unpack(deb, kernel.root, *parts)
        return kernel


def split_parts(deb: Path, release: str) -> list[str]:
    """The packages a split kernel image depends on for its files (Debian's 7.x:
    linux-binary-R holds vmlinuz, linux-modules-R the modules, linux-base-R System.map,
    config and modules.builtin, all under usr/lib/modules/R); none for 6.x's one package."""
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, check=True).stdout
    names = (re.match(r"\s*([^\s(]+)", d) for d in depends.split(","))
    return [m.group(1) for m in names if m and re.fullmatch(
        rf"linux-(binary|modules|base)-{re.escape(release)}", m.group(1))]


def fetch_busybox(arch: str) -> Path:
    """The static busybox for `arch` guests: the host's for x86_64, else Debian's
    busybox-static of that architecture, downloaded and unpacked once into the cache."""
    a = ARCHES[arch]
    if a.host_root:
        return Path(shutil.which("busybox") or "/bin/busybox").resolve()
    root = CACHE / f"busybox-{a.deb_arch}"
    with locked(CACHE / "kernel.lock"):
        if not (root / "bin" / "busybox").exists():
            _unpack(_download("busybox-static", a, CACHE / "debs"), root)
    return root / "bin" / "busybox"


def _module_bytes(path: Path) -> bytes:
    """A module file's ELF bytes (.ko, .ko.xz, .ko.gz, .ko.zst)."""
    if path.name.endswith(".xz"):
        import lzma

        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return path.read_bytes()


def _modinfo_depends(elf: bytes) -> list[str]:
    """The depends= list from a module's .modinfo section."""
    section = ELFFile(io.BytesIO(elf)).get_section_by_name(".modinfo")
    for entry in (section.data().split(b"\0") if section else []):
        if entry.startswith(b"depends="):
            return [d.replace("-", "_") for d in entry[8:].decode().split(",") if d]
    return []


def module_load_order(kernel: Kernel, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """The modules to insmod for `wanted`, dependencies first; built-ins left out."""
    moddir = kernel.modules
    files = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        files[path.name.split(".ko")[0].replace("-", "_")] = path
    builtin = {Path(line.strip()).name.removesuffix(".ko").replace("-", "_")
               for line in (moddir / "modules.builtin").read_text().splitlines()}
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            raise VmError(f"module {name} is neither in {moddir} nor built in")
        data = _module_bytes(files[name])
        for dep in _modinfo_depends(data):
            visit(dep)
        order.append((name, data))

    for name in wanted:
        visit(name.replace("-", "_"))
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries (directories have no data)."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        nlink = 2 if mode & 0o040000 else 1
        fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out.write(b"070701" + b"".join(b"%08X" % v for v in fields) + encoded)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))
    return out.getvalue()


def build_initramfs(kernel: Kernel, extra: tuple[tuple[str, Path], ...] = (),
                    out_dir: Path | None = None) -> Path:
    """The guest initramfs (busybox, /init, 9p modules), cached per kernel and init script.

    A guest of another architecture than the host's also gets the agent and the tmp
    directory: it stays in its initramfs (busybox only) and mounts just the share. `extra`
    (name in the initramfs, host file) adds executables; such an initramfs is not cached
    but written into out_dir.
    """
    arch = ARCHES[kernel.arch]
    init = (HERE / "guest_init.sh").read_bytes()
    agent = (HERE / "guest_agent.sh").read_bytes()
    busybox = fetch_busybox(kernel.arch)
    digest = hashlib.sha256(init + agent + (HERE / "qemu_vm.py").read_bytes()
                            + busybox.read_bytes())
    key = f"{kernel.release}-{digest.hexdigest()[:12]}"
    out = CACHE / "initramfs" / f"{key}.cpio.gz"
    if extra and out_dir is not None:
        out = out_dir / "initramfs.cpio.gz"
    elif out.exists():
        return out
    mods = module_load_order(kernel, arch.modules)
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "newroot", "modules", "tmp")
    ]
    entries += [("bin/busybox", 0o100755, busybox.read_bytes()), ("init", 0o100755, init),
                ("bin/agent.sh", 0o100755, agent)]
    entries += [(name, 0o100755, path.read_bytes()) for name, path in extra]
    entries += [(f"modules/{name}.ko", 0o100644, data) for name, data in mods]
    order = "".join(f"{name}\n" for name, _ in mods).encode()
    entries.append(("modules/order", 0o100644, order))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=1))
    os.replace(tmp, out)
    return out


class Qmp:
    """A minimal QMP client over QEMU's unix socket."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb", buffering=0)
        self.events: list[dict] = []
        self._recv()
        self.execute("qmp_capabilities")

    def _recv(self) -> dict:
        """The next reply, keeping events aside."""
        while True:
            line = self.file.readline()
            if not line:
                raise VmError("QMP connection closed")
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def execute(self, command: str, timeout: float = 60.0, **arguments: object) -> object:
        """Run one QMP command; return its "return" value or raise VmError."""
        self.sock.settimeout(timeout)
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        reply = self._recv()
        if "error" in reply:
            raise VmError(f"QMP {command}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


@dataclass
class GuestResult:
    """What one guest command produced."""

    rc: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> GuestResult:
        """Raise VmError unless the command exited 0."""
        if self.rc != 0:
            raise VmError(f"guest command failed rc={self.rc}\n{self.stdout[-3000:]}"
                          f"\n--- stderr\n{self.stderr[-3000:]}")
        return self


@dataclass
class VmConfig:
    """How one guest boots."""

    name: str
    mem_mib: int = 512
    kaslr: bool = False
    hotplug_slots: int = 0
    maxmem_mib: int = 0
    smp: int = 1
    extra_append: str = ""
    arch: str = "x86_64"
    kernel: str | None = None  # another kernel package (meta packages resolved), else pinned
    numa_nodes: int = 0  # >1: RAM split evenly over that many NUMA nodes (one file each)
    cpu: str = ""  # -cpu model (default: the arch's)
    # (name in the initramfs, host file): executables added to a busybox-only guest's initramfs
    extra_files: tuple[tuple[str, Path], ...] = ()
    ram_on_disk: bool = False  # RAM file in the work directory (CACHE, a disk), not /dev/shm:
    # a sparse file there keeps a big guest's RAM out of the host's memory (bench/)


def _set_pdeathsig() -> None:
    """In the child: die with the parent (pytest), so QEMU never outlives the test run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Remove RAM files and work directories that runs which have since died left behind."""
    for path in [*SHM.glob("kcore-vm-*"), *(CACHE / "runs").glob("kcore-vm-*")]:
        m = re.match(r"kcore-vm-(\d+)-", path.name)
        if m and not _pid_alive(int(m.group(1))):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@dataclass
class Vm:
    """One running guest: QEMU process, RAM file, QMP, and a command channel over 9p."""

    config: VmConfig
    kernel: Kernel
    initramfs: Path
    workdir: Path = field(init=False)
    share: Path = field(init=False)
    ram_path: Path = field(init=False)
    proc: subprocess.Popen | None = field(default=None, init=False)
    qmp: Qmp | None = field(default=None, init=False)
    ctl: socket.socket | None = field(default=None, init=False)
    boot_seconds: float = field(default=0.0, init=False)
    _next: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        remove_stale()
        tag = f"kcore-vm-{os.getpid()}-{self.config.name}-"
        (CACHE / "runs").mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=tag, dir=CACHE / "runs"))
        self.share = self.workdir / "share"
        (self.share / "cmd").mkdir(parents=True)
        self.ram_path = (self.workdir / "guest.ram" if self.config.ram_on_disk
                         else SHM / (self.workdir.name + ".ram"))

    @property
    def arch(self) -> GuestArch:
        """The guest's architecture record."""
        return ARCHES[self.config.arch]

    @property
    def ram_files(self) -> list[Path]:
        """The guest RAM files in physical order (one per NUMA node, else one)."""
        n = self.config.numa_nodes
        return [self.ram_path] if n <= 1 else [self.ram_path.with_suffix(f".ram{i}")
                                               for i in range(n)]

    @property
    def serial_log(self) -> Path:
        """The guest's console output."""
        return self.workdir / "serial.log"

    def qemu_argv(self) -> list[str]:
        """The QEMU command line."""
        if self.config.arch == "arm64":
            return self._qemu_argv_arm64()
        # x86_64 and x86_64-initramfs
        c = self.config
        mem = f"{c.mem_mib}M"
        if c.hotplug_slots:
            mem += f",slots={c.hotplug_slots},maxmem={c.maxmem_mib}M"
        # no_timer_check: under TCG on a loaded host (two guests of the xdist workers beside
        # other work) the kernel's check that the IO-APIC timer ticks can miss, and it panics
        # ("IO-APIC + timer doesn't work!", seen once at load 5-9 in the lockdown guest's boot)
        append = (f"console=ttyS0 panic=-1 loglevel=4 no_timer_check khshare={self.share} "
                  f"khrepo={REPO}")
        if not self.arch.host_root:
            append += " khroot=initramfs"
        if not c.kaslr:
            append += " nokaslr"
        if c.extra_append:
            append += " " + c.extra_append
        return [
            QEMU, "-accel", "tcg", "-cpu", "max,la57=off", "-smp", str(c.smp), "-m", mem,
            "-object", f"memory-backend-file,id=ram0,size={c.mem_mib}M,"
                       f"mem-path={self.ram_path},share=on",
            "-machine", "pc,memory-backend=ram0",
            "-device", "vmcoreinfo",
            "-display", "none", "-vga", "none", "-nic", "none", "-monitor", "none",
            "-serial", f"file:{self.serial_log}", "-no-reboot",
            *self._ctl_argv(),
            "-qmp", f"unix:{self.workdir / 'qmp.sock'},server=on,wait=off",
            "-kernel", str(self.kernel.vmlinuz), "-initrd", str(self.initramfs),
            "-append", append,
            *(["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                          "multidevs=remap"] if self.arch.host_root else []),
            "-virtfs", f"local,path={self.share},mount_tag=share,security_model=none",
        ]

    def _ctl_argv(self) -> list[str]:
        """Where the host says "run N": ttyS1 (x86-64 with the host's root, so the idle
        agent blocks instead of polling), else a virtio serial port named kcorectl."""
        sock = self.workdir / "ctl.sock"
        if self.arch.host_root:
            return ["-serial", f"unix:{sock},server=on,wait=off"]
        return ["-device", "virtio-serial-pci",
                "-chardev", f"socket,id=ctl,path={sock},server=on,wait=off",
                "-device", "virtserialport,chardev=ctl,name=kcorectl"]

    def _qemu_argv_arm64(self) -> list[str]:
        """The QEMU command line of an arm64 guest: virt, TCG, -cpu max, busybox initramfs."""
        c = self.config
        append = f"console=ttyAMA0 panic=-1 loglevel=4 khshare={self.share} khroot=initramfs"
        append += "" if c.kaslr else " nokaslr"
        append += f" {c.extra_append}" if c.extra_append else ""
        mem: list[str] = []
        if c.numa_nodes > 1:
            size = c.mem_mib // c.numa_nodes
            for i, path in enumerate(self.ram_files):
                mem += ["-object", f"memory-backend-file,id=ram{i},size={size}M,mem-path={path},"
                                   "share=on", "-numa", f"node,nodeid={i},memdev=ram{i}"]
            mem += ["-machine", "virt"]
        else:
            mem += ["-object", f"memory-backend-file,id=ram0,size={c.mem_mib}M,"
                               f"mem-path={self.ram_path},share=on",
                    "-machine", "virt,memory-backend=ram0"]
        return [
            self.arch.qemu, "-accel", "tcg", "-cpu", c.cpu or "max,pauth-impdef=on",
            "-smp", str(c.smp), "-m", f"{c.mem_mib}M", *mem,
            "-device", "vmcoreinfo",
            "-display", "none", "-nic", "none", "-monitor", "none",
            "-serial", f"file:{self.serial_log}", "-no-reboot",
            *self._ctl_argv(),  # virt has one UART
            "-qmp", f"unix:{self.workdir / 'qmp.sock'},server=on,wait=off",
            "-kernel", str(self.kernel.vmlinuz), "-initrd", str(self.initramfs),
            "-append", append,
            "-virtfs", f"local,path={self.share},mount_tag=share,security_model=none",
        ]

    def start(self) -> None:
        """Boot the guest and wait until its command agent is ready."""
        (self.share / "agent.sh").write_text((HERE / "guest_agent.sh").read_text())
        if not self.arch.host_root:  # the guest sees only the share: its busybox scripts too
            for script in ("guest_capture.sh", "guest_read.sh"):
                shutil.copy(HERE / script, self.share / script)
        t0 = time.monotonic()
        with open(self.workdir / "qemu.log", "wb") as log:
            self.proc = subprocess.Popen(
                self.qemu_argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_set_pdeathsig,
            )
        self.qmp = Qmp(self.workdir / "qmp.sock")
        self.ctl = socket.socket(socket.AF_UNIX)
        self.ctl.connect(str(self.workdir / "ctl.sock"))
        self._wait_for(lambda: (self.share / "ready").exists(), BOOT_TIMEOUT, "boot")
        self.boot_seconds = time.monotonic() - t0

    def _wait_for(self, done, timeout: float, what: str) -> None:
        """Poll until done() or fail with the console tail (QEMU exit, panic, timeout)."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.proc is None or self.proc.poll() is not None:
                raise VmError(f"QEMU exited during {what}\n{self.console_tail()}")
            if "Kernel panic" in self.console_tail(4000):
                raise VmError(f"guest kernel panic during {what}\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise VmError(f"timeout ({timeout:.0f} s) during {what}\n{self.console_tail()}")
            time.sleep(0.05)

    def console_tail(self, n: int = 3000) -> str:
        """The end of the guest console."""
        try:
            return self.serial_log.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def start_run(self, script: str, timeout: float = 120.0,
                  env: dict[str, str] | None = None) -> tuple[int, float, float]:
        """Hand a shell script to the guest (host /, guest /proc /sys /dev); don't wait."""
        n = self._next
        self._next += 1
        d = self.share / "cmd"
        env = {**guest_env(self.config.arch), **(env or {})}
        exports = "".join(f"export {k}='{v}'\n" for k, v in env.items())
        (d / f"{n}.timeout").write_text(f"{int(timeout)}\n")
        tmp = d / f"{n}.sh.tmp"
        tmp.write_text("set -e\n" + exports + script)
        t0 = time.monotonic()
        tmp.rename(d / f"{n}.sh")
        assert self.ctl is not None
        self.ctl.sendall(f"{n}\n".encode())
        return n, t0, timeout

    def wait(self, handle: tuple[int, float, float]) -> GuestResult:
        """Wait for a started command and collect its result."""
        n, t0, timeout = handle
        d = self.share / "cmd"
        self._wait_for(lambda: (d / f"{n}.rc").exists(), timeout + 30, f"guest command {n}")
        return GuestResult(
            rc=int((d / f"{n}.rc").read_text()),
            stdout=(d / f"{n}.out").read_text(errors="replace"),
            stderr=(d / f"{n}.err").read_text(errors="replace"),
            seconds=time.monotonic() - t0,
        )

    def wait_file(self, job: tuple[int, float, float], path: Path, timeout: float = 120.0
                  ) -> None:
        """Wait until the started command `job` creates `path` (in the share)."""
        rc = self.share / "cmd" / f"{job[0]}.rc"

        def done() -> bool:
            if path.exists():
                return True
            if rc.exists():
                raise VmError(f"guest command ended before making {path.name}:\n"
                              f"{self.wait(job).stderr[-3000:]}")
            return False

        self._wait_for(done, timeout, f"{path.name} from the guest")

    def run(self, script: str, timeout: float = 120.0, env: dict[str, str] | None = None
            ) -> GuestResult:
        """Run a shell script in the guest (host /, guest /proc /sys /dev); wait for its result."""
        return self.wait(self.start_run(script, timeout, env))

    def python(self, code: str, *args: str, timeout: float = 120.0) -> GuestResult:
        """Run Python code in the guest with this checkout on PYTHONPATH."""
        path = self.share / f"py-{self._next}.py"
        path.write_text(code)
        quoted = " ".join(f"'{a}'" for a in args)
        return self.run(f'"$KCORE_PY" {path} {quoted}\n', timeout=timeout)

    def kcore(self, *args: str, timeout: float = 300.0) -> GuestResult:
        """Run `python -m kcore ARGS` in the guest."""
        quoted = " ".join(f"'{a}'" for a in args)
        return self.run(f'exec "$KCORE_PY" -m kcore {quoted}\n', timeout=timeout)

    @contextmanager
    def physical_image(self) -> Iterator[Path]:
        """Guest physical memory as a raw image (offset = address); only valid while paused.

        Below 4 GiB that is the RAM file itself; above, QEMU's pc machine puts the rest of
        the RAM file at 4 GiB, so the image is a sparse copy of the file's data regions.
        """
        if self.arch.ram_base or len(self.ram_files) > 1:
            with self._based_image() as image:
                yield image
            return
        low = ram_below_4g(self.config.mem_mib)
        if low == self.config.mem_mib << 20:
            yield self.ram_path
            return
        image = SHM / (self.workdir.name + ".phys")
        try:
            with open(self.ram_path, "rb") as src, open(image, "wb") as dst:
                size = os.fstat(src.fileno()).st_size
                pos = 0
                while pos < size:
                    try:
                        pos = os.lseek(src.fileno(), pos, os.SEEK_DATA)
                    except OSError:
                        break
                    end = os.lseek(src.fileno(), pos, os.SEEK_HOLE)
                    while pos < end:
                        phys = pos if pos < low else pos - low + (1 << 32)
                        stop = min(end, low) if pos < low else end
                        pos += os.copy_file_range(src.fileno(), dst.fileno(), stop - pos, pos,
                                                  phys)
                dst.truncate((1 << 32) + size - low)
            yield image
        finally:
            image.unlink(missing_ok=True)

    @contextmanager
    def _based_image(self) -> Iterator[Path]:
        """The RAM files back to back from the arch's RAM base, as a sparse physical image."""
        image = SHM / (self.workdir.name + ".phys")
        try:
            with open(image, "wb") as dst:
                at = self.arch.ram_base
                for path in self.ram_files:
                    with open(path, "rb") as src:
                        size = os.fstat(src.fileno()).st_size
                        _copy_data(src.fileno(), dst.fileno(), size, at)
                    at += size
                dst.truncate(at)
            yield image
        finally:
            image.unlink(missing_ok=True)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the guest's vCPUs (QMP stop) for the body; continue afterwards."""
        assert self.qmp is not None
        self.qmp.execute("stop")
        try:
            yield
        finally:
            self.qmp.execute("cont")

    def dump_guest_memory(self, path: Path, begin: int | None = None, length: int | None = None
                          ) -> Path:
        """QEMU's ELF core of guest physical memory (paging off; all, or [begin, begin+length))."""
        assert self.qmp is not None
        window = {"begin": begin, "length": length} if begin is not None else {}
        self.qmp.execute("dump-guest-memory", timeout=600, paging=False,
                         protocol=f"file:{path}", **window)
        return path

    def close(self) -> None:
        """Quit QEMU (kill its process group if it lingers) and remove every file it made."""
        try:
            if self.qmp is not None:
                try:
                    self.qmp.execute("quit")
                except (OSError, VmError):
                    pass
                self.qmp.close()
            if self.ctl is not None:
                self.ctl.close()
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        finally:
            for path in self.ram_files:
                path.unlink(missing_ok=True)
            if os.environ.get("KCORE_VM_KEEP"):
                print(f"kept {self.workdir}", file=sys.stderr)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)


def phdrs_after_ehdr(path: Path) -> None:
    """Move a QEMU core's program headers right after its ELF header, section headers dropped:
    makedumpfile (1.7.2 and 1.7.8) reads them at sizeof(Elf64_Ehdr) whatever e_phoff says, and
    QEMU puts its section headers there ("Can't get the number of PT_LOAD")."""
    with open(path, "r+b") as f:
        ehdr = bytearray(f.read(64))
        phoff, = struct.unpack_from("<Q", ehdr, 32)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
        if phoff == 64:
            return
        f.seek(phoff)
        phdrs = f.read(phentsize * phnum)
        first = min(struct.unpack_from("<Q", phdrs, i * phentsize + 8)[0] for i in range(phnum))
        assert 64 + len(phdrs) <= first, "no room for the program headers after the ELF header"
        struct.pack_into("<QQ", ehdr, 32, 64, 0)  # e_phoff, e_shoff
        struct.pack_into("<HHHHHH", ehdr, 52, 64, phentsize, phnum, 0, 0, 0)
        f.seek(0)
        f.write(ehdr + phdrs)


def _copy_data(src: int, dst: int, size: int, at: int) -> None:
    """Copy src's data regions (holes skipped) to dst at offset `at` onwards."""
    pos = 0
    while pos < size:
        try:
            pos = os.lseek(src, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(src, pos, os.SEEK_HOLE)
        while pos < end:
            pos += os.copy_file_range(src, dst, end - pos, pos, at + pos)


def guest_env(arch: str = "x86_64") -> dict[str, str]:
    """The environment of guest commands: this checkout's kcore with the host's Python
    (a foreign-arch guest has busybox only)."""
    if not ARCHES[arch].host_root:
        return {"PATH": "/bin", "HOME": "/tmp", "LANG": "C"}
    return {
        "KCORE_PY": sys.executable,
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
    }


def boot(config: VmConfig) -> Vm:
    """Fetch the kernel, build the initramfs and boot one guest (closed again on failure)."""
    kernel = fetch_kernel(config.arch, config.kernel)
    vm = Vm(config, kernel, Path())
    try:
        vm.initramfs = build_initramfs(kernel, config.extra_files, vm.workdir)
        vm.start()
    except BaseException:
        vm.close()
        raise
    return vm


def ensure_built() -> None:
    """Build the C core in place if missing or stale: the guest imports this checkout as is."""
    if not (REPO / "csrc").is_dir():
        return
    built = [p.stat().st_mtime for p in (REPO / "kcore").glob("_kcore_c*.so")]
    if built and min(built) > max(p.stat().st_mtime for p in (REPO / "csrc").rglob("*.[ch]")):
        return
    with locked(CACHE / "build.lock"):
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=REPO,
                       check=True, capture_output=True)


def host_kcore(*args: str, timeout: float = 600.0) -> subprocess.CompletedProcess:
    """Run this checkout's `python -m kcore ARGS` on the host; capture its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kcore", *args], env=env, capture_output=True,
                          timeout=timeout)


def ram_below_4g(mem_mib: int) -> int:
    """Bytes of RAM QEMU's pc machine maps below 4 GiB (the rest starts at 4 GiB)."""
    size = mem_mib << 20
    return 0xC0000000 if size >= 0xE0000000 else size
