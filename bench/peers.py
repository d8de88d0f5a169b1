"""The peers kcore is measured against, made here reproducibly from Debian's packages.

    python3 bench/peers.py [makedumpfile|lime|all] [--json]

- makedumpfile 1.7.8 (Debian unstable's `makedumpfile 1:1.7.8-1`: lzo and zstd, `--num-threads`,
  the page types of 6.12 and later). Debian's source files (`apt-get source`) answer 404 from
  this machine's mirror (measured 2026-12-06 for makedumpfile and lime-forensics, unstable and
  bookworm alike) while its binary packages download, so the binary Debian built from that
  source is used, with unstable's runtime libraries (libc6 2.38+, libdw1t64...) unpacked beside
  it and run through their own loader: nothing is installed on the host. Where `apt-get source`
  works, `dpkg-source -x` of the same version and `make LINKTYPE=dynamic USELZO=on USEZSTD=on`
  give the same program.
- LiME 1.12.0 (Debian's `lime-forensics-dkms 1.12.0-1`, which ships LiME's source in
  /usr/src), built with Kbuild against the guest kernel's headers (`linux-headers-<kver>`, its
  `-common` package and `linux-kbuild`, from the host's release), to be loaded inside a
  tests/vm guest with `insmod lime.ko path=... format=lime`.
- AVML cannot be built here: it is Rust, and its crates (crates.io) are not reachable from this
  machine; bench/ compares kcore's avml format with Volatility's reader instead.

Everything lives under KCORE_PEERS_DIR (default /var/tmp/kcore-peers): an apt configuration of
its own for unstable (sources, lists, status, cache; the host's apt is not changed), the .debs,
the unpacked trees, and a MANIFEST per peer listing every package, version and SHA-256 used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEERS = Path(os.environ.get("KCORE_PEERS_DIR", "/var/tmp/kcore-peers"))
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = "http://deb.debian.org/debian"
MAKEDUMPFILE = ("makedumpfile", "1:1.7.8-1")
# what makedumpfile 1.7.8 links (ld.so --list) and what those link, from the same suite
MAKEDUMPFILE_RUNTIME = ("libc6", "libdw1t64", "libelf1t64", "liblzo2-2", "libzstd1", "zlib1g",
                        "libbz2-1.0", "liblzma5", "libgcc-s1")
LIME = ("lime-forensics-dkms", "1.12.0-1")
GUEST_KVER = "6.1.0-56-amd64"  # tests/vm's pinned kernel (qemu_vm.PINNED_KERNEL)


class PeerError(Exception):
    """A peer could not be made; the message says which step and why."""


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise PeerError(f"{' '.join(cmd[:3])}... failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return r.stdout


def unstable_apt() -> list[str]:
    """apt options for Debian unstable: own sources, lists, status and cache under PEERS/apt."""
    base = PEERS / "apt"
    opts = ["-oAPT::Architecture=amd64", "-oAPT::Architectures=amd64",
            f"-oDir::Etc::SourceList={base / 'sources.list'}", "-oDir::Etc::SourceParts=-",
            f"-oDir::State::Lists={base / 'lists'}", f"-oDir::State::Status={base / 'status'}",
            f"-oDir::Cache={base / 'cache'}", "-oAPT::Sandbox::User=root"]
    stamp = base / "updated"
    if stamp.exists() and time.time() - stamp.stat().st_mtime < 86400:
        return opts
    (base / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (base / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (base / "status").touch()
    (base / "sources.list").write_text(
        f"deb [arch=amd64 signed-by={KEYRING}] {MIRROR} unstable main\n"
        f"deb-src [signed-by={KEYRING}] {MIRROR} unstable main\n")
    _run(["apt-get", *opts, "-qq", "update"])
    stamp.touch()
    return opts


def _download(packages: list[str], dest: Path, opts: list[str]) -> list[Path]:
    """apt-get download each package (name or name=version) into dest; the .debs."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", *opts, "download", *packages], cwd=dest)
    debs = sorted(dest.glob("*.deb"))
    if len(debs) < len(packages):
        raise PeerError(f"apt-get download left {len(debs)} of {len(packages)} packages in {dest}")
    return debs


def _unpack(debs: list[Path], root: Path) -> dict[str, str]:
    """dpkg-deb -x every .deb into root; {deb file name: SHA-256}."""
    sums = {}
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        sums[deb.name] = hashlib.sha256(deb.read_bytes()).hexdigest()
    return sums


def _manifest(folder: Path, what: str, sums: dict[str, str]) -> None:
    lines = [f"# {what}", *(f"{h}  {name}" for name, h in sorted(sums.items()))]
    (folder / "MANIFEST").write_text("\n".join(lines) + "\n")


def _wrapper_text(lib: Path, program: Path) -> str:
    """The script that runs makedumpfile with its own loader and libraries. libgcc_s is
    preloaded: glibc dlopens it at a thread's pthread_exit, and with --num-threads that
    dlopen can come while makedumpfile's main thread exits, fail, and abort the run
    ("libgcc_s.so.1 must be installed for pthread_exit to work", signal 6: 2 runs of 12 of
    `-z -d 1 --num-threads 2` here; 0 of 12 preloaded)."""
    return ("#!/bin/sh\n# Debian unstable's makedumpfile 1.7.8 with its own libraries "
            "(bench/peers.py; libgcc_s preloaded for --num-threads)\n"
            f'export LD_LIBRARY_PATH="{lib}"\n'
            f'exec "{lib}/ld-linux-x86-64.so.2" --library-path "{lib}" '
            f'--preload "{lib}/libgcc_s.so.1" "{program}" "$@"\n')


def makedumpfile_path() -> Path | None:
    """The made makedumpfile 1.7.8 (a wrapper running it with its own libraries), or None."""
    path = PEERS / "makedumpfile-1.7.8" / "makedumpfile"
    if not path.exists():
        return None
    root = path.parent / "root"
    want = _wrapper_text(root / "usr/lib/x86_64-linux-gnu", root / "usr/bin/makedumpfile")
    if path.read_text() != want:  # made by an older peers.py: the wrapper is rewritten
        path.write_text(want)
    return path


def build_makedumpfile() -> Path:
    """Make makedumpfile 1.7.8 under PEERS (once); the wrapper's path."""
    done = makedumpfile_path()
    if done:
        return done
    opts = unstable_apt()
    with tempfile.TemporaryDirectory(dir=PEERS) as tmp:
        work = Path(tmp)
        name, version = MAKEDUMPFILE
        debs = _download([f"{name}={version}", *MAKEDUMPFILE_RUNTIME], work / "debs", opts)
        root = work / "root"
        sums = _unpack(debs, root)
        lib = "usr/lib/x86_64-linux-gnu"
        folder = work / "makedumpfile-1.7.8"
        folder.mkdir()
        shutil.move(str(root), folder / "root")
        wrapper = folder / "makedumpfile"
        here = PEERS / "makedumpfile-1.7.8" / "root"
        wrapper.write_text(_wrapper_text(here / lib, here / "usr/bin/makedumpfile"))
        wrapper.chmod(0o755)
        _manifest(folder, f"{name} {version} and its runtime from Debian unstable", sums)
        final = PEERS / folder.name
        os.replace(folder, final)
    out = subprocess.run([str(final / "makedumpfile"), "-v"], capture_output=True, text=True)
    if "1.7.8" not in out.stdout or "zstd\tenabled" not in out.stdout:
        shutil.rmtree(final, ignore_errors=True)
        raise PeerError(f"the unpacked makedumpfile does not run here:\n{out.stdout}{out.stderr}")
    return final / "makedumpfile"


def lime_module(kver: str = GUEST_KVER) -> Path | None:
    """The made lime.ko for kernel kver, or None."""
    path = PEERS / f"lime-1.12.0-{kver}" / "lime.ko"
    return path if path.exists() else None


def build_lime(kver: str = GUEST_KVER) -> Path:
    """Build LiME 1.12.0 for kernel kver under PEERS (once); lime.ko's path."""
    done = lime_module(kver)
    if done:
        return done
    layout = kver.split("-")[-1]
    base = kver[: -len(layout) - 1]
    series = ".".join(base.split(".")[:2])
    opts = unstable_apt()
    with tempfile.TemporaryDirectory(dir=PEERS) as tmp:
        work = Path(tmp)
        name, version = LIME
        sums = _unpack(_download([f"{name}={version}"], work / "lime-deb", opts), work / "root")
        # the guest kernel's headers, from the host's own release (as the kernel came)
        headers = [f"linux-headers-{kver}", f"linux-headers-{base}-common",
                   f"linux-kbuild-{series}"]
        sums |= _unpack(_download(headers, work / "headers-debs", []), work / "root")
        kdir = work / "root" / "usr" / "src" / f"linux-headers-{kver}"
        # its Makefile includes the -common tree at its installed (absolute) path
        (kdir / "Makefile").write_text(
            f"include {work / 'root' / 'usr' / 'src' / f'linux-headers-{base}-common'}/Makefile\n")
        src = work / "lime"
        shutil.copytree(work / "root" / "usr" / "src" / "lime-forensics-1.12.0", src)
        _run(["make", "-C", str(kdir), f"M={src}", "modules"])
        folder = work / f"lime-1.12.0-{kver}"
        folder.mkdir()
        shutil.copy2(src / "lime.ko", folder / "lime.ko")
        info = (folder / "lime.ko").read_bytes()  # .modinfo holds "vermagic=..." NUL-ended
        at = info.find(b"vermagic=")
        vermagic = info[at + 9:info.index(b"\0", at)].decode() if at >= 0 else ""
        if not vermagic.startswith(kver + " "):
            raise PeerError(f"lime.ko's vermagic {vermagic!r} is not {kver}'s")
        _manifest(folder, f"{name} {version} (Debian unstable) built against {', '.join(headers)}",
                  sums)
        final = PEERS / folder.name
        os.replace(folder, final)
    return final / "lime.ko"


def main(argv: list[str] | None = None) -> int:
    """Make the peers asked for; print where they are."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("peer", nargs="?", default="all", choices=["makedumpfile", "lime", "all"])
    ap.add_argument("--kver", default=GUEST_KVER, help="the guest kernel LiME is built for")
    ap.add_argument("--json", action="store_true", help="print the paths as JSON")
    args = ap.parse_args(argv)
    PEERS.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    try:
        if args.peer in ("makedumpfile", "all"):
            made["makedumpfile"] = str(build_makedumpfile())
        if args.peer in ("lime", "all"):
            made["lime"] = str(build_lime(args.kver))
    except PeerError as exc:
        print(f"peers: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(made) if args.json else "\n".join(f"{k}: {v}" for k, v in made.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
