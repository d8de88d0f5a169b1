"""Engine benchmarks: ratios against dd, a dense copy and the pure-Python oracle, and peak RSS.

Run with `python3 -m pytest bench --benchmark-only` (not part of the default test run).
Every ratio compares two timings taken in the same run on the same page-cached input in
/dev/shm; big files are deleted afterwards. The machine is shared: few rounds.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import best_time, best_times
from engine_memchild import PAGE, MemChild

from kcore import _pyengine, engine

GIB = 1 << 30
MIB = 1 << 20
SHM = Path("/dev/shm")
REPO = Path(__file__).resolve().parent.parent


def _make(path: Path, size: int, data_pages: set[int] | None = None, seed: int = 0) -> Path:
    """A file of size bytes: all random, or random only on data_pages and zero elsewhere."""
    rng = random.Random(seed)
    block = rng.randbytes(MIB)
    with open(path, "wb") as f:
        for base in range(0, size, MIB):
            if data_pages is None:
                f.write(block)
                continue
            chunk = bytearray(MIB)
            for i in range(MIB // PAGE):
                if base // PAGE + i in data_pages:
                    chunk[i * PAGE:(i + 1) * PAGE] = block[i * PAGE:(i + 1) * PAGE]
            f.write(chunk)
    return path


@pytest.fixture(scope="module")
def dense_src():
    path = _make(SHM / f"kcore-bench-dense-{os.getpid()}", GIB)
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def sparse_src():
    """1 GiB with 95% all-zero pages (the zeros are written: the file itself is dense)."""
    npages = GIB // PAGE
    data_pages = set(random.Random(1).sample(range(npages), npages // 20))
    path = _make(SHM / f"kcore-bench-sparse-{os.getpid()}", GIB, data_pages)
    yield path
    path.unlink()


@pytest.fixture
def null_fd():
    fd = os.open("/dev/null", os.O_WRONLY)
    yield fd
    os.close(fd)


def test_dense_1gib_to_dev_null_vs_dd(benchmark, dense_src, null_fd, record):
    src = os.open(dense_src, os.O_RDONLY)
    dd = ["dd", f"if={dense_src}", "of=/dev/null", "bs=1M", "status=none"]
    try:
        benchmark.pedantic(engine.copy_range, args=(src, 0, null_fd, None, GIB), rounds=2,
                           warmup_rounds=1)
        dd_time, ours = best_times([lambda: subprocess.run(dd, check=True),
                                    lambda: engine.copy_range(src, 0, null_fd, None, GIB)],
                                   rounds=5)
    finally:
        os.close(src)
    ours = min(ours, benchmark.stats.stats.min)
    ratio = dd_time / ours
    record("dense 1 GiB to /dev/null: engine speed / `dd bs=1M`",
           f"{ratio:.2f}x ({GIB / ours / 1e9:.1f} vs {GIB / dd_time / 1e9:.1f} GB/s)",
           ">= 0.9x", ratio >= 0.9)
    assert ratio >= 0.9


def test_sparse_vs_dense_1gib_to_new_file(benchmark, sparse_src, record):
    out = SHM / f"kcore-bench-out-{os.getpid()}"
    src = os.open(sparse_src, os.O_RDONLY)
    fds: list[int] = []

    def fresh():
        for fd in fds:
            os.close(fd)
        fds.clear()
        out.unlink(missing_ok=True)
        fds.append(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return (src, 0, fds[0], 0, GIB), {"sparse": True}

    try:
        benchmark.pedantic(engine.copy_range, setup=fresh, rounds=2, warmup_rounds=0)
        ours, dense = float("inf"), float("inf")
        for _ in range(3):  # interleaved, so both see the same noise
            ours = min(ours, best_time(lambda: engine.copy_range(src, 0, fds[0], 0, GIB,
                                                                 sparse=True),
                                       rounds=1, setup=fresh))
            dense = min(dense, best_time(lambda: engine.copy_range(src, 0, fds[0], 0, GIB),
                                         rounds=1, setup=fresh))
        fresh()
        engine.copy_range(src, 0, fds[0], 0, GIB, sparse=True)
        st = os.stat(out)
        assert st.st_size == GIB and st.st_blocks * 512 <= GIB // 19
        assert subprocess.run(["cmp", "-s", str(sparse_src), str(out)]).returncode == 0
    finally:
        for fd in fds:
            os.close(fd)
        out.unlink(missing_ok=True)
        os.close(src)
    ours = min(ours, benchmark.stats.stats.min)
    ratio = dense / ours
    record("1 GiB, 95% zero pages, to a new file on tmpfs: sparse / dense engine copy",
           f"{ratio:.2f}x ({GIB / ours / 1e9:.1f} vs {GIB / dense / 1e9:.1f} GB/s)",
           ">= 4x", ratio >= 4)
    assert ratio >= 4


def test_one_percent_unreadable_vs_python_oracle(benchmark, dense_src, null_fd, record):
    """/proc/PID/mem of a child whose 1 GiB mapping lost 1% of its pages, scattered."""
    npages = GIB // PAGE
    holes = random.Random(7).sample(range(npages), npages // 100)
    with MemChild() as child:
        addr = child.map(dense_src, npages, holes)
        whole = child.map(dense_src, npages)  # the same file without holes, for reference
        for a in (addr, whole):  # fault the child's page tables in
            engine.copy_range(child.fd, a, null_fd, None, GIB)
        c_stats = benchmark.pedantic(engine.copy_range,
                                     args=(child.fd, addr, null_fd, None, GIB), rounds=2)
        py_stats = []
        oracle, ours, no_holes = best_times([
            lambda: py_stats.append(_pyengine.copy_range(child.fd, addr, null_fd, None, GIB)),
            lambda: engine.copy_range(child.fd, addr, null_fd, None, GIB),
            lambda: engine.copy_range(child.fd, whole, null_fd, None, GIB),
        ], rounds=2)
    assert c_stats == py_stats[0]
    assert c_stats.pages_zero_filled == len(holes)
    ours = min(ours, benchmark.stats.stats.min)
    ratio = oracle / ours
    record("1 GiB /proc/PID/mem, 1% unmapped pages, to /dev/null: engine / Python oracle",
           f"{ratio:.2f}x ({GIB / ours / 1e9:.2f} vs {GIB / oracle / 1e9:.2f} GB/s)",
           ">= 5x", ratio >= 5)
    record("same, engine speed with the holes / without (info: the kernel's per-page cost "
           "bounds both)", f"{no_holes / ours:.2f}x ({GIB / no_holes / 1e9:.2f} GB/s "
           f"without holes, {ours / npages * 1e9:.0f} ns a page)", "-", True)
    assert ratio >= 5, (
        f"engine only {ratio:.2f}x the oracle: /proc/PID/mem costs the kernel "
        f"{ours / npages * 1e6:.2f} us a page however it is read"
    )


_RSS_CHILD = """
import os, resource, subprocess, sys
copy = '''
import os, sys
from kcore import engine
src = os.open(sys.argv[1], os.O_RDONLY)
null = os.open("/dev/null", os.O_WRONLY)
engine.copy_range(src, 0, null, None, 4 << 30)
out = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
engine.copy_range(src, 0, out, 0, 4 << 30, sparse=True)
runs, _ = engine.data_runs(src, 0, 4 << 30, granule=2 << 20)
assert len(runs) == 64, len(runs)
'''
subprocess.run([sys.executable, "-c", copy, *sys.argv[1:]], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_peak_rss_of_a_4gib_copy(benchmark, record):
    """Peak RSS of a process copying 4 GiB (dense to /dev/null, sparse to a file, data_runs)."""
    size = 4 * GIB
    src = SHM / f"kcore-bench-4g-{os.getpid()}"
    out = SHM / f"kcore-bench-4g-out-{os.getpid()}"
    with open(src, "wb") as f:  # 4 GiB, 1 MiB of data every 64 MiB, holes between
        f.truncate(size)
        for off in range(0, size, 64 * MIB):
            f.seek(off)
            f.write(os.urandom(MIB))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        proc = benchmark.pedantic(
            subprocess.run, args=([sys.executable, "-c", _RSS_CHILD, str(src), str(out)],),
            kwargs={"capture_output": True, "text": True, "env": env, "check": True}, rounds=1)
    finally:
        src.unlink()
        out.unlink(missing_ok=True)
    peak_kib = int(proc.stdout.split()[-1])
    record("peak RSS of a 4 GiB copy (ru_maxrss of the copying process)",
           f"{peak_kib / 1024:.1f} MiB", "<= 64 MiB", peak_kib <= 64 * 1024)
    assert peak_kib <= 64 * 1024
