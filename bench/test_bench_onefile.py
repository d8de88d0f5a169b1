"""The one-file kcore (make dist) against the package run by Python, in the same run.

Run: python3 -m pytest bench/test_bench_onefile.py --benchmark-only  (needs 5 GiB free in
/dev/shm; builds the file once per sources' hash into KCORE_VM_CACHE/dist, as the vm test does).
Each pair runs interleaved, round by round, and each side's best round counts.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_module

from tests import helpers

REPO = Path(__file__).resolve().parent.parent
_data = load_module("kcore_bench_dumpdata_onefile", REPO / "bench" / "dumpdata.py")
ROUNDS = int(os.environ.get("KCORE_BENCH_ROUNDS", "5"))
SHM = Path(os.environ.get("KCORE_BENCH_DIR", "/dev/shm"))
CACHE = Path(os.environ.get("KCORE_VM_CACHE", "/var/tmp/kcore-vm-cache"))
MIB = 1 << 20


@pytest.fixture(scope="module")
def onefile() -> Path:
    """The file make dist builds (cached per sources' hash)."""
    return helpers.onefile(CACHE)


def _package() -> list[str]:
    """kcore as the package runs it: this checkout's sources under this Python."""
    return [sys.executable, "-m", "kcore"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(SHM))


def _timed(argv: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run, which must succeed."""
    import time

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=_env(), capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert r.returncode == 0, (argv, r.stderr.decode()[-2000:])
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _load() -> str:
    return open("/proc/loadavg").read().split()[0]


def test_version_startup(benchmark, onefile: Path, record) -> None:
    """`kcore --version`: the file (staticx and PyInstaller unpack every run) vs the package."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "kcore")], check=True)
    file_w = file_c = pkg_w = pkg_c = float("inf")
    for _ in range(max(ROUNDS, 9)):
        w, c = _timed([str(onefile), "--version"])
        file_w, file_c = min(file_w, w), min(file_c, c)
        w, c = _timed([*_package(), "--version"])
        pkg_w, pkg_c = min(pkg_w, w), min(pkg_c, c)
    benchmark.pedantic(_timed, args=([str(onefile), "--version"],), rounds=1)
    record("`kcore --version` start-up of the one file (wall, best round)",
           f"{file_w:.3f} s (CPU {file_c:.3f} s; package {pkg_w:.3f} s, CPU {pkg_c:.3f} s; "
           f"load {_load()})", "<= 0.5 s", file_w <= 0.5)
    size = onefile.stat().st_size
    record("size of the one file", f"{size / MIB:.1f} MiB", "<= 40 MiB", size <= 40 * MIB)


@pytest.fixture(scope="module")
def image_4g():
    """A 4 GiB raw image (the fixture's RAM, then data with zero runs) and its root."""
    name = helpers.FIXTURE_NAMES[0]
    ram = helpers.fixture_memory(name)
    st = os.statvfs(SHM)
    if st.f_bavail * st.f_frsize < 5 * (1 << 30):
        pytest.skip(f"{SHM} has less than 5 GiB free")
    d = SHM / f"kcore-bench-onefile-{os.getpid()}"
    d.mkdir()
    try:
        root = _data.make_root(helpers.shared_fixture(name) / "root", d / "root")
        image = d / "ram.raw"
        _data.make_image(ram, image, 0.3)
        yield d, root, image
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("fmt", [("elf",), ("kdump", "--compress", "zstd")],
                         ids=["elf", "kdump-zstd"])
def test_4gib_dump(benchmark, onefile: Path, image_4g, fmt: tuple[str, ...], record) -> None:
    """A 4 GiB dump to /dev/shm: the file's time against the package's, same input."""
    d, root, image = image_4g
    out = d / "out"
    common = ["dump", "--root", str(root), "--source", f"raw:{image}", "-q", "--force",
              "--format", *fmt, "-o", str(out)]
    best_file = best_pkg = cpu_file = cpu_pkg = float("inf")
    for _ in range(ROUNDS):
        wall, cpu = _timed([str(onefile), *common])
        best_file, cpu_file = min(best_file, wall), min(cpu_file, cpu)
        wall, cpu = _timed([*_package(), *common])
        best_pkg, cpu_pkg = min(best_pkg, wall), min(cpu_pkg, cpu)
    benchmark.pedantic(_timed, args=([str(onefile), *common],), rounds=1)
    for p in d.glob("out*"):
        p.unlink()
    ratio = best_pkg / best_file
    # CPU (user + sys of every process of the run, the loaders' included) moves far less than
    # wall time on a loaded machine: a wall ratio off its target with a CPU ratio near 1 is load
    record(f"4 GiB dump, --format {' '.join(fmt)}: package time / one-file time",
           f"{ratio:.2f}x ({best_file:.2f} s vs {best_pkg:.2f} s; CPU {cpu_pkg / cpu_file:.2f}x, "
           f"{cpu_file:.2f} s vs {cpu_pkg:.2f} s; load {_load()})", ">= 0.95x", ratio >= 0.95)
