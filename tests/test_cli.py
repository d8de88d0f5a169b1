"""`kcore dump OUTPUT` (positional, as avml and makedumpfile take it), `kcore --version` and
the one-file build's machine check (kcore.bundle)."""

from __future__ import annotations

import lzma
from pathlib import Path

from kcore import __version__, bundle
from tests.helpers import DATA, run_kcore

FIXTURE = DATA / "arm64-6.1"  # a real arm64 6.1 boot: its files and a LiME image of its pages


def _source(tmp_path: Path) -> str:
    lime = tmp_path / "memory.lime"
    lime.write_bytes(lzma.decompress((FIXTURE / "memory.lime.xz").read_bytes()))
    return f"lime:{lime}"


def test_positional_output_is_the_same_dump_as_dash_o(tmp_path: Path) -> None:
    """`kcore dump OUT` and `kcore dump -o OUT` write the same bytes (and both 0600)."""
    source = _source(tmp_path)
    common = ("dump", "--root", str(FIXTURE / "root"), "--source", source, "-q", "--no-digest")
    a, b = tmp_path / "a.elf", tmp_path / "b.elf"
    r = run_kcore(*common, str(a))
    assert r.returncode == 0, r.stderr.decode()
    r = run_kcore(*common, "-o", str(b))
    assert r.returncode == 0, r.stderr.decode()
    assert a.read_bytes() == b.read_bytes() and a.stat().st_mode & 0o777 == 0o600
    assert a.read_bytes()[:4] == b"\x7fELF"


def test_two_different_outputs_are_refused_in_one_line(tmp_path: Path) -> None:
    """-o X and OUTPUT Y: exit 2, one line, nothing written."""
    r = run_kcore("dump", "--root", str(FIXTURE / "root"), "--source", _source(tmp_path),
                  "-o", str(tmp_path / "x.elf"), str(tmp_path / "y.elf"))
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "two outputs" in err[0], err
    assert not list(tmp_path.glob("*.elf"))


def test_version_from_python_names_the_version() -> None:
    """Run from Python (not the one file): the version, Python's and the machine."""
    r = run_kcore("--version")
    assert r.returncode == 0
    assert r.stdout.decode().startswith(f"kcore {__version__} (Python ")


def test_version_of_the_one_file_lists_commit_and_libraries() -> None:
    """The one file's record (what packaging/build_dist.py writes) gives each line as is."""
    rec = {"version": "0.1.0", "commit": "045526a0d1f2", "built": "2026-12-06T02:00:00Z",
           "machine": "x86_64", "python": "3.11.7",
           "libraries": {"libzstd.so.1": {"file": "libzstd.so.1.5.4", "package": "libzstd1",
                                          "version": "1.5.4+dfsg2-5+deb12u1"}}}
    text = bundle.version_text(rec).splitlines()
    assert text[0].startswith("kcore 0.1.0 (commit 045526a0d1f2, built 2026-12-06T02:00:00Z")
    assert text[1].split() == ["libzstd.so.1", "libzstd1", "1.5.4+dfsg2-5+deb12u1"]


def test_machine_check(tmp_path: Path) -> None:
    """An x86_64 file on an aarch64 kernel says so in one line; on its own machine, nothing;
    the kernel's machine comes from proc/sys/kernel/arch (an emulator fakes uname's)."""
    rec = {"version": "0.1.0", "machine": "x86_64"}
    arch = tmp_path / "arch"
    arch.write_text("aarch64\n")
    machine = bundle.kernel_machine(str(arch))
    assert machine == "aarch64"
    line = bundle.machine_mismatch(rec, machine)
    assert line is not None and "\n" not in line
    assert "linux-x86_64" in line and "kcore-0.1.0-linux-aarch64" in line
    assert bundle.machine_mismatch(rec, "x86_64") is None
    assert bundle.machine_mismatch(None, "aarch64") is None  # kcore run from Python


def test_root_files_read_in_little_memory(tmp_path: Path) -> None:
    """A /proc file (size 0) is read 1 MiB at a time up to the 256 MiB bound, not with one
    256 MiB buffer: a 256 MiB guest ran the one file into MemoryError in `kcore check`.
    Here: 200 MB of address space (ulimit -v), `kcore ranges` on a real capture."""
    import resource
    import subprocess
    import sys

    from tests.helpers import REPO

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (200_000_000, 200_000_000))

    r = subprocess.run([sys.executable, "-m", "kcore", "ranges", "--root", str(FIXTURE / "root"),
                        "--source", _source(tmp_path), "--json"], capture_output=True,
                       preexec_fn=limit, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr.decode()[-2000:]
