"""What tests and benchmarks share: where the real-kernel captures are, how to run the CLI.

Import it as `from helpers import ...` (tests/ is on sys.path under pytest); conftest.py
holds only pytest fixtures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
FIXTURE_NAMES = ("linux-6.1.0-56-nokaslr-512M", "linux-6.1.0-56-kaslr-512M")


def shared_fixture(name: str) -> Path:
    """The folder of one real-kernel capture under ../shared/fixtures, or skip."""
    path = SHARED_FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"{path} is not here (real-kernel captures live beside the project)")
    return path


def run_kcore(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run `python -m kcore ARGS` from this checkout; capture its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    kw.setdefault("capture_output", True)
    return subprocess.run([sys.executable, "-m", "kcore", *args], env=env, check=check, **kw)


def elf_read(path: Path, vaddr: int, length: int) -> bytes:
    """Bytes [vaddr, vaddr+length) of an ELF core as its PT_LOADs give them (past p_filesz:
    zeros), read with pyelftools' view of the headers."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            va, memsz = seg["p_vaddr"], seg["p_memsz"]
            if seg["p_type"] == "PT_LOAD" and va <= vaddr and vaddr + length <= va + memsz:
                f.seek(seg["p_offset"] + vaddr - va)
                data = f.read(max(0, min(length, va + seg["p_filesz"] - vaddr)))
                return data + bytes(length - len(data))
    raise AssertionError(f"{path}: no PT_LOAD holds {vaddr:#x}+{length:#x}")


def scratch_dir(request: pytest.FixtureRequest, name: str) -> Path:
    """A new folder under pytest's temp dir, removed when the requesting fixture is torn down.

    Module fixtures hold dumps of 512 MiB guests; pytest's own dirs would keep every one of them
    until the session ends (a CI disk filled up that way).
    """
    folder = request.getfixturevalue("tmp_path_factory").mktemp(name)
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    return folder


CACHE = Path(os.environ.get("KCORE_TEST_CACHE", "/tmp/kcore-test-cache"))


def fixture_memory(name: str) -> Path:
    """The decompressed memory image of a capture (cached under KCORE_TEST_CACHE), or skip."""
    folder = shared_fixture(name) / "memory"
    packed = next(folder.glob("*.zst"), None)
    if packed is None:
        pytest.skip(f"no memory image in {folder}")
    out = CACHE / name / packed.name[: -len(".zst")]
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        _unzstd(packed, tmp)
        os.replace(tmp, out)
    return out


def _unzstd(packed: Path, out: Path) -> None:
    """Decompress a zstd file made with --long=30: the zstd tool, else the zstandard module."""
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-q", "-d", "--long=30", "-f", str(packed), "-o", str(out)],
                       check=True)
        return
    import zstandard

    with open(packed, "rb") as src, open(out, "wb") as dst:
        zstandard.ZstdDecompressor(max_window_size=1 << 31).copy_stream(src, dst)


def volatility_cmd() -> list[str]:
    """How to run Volatility 3 here (`vol`, or the module), or skip."""
    vol = shutil.which("vol")
    if vol is not None:
        return [vol]
    pytest.importorskip("volatility3", reason="volatility3 is not installed (.ci/run)")
    return [sys.executable, "-m", "volatility3.cli"]


DEBUG_PACKAGE = "linux-image-6.1.0-56-amd64-dbg"  # the fixtures' kernel, with its debug info
VM_CACHE = Path(os.environ.get("KCORE_VM_CACHE", "/var/tmp/kcore-vm-cache"))


def debug_vmlinux() -> Path:
    """The fixtures' vmlinux with DWARF (from Debian's -dbg package, cached), or skip."""
    release = DEBUG_PACKAGE.removeprefix("linux-image-").removesuffix("-dbg")
    member = f"./usr/lib/debug/boot/vmlinux-{release}"
    out = VM_CACHE / "dbg" / f"vmlinux-{release}"
    if out.exists():
        return out
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip(f"no apt-get to download {DEBUG_PACKAGE}")
    debs = VM_CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob(f"{DEBUG_PACKAGE}_*.deb")):
        r = subprocess.run(["apt-get", "download", DEBUG_PACKAGE], cwd=debs, capture_output=True,
                           text=True)
        if r.returncode:
            pytest.fail(f"apt-get download {DEBUG_PACKAGE} failed: {r.stderr[-1000:]}")
    deb = sorted(debs.glob(f"{DEBUG_PACKAGE}_*.deb"))[-1]
    tmp = out.parent / f"unpack-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        # Only vmlinux (~0.3 GB) of the package's 5.6 GB; tar stops reading after it.
        tar = subprocess.Popen(["tar", "-x", "-C", str(tmp), "--occurrence", member],
                               stdin=subprocess.PIPE)
        # dpkg-deb's stderr is dropped: it complains of the broken pipe when tar stops.
        deb_out = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                   stdout=tar.stdin, stderr=subprocess.DEVNULL)
        tar.stdin.close()
        tar.wait()
        deb_out.wait()
        if not (tmp / member).is_file():
            pytest.fail(f"cannot unpack {member} from {deb}")
        os.replace(tmp / member, out)
        deb.unlink()  # 0.86 GB, of which only vmlinux is used
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def has_file_in(pid: int, folder: Path) -> bool:
    """Whether process pid has a file of folder open (O_TMPFILE files have no name to see)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{folder}/"):
                return True
        except OSError:
            pass
    return False


def make_isf() -> str:
    """A folder holding an ISF of the fixtures' kernel (pakunoda, from the nokaslr RAM file,
    cached), or skip."""
    pakunoda = shutil.which("pakunoda")
    if pakunoda is None:
        pytest.skip("pakunoda is not installed (the test extra): no ISF for linux.pslist")
    folder = CACHE / "isf-6.1.0-56-amd64"
    out = folder / "linux-6.1.0-56-amd64.isf.json"
    if not out.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"tmp{os.getpid()}.json"
        r = subprocess.run([pakunoda, "extract", str(fixture_memory(FIXTURE_NAMES[0])), "-o",
                            str(tmp), "--offline", "--no-donor", "-q"], capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0 and tmp.exists(), r.stdout[-2000:] + r.stderr[-2000:]
        os.replace(tmp, out)
    return str(folder)
