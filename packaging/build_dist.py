"""`make dist`: build dist/kcore-VERSION-linux-ARCH, one executable that needs nothing installed.

PyInstaller freezes the interpreter, kcore, its C core, pyelftools, tqdm and the codec
libraries into one file; staticx then adds the dynamic loader and libc those need, so the file
runs on hosts without a libc of their own (busybox-only initramfs, distroless containers) or
with an older one. It prints the file's path and SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import build_foreign  # beside this script (sys.path[0])

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# soname -> Debian package: the libraries kcore dlopens (kcore/codecs.py, csrc/codec.c).
LIBRARIES = {
    "libzstd.so.1": "libzstd1",
    "liblzo2.so.2": "liblzo2-2",
    "libsnappy.so.1": "libsnappy1v5",
    "libz.so.1": "zlib1g",
    "libdeflate.so.0": "libdeflate0",
}


def version() -> str:
    """kcore.__version__, read from the source (as setup.py does)."""
    text = (REPO / "kcore" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M)[1]  # type: ignore[index]


def commit() -> str:
    """The checkout's commit (with -dirty when the tree has changes), or 'unknown'.

    KCORE_DIST_COMMIT overrides it (a build inside the arm64 root, where the checkout is a copy).
    """
    if os.environ.get("KCORE_DIST_COMMIT"):
        return os.environ["KCORE_DIST_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty",
                               "--abbrev=12"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def find_library(soname: str) -> Path:
    """The file behind soname in the build host's library cache (ldconfig -p)."""
    out = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True,
                         check=True).stdout
    arch = {"x86_64": "x86-64", "aarch64": "AArch64"}.get(platform.machine(), "")
    for line in out.splitlines():
        name, _, rest = line.strip().partition(" (")
        if name == soname and arch in rest:
            return Path(rest.rsplit("=> ", 1)[1]).resolve()
    sys.exit(f"make dist: {soname} is not installed: apt-get install {LIBRARIES[soname]}")


def package_version(package: str) -> str:
    """The installed Debian package's version, or '' where dpkg does not know it."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def tool(name: str) -> str:
    """A build tool's path: beside this Python (pip's bin/), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        sys.exit(f"make dist: {name} not found: pip install 'kcore[dist]'")
    return found


def sha256(path: Path) -> str:
    """The SHA-256 of a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> int:
    """Build the file; print its path and SHA-256."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(REPO / "dist"), help="where the file goes")
    ap.add_argument("--work-dir", default=str(REPO / "build" / "dist"), help="scratch space")
    ap.add_argument("--arch", default=platform.machine(), choices=sorted({platform.machine(),
                    *build_foreign.DEB_ARCH}), help="the machine the file is for (default: "
                    "this one; another runs this script in a Debian root of that machine, "
                    "emulated by qemu-user-static: packaging/build_foreign.py)")
    args = ap.parse_args()
    machine = platform.machine()
    if args.arch != machine:
        return build_foreign.build(args.arch, Path(args.out_dir), commit(),
                                   list(LIBRARIES.values()))
    name = f"kcore-{version()}-linux-{machine}"
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    libs = {soname: find_library(soname) for soname in LIBRARIES}
    info = {
        "version": version(), "commit": commit(), "machine": machine,
        "python": platform.python_version(),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "libraries": {soname: {"file": path.name, "package": LIBRARIES[soname],
                               "version": package_version(LIBRARIES[soname])}
                      for soname, path in libs.items()},
    }
    info_file = work / "dist.json"
    info_file.write_text(json.dumps(info, indent=1))
    # Each library goes in under its soname (the name dlopen asks for), not its real name.
    lib_dir = work / "libs"
    lib_dir.mkdir()
    for soname, path in libs.items():
        shutil.copy2(path, lib_dir / soname)
    # PYTHONPATH: the hooks' isolated interpreters (collect_submodules) import this checkout's
    # kcore, not whatever an editable install points to (elsewhere, or nowhere: then the file
    # was built without kcore.commands and every start died on ModuleNotFoundError)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), KCORE_DIST_INFO=json.dumps({
        "name": name, "info_file": str(info_file),
        "library_files": [str(lib_dir / s) for s in libs], "work_dir": str(work),
        "patchelf": tool("patchelf"),
        # The frozen program unpacks into the directory staticx unpacked into (one place,
        # removed by staticx when the run ends).
        "runtime_tmpdir": None,
    }))
    subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
                    "--workpath", str(work / "pyi"), "--distpath", str(work / "frozen"),
                    str(HERE / "kcore.spec")], env=env, check=True, cwd=work)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / name
    # --no-compress: xz over PyInstaller's zlib saves 2 MiB and costs 0.3 s of CPU every start
    subprocess.run([sys.executable, "-m", "staticx", "--strip", "--no-compress",
                    str(work / "frozen" / name),
                    str(target)], check=True)
    print(f"{target}\nsha256 {sha256(target)}  {target.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
