"""Engine benchmarks: ratios against dd, a dense copy and the pure-Python oracle, and peak RSS.

Run with `python3 -m pytest bench --benchmark-only` (not part of the default test run).
Every ratio compares two timings taken in the same run on the same page-cached input in
/dev/shm; big files are deleted afterwards. The machine is shared: few rounds.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import best_time, best_times

from kcore import engine
from tests import helpers, pyengine
from tests.engine_memchild import PAGE, MemChild

GIB = 1 << 30
MIB = 1 << 20
SHM = Path("/dev/shm")
REPO = Path(__file__).resolve().parent.parent
RAM_FIXTURE = "linux-6.1.0-56-nokaslr-512M"  # real kernel RAM: where its zero pages lie


_tests_conftest = helpers
fixture_memory = _tests_conftest.fixture_memory
RAM_FIXTURE_HERE = (_tests_conftest.SHARED_FIXTURES / RAM_FIXTURE / "memory").is_dir()


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


def page_runs(path: Path) -> tuple[list[int], list[int]]:
    """The lengths in pages of the all-zero and of the non-zero page runs of a memory image."""
    zero_page = bytes(PAGE)
    runs: tuple[list[int], list[int]] = ([], [])
    kind, n = None, 0
    with open(path, "rb") as f:
        while block := f.read(MIB):
            for i in range(0, len(block), PAGE):
                data = block[i:i + PAGE] != zero_page
                if data != kind and n:
                    runs[kind].append(n)
                    n = 0
                kind = data
                n += 1
    if n:
        runs[kind].append(n)
    return runs


def kernel_like_pages(zero_runs: list[int], data_runs: list[int], npages: int,
                      seed: int = 1) -> set[int]:
    """5% of npages as data, in runs drawn like real RAM's.

    Zero and data run lengths are drawn alternately (fixed seed) from the measured ones until
    5% of the pages are data (the last run cut to fit); the pages after that stay zero, as
    memory never touched since boot does.
    """
    rng = random.Random(seed)
    want, pos, pages = npages // 20, 0, set()
    while len(pages) < want:
        pos += rng.choice(zero_runs)
        n = min(rng.choice(data_runs), want - len(pages))
        pages.update(range(pos, pos + n))
        pos += n
    assert pos <= npages, "the drawn runs do not fit: zero runs too long for this size"
    return pages


def physically_adjacent(path: Path) -> float | None:
    """Fraction of a page-cached file's pages followed by the physically next page (None: no PFNs).

    Reading a tmpfs file runs ~2x faster when its pages are physically contiguous (the
    prefetchers keep streaming across page boundaries), so this says how lucky an input was.
    """
    npages = os.path.getsize(path) // PAGE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        view = memoryview(m)
        for i in range(npages):
            view[i * PAGE]  # fault each page in, so pagemap has its frame
        start = int(next(line for line in open("/proc/self/maps")
                         if line.rstrip().endswith(str(path))).split("-")[0], 16)
        try:
            with open("/proc/self/pagemap", "rb") as pm:
                pm.seek(start // PAGE * 8)
                raw = pm.read(npages * 8)
        except OSError:
            return None
        finally:
            view.release()
    pfns = [e & ((1 << 55) - 1) for e in struct.unpack(f"{npages}Q", raw)]
    if not any(pfns):  # frames are hidden from unprivileged readers
        return None
    return sum(b == a + 1 for a, b in zip(pfns, pfns[1:], strict=False)) / (npages - 1)


@pytest.fixture(scope="module")
def sparse_inputs():
    """Both 1 GiB inputs with 95% all-zero pages (the zeros are written: the files are dense).

    scattered: the 5% data pages one by one, uniformly at random (the worst case: every data
    page is a write of its own). kernel-runs: the data in runs whose zero and non-zero lengths
    are drawn from a real kernel's RAM (the RAM_FIXTURE capture); None when it is not here.
    Both are written back to back before any copy churns memory, so that tmpfs places their
    pages alike (their read speed follows their physical contiguity).
    """
    npages = GIB // PAGE
    layouts: dict[str, set[int] | None] = {
        "scattered": set(random.Random(1).sample(range(npages), npages // 20))}
    try:
        zero_runs, data_runs = page_runs(fixture_memory(RAM_FIXTURE))
        layouts["kernel-runs"] = kernel_like_pages(zero_runs, data_runs, npages)
    except pytest.skip.Exception:
        layouts["kernel-runs"] = None
    made: dict[str, tuple[Path, int] | None] = {}
    try:
        for kind, pages in layouts.items():
            if pages is None:
                made[kind] = None
                continue
            path = _make(SHM / f"kcore-bench-sparse-{kind}-{os.getpid()}", GIB, pages)
            made[kind] = (path, sum(1 for p in pages if p - 1 not in pages))
        yield made
    finally:
        for item in made.values():
            if item is not None:
                item[0].unlink()


@pytest.fixture(params=["scattered", "kernel-runs"])
def sparse_src(request, sparse_inputs):
    """(kind, path, number of data runs) of one sparse input."""
    item = sparse_inputs[request.param]
    if item is None:
        pytest.skip(f"{RAM_FIXTURE}'s memory image is not here: no kernel-like runs to draw")
    return request.param, *item


@pytest.fixture
def null_fd():
    fd = os.open("/dev/null", os.O_WRONLY)
    yield fd
    os.close(fd)


THREADS = engine.default_threads()


def test_dense_1gib_to_dev_null_vs_dd(benchmark, dense_src, null_fd, record):
    src = os.open(dense_src, os.O_RDONLY)
    dd = ["dd", f"if={dense_src}", "of=/dev/null", "bs=1M", "status=none"]
    try:
        benchmark.pedantic(engine.copy_range, args=(src, 0, null_fd, None, GIB), rounds=2,
                           warmup_rounds=1)
        dd_time, ours, threaded = best_times([
            lambda: subprocess.run(dd, check=True),
            lambda: engine.copy_range(src, 0, null_fd, None, GIB),
            lambda: engine.copy_range(src, 0, null_fd, None, GIB, threads=THREADS),
        ], rounds=5)
    finally:
        os.close(src)
    ours = min(ours, benchmark.stats.stats.min)
    ratio = dd_time / ours
    record("dense 1 GiB to /dev/null: engine speed / `dd bs=1M` (one thread)",
           f"{ratio:.2f}x ({GIB / ours / 1e9:.1f} vs {GIB / dd_time / 1e9:.1f} GB/s)",
           ">= 0.9x", ratio >= 0.9)
    t_ratio = dd_time / threaded
    record(f"same, threads={THREADS} (to /dev/null: each thread writes its own chunks)",
           f"{t_ratio:.2f}x ({GIB / threaded / 1e9:.1f} GB/s)", ">= 0.9x", t_ratio >= 0.9)
    assert max(ratio, t_ratio) >= 0.9


def test_sparse_vs_dense_1gib_to_new_file(benchmark, sparse_src, null_fd, record, note):
    kind, sparse_src, nruns = sparse_src
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
        ours, dense, read = float("inf"), float("inf"), float("inf")
        t_ours, t_dense = float("inf"), float("inf")
        for _ in range(3):  # interleaved, so all see the same noise
            ours = min(ours, best_time(lambda: engine.copy_range(src, 0, fds[0], 0, GIB,
                                                                 sparse=True),
                                       rounds=1, setup=fresh))
            dense = min(dense, best_time(lambda: engine.copy_range(src, 0, fds[0], 0, GIB),
                                         rounds=1, setup=fresh))
            read = min(read, best_time(lambda: engine.copy_range(src, 0, null_fd, None, GIB),
                                       rounds=1))
            t_ours = min(t_ours, best_time(
                lambda: engine.copy_range(src, 0, fds[0], 0, GIB, sparse=True, threads=THREADS),
                rounds=1, setup=fresh))
            t_dense = min(t_dense, best_time(
                lambda: engine.copy_range(src, 0, fds[0], 0, GIB, threads=THREADS),
                rounds=1, setup=fresh))
        for threads in (1, THREADS):
            fresh()
            engine.copy_range(src, 0, fds[0], 0, GIB, sparse=True, threads=threads)
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
    if kind == "scattered":
        what = ("1 GiB, 95% zero pages scattered one by one (worst case), to a new file on "
                "tmpfs: sparse / dense engine copy")
    else:
        what = ("1 GiB, 95% zero pages in runs drawn from real kernel RAM, to a new file on "
                "tmpfs: sparse / dense engine copy")
    record(what + " (one thread)", f"{ratio:.2f}x ({GIB / ours / 1e9:.1f} vs "
           f"{GIB / dense / 1e9:.1f} GB/s, {nruns} data runs)", ">= 4x", ratio >= 4)
    t_ratio = t_dense / t_ours
    record(f"same, threads={THREADS} (both copies)",
           f"{t_ratio:.2f}x ({GIB / t_ours / 1e9:.1f} vs {GIB / t_dense / 1e9:.1f} GB/s; "
           f"{dense / t_ours:.2f}x the one-thread dense copy)", ">= 4x", t_ratio >= 4)
    adjacent = physically_adjacent(sparse_src)
    record("same, the read alone (engine to /dev/null, one thread; info: the floor of the "
           "sparse copy)",
           f"{GIB / read / 1e9:.1f} GB/s ({read * 1e3:.0f} ms; sparse copy {ours * 1e3:.0f} ms, "
           f"dense {dense * 1e3:.0f} ms; input pages physically adjacent: "
           + ("unknown" if adjacent is None else f"{adjacent:.0%}") + ")", "-", True)
    _sparse_seen[kind] = (read, dense, ours, nruns)
    if len(_sparse_seen) == 2 or not RAM_FIXTURE_HERE:
        note(_bound_note(_sparse_seen))
    assert max(ratio, t_ratio) >= 4, (
        f"sparse only {ratio:.2f}x (one thread) / {t_ratio:.2f}x ({THREADS} threads) the "
        f"dense copy on the {kind} input: its read alone took {read * 1e3:.0f} ms "
        f"({'?' if adjacent is None else f'{adjacent:.0%}'} of its pages physically "
        "adjacent); see the note in bench/RESULTS.md"
    )


_sparse_seen: dict[str, tuple[float, float, float, int]] = {}


def _bound_note(seen: dict[str, tuple[float, float, float, int]]) -> str:
    """The paragraph under the table: what bounds the sparse / dense ratio, with this run's ms."""
    figures = "; ".join(
        f"{kind}: read {r * 1e3:.0f} ms, dense copy {d * 1e3:.0f} ms, sparse copy "
        f"{s * 1e3:.0f} ms with {n} writes" for kind, (r, d, s, n) in seen.items())
    return (
        "What bounds the sparse / dense ratio here: both copies read the whole 1 GiB (pread "
        "from tmpfs's page cache, R), the dense copy then writes it all (W: tmpfs allocating "
        "and filling 262144 new pages, ~1.2 us a page, 300-350 ms), the sparse copy checks "
        "every page for zeros in the cache-hot block (Z: ~12 ms a GiB; SSE2, early exit; "
        "AVX-512/AVX2 versions gained nothing measurable in place) and writes only the 5% of "
        "data (~0.05 W, ~16 ms) plus a per-write cost (~0.5-1 us a write: 6-12 ms for the "
        "scattered case's ~12500 writes, nothing for the few dozen of kernel-like runs). So "
        "the ratio is (R + W) / (R + Z + 0.05 W [+ ~10 ms]) and 4x needs R <= ~65 ms, a read "
        "at >= 16 GB/s: the tmpfs write speed sets the numerator, the pread speed the "
        "denominator, and the engine's own share (Z and the per-write cost) is ~20 ms. R "
        "itself depends on where tmpfs put the input's pages: three 1 GiB files of the same "
        "content read in 55, 93 and 118 ms with 96%, 45% and 10% of their pages followed by "
        "the physically next page (measured 00:37 UTC with /proc/self/pagemap), so the ratios "
        "move between runs with how fragmented free memory was when the input was written "
        "(the \"physically adjacent\" figures above), more than with the data's layout. "
        f"One thread, this run: {figures}. With threads > 1 (`copy_range(threads=N)`, what "
        "`kcore dump` uses: one per CPU) the chunks are read and zero-checked on every CPU, so "
        "R and Z shrink with the CPUs while W stays (tmpfs writes to one file serialize on its "
        "inode lock): that lifts the ratio past 4x on two CPUs. (A single writer thread "
        "behind one reader, tried at 00:29 UTC of the first session while another session "
        "loaded the machine, had lost: 128-130 ms against 109 ms.)"
    )


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
        t_stats = []
        oracle, ours, no_holes, threaded = best_times([
            lambda: py_stats.append(pyengine.copy_range(child.fd, addr, null_fd, None, GIB)),
            lambda: engine.copy_range(child.fd, addr, null_fd, None, GIB),
            lambda: engine.copy_range(child.fd, whole, null_fd, None, GIB),
            lambda: t_stats.append(engine.copy_range(child.fd, addr, null_fd, None, GIB,
                                                     threads=THREADS)),
        ], rounds=2)
    assert c_stats == py_stats[0] == t_stats[0]
    assert c_stats.pages_zero_filled == len(holes)
    ours = min(ours, benchmark.stats.stats.min)
    ratio = oracle / ours
    record("1 GiB /proc/PID/mem, 1% unmapped pages, to /dev/null: engine / Python oracle "
           "(one thread)",
           f"{ratio:.2f}x ({GIB / ours / 1e9:.2f} vs {GIB / oracle / 1e9:.2f} GB/s)",
           ">= 5x", ratio >= 5)
    t_ratio = oracle / threaded
    record(f"same, threads={THREADS} (to /dev/null: each thread writes its own chunks)",
           f"{t_ratio:.2f}x ({GIB / threaded / 1e9:.2f} GB/s)", ">= 5x", t_ratio >= 5)
    record("same, engine speed with the holes / without, one thread (info: the kernel's "
           "per-page cost bounds both)", f"{no_holes / ours:.2f}x ({GIB / no_holes / 1e9:.2f} "
           f"GB/s without holes, {ours / npages * 1e9:.0f} ns a page)", "-", True)
    assert max(ratio, t_ratio) >= 5, (
        f"engine only {ratio:.2f}x (one thread) / {t_ratio:.2f}x ({THREADS} threads) the "
        f"oracle: /proc/PID/mem costs the kernel {ours / npages * 1e6:.2f} us a page however "
        "it is read"
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
