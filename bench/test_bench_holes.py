"""Sparse sources whose holes filled in: hole discovery must cost the file once (issue #24).

Two rows per filesystem (tmpfs: /dev/shm, ext4: KCORE_BENCH_EXT4_DIR, default /var/tmp):
- the engine reading an almost-dense file (one data run, one hole page at its end) in the
  2 MiB batches a dump uses, against `dd bs=1M` of the same file to /dev/null;
- `kcore dump --format kdump --compress lzo -d 1` of an ELF core of the 512 MiB capture's RAM
  copied densely with one page punched (what a tool reading it on tmpfs leaves), against
  Debian's `makedumpfile -l -d 1` of the same file, output on tmpfs; and of the sparse core.
Before the fix, SEEK_HOLE was asked once per batch and walked tmpfs's page cache to the end
of the data run each time (the issue's 4.6 GB core: kcore 10.5 s, makedumpfile 1.14 s).
Run: python3 -m pytest bench/test_bench_holes.py --benchmark-only  (KCORE_BENCH_HOLES_GIB
sets the engine file's size, default 2; it needs twice that free on each filesystem)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import best_time, best_times
from test_bench_dump import run_timed

from kcore import engine
from tests import helpers

REPO = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("KCORE_BENCH_ROUNDS", "3"))
SIZE = int(float(os.environ.get("KCORE_BENCH_HOLES_GIB", "2")) * (1 << 30))
BATCH = 2 << 20
PAGE = 4096
NOKASLR = helpers.FIXTURE_NAMES[0]
FILESYSTEMS = {"tmpfs": Path("/dev/shm"),
               "ext4": Path(os.environ.get("KCORE_BENCH_EXT4_DIR", "/var/tmp"))}


@pytest.fixture(params=sorted(FILESYSTEMS))
def fs_dir(request):
    """A scratch folder on one filesystem, removed after the test."""
    base = FILESYSTEMS[request.param]
    if not base.is_dir():
        pytest.skip(f"no {base}")
    if shutil.disk_usage(base).free < 2 * SIZE + (2 << 30):
        pytest.skip(f"not enough free space on {base}")
    folder = Path(tempfile.mkdtemp(prefix="kcore-bench-holes-", dir=base))
    yield request.param, folder
    shutil.rmtree(folder, ignore_errors=True)


def _almost_dense(path: Path, size: int) -> None:
    """size bytes of data (no zero page) but a hole in the last page."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    helpers.punch_hole(path, size - PAGE, PAGE)


def test_engine_batched_read_of_an_almost_dense_file(fs_dir, record, note, benchmark):
    """engine.read_range in 2 MiB batches / dd bs=1M to /dev/null, on tmpfs and ext4."""
    name, folder = fs_dir
    src = folder / "almost-dense.bin"
    _almost_dense(src, SIZE)
    fd = os.open(src, os.O_RDONLY)
    buf = bytearray(BATCH)

    def batches() -> None:
        for off in range(0, SIZE, BATCH):
            engine.readinto_range(fd, off, buf)

    def dd() -> None:
        subprocess.run(["dd", f"if={src}", "of=/dev/null", "bs=1M"], check=True,
                       capture_output=True)

    load = os.getloadavg()[0]
    try:
        ours, floor = best_times([batches, dd], ROUNDS)
    finally:
        os.close(fd)
    benchmark.extra_info.update(kcore_s=ours, dd_s=floor)
    benchmark.pedantic(lambda: None, rounds=1)
    ratio = floor / ours
    record(f"{name}: {SIZE >> 30} GiB almost-dense file (one hole page) read in 2 MiB batches: "
           "engine speed / dd bs=1M", f"{ratio:.2f}x ({ours:.3f} s vs {floor:.3f} s, "
           f"load {load:.1f})", ">= 0.8x", ratio >= 0.8)


def test_kdump_of_a_filled_qemu_core_vs_makedumpfile(fs_dir, record, note, benchmark):
    """makedumpfile -l -d 1 time / kcore kdump lzo -d 1's, on the capture's core: filled, sparse."""
    if shutil.which("makedumpfile") is None:
        pytest.skip("no makedumpfile (Debian: makedumpfile)")
    name, folder = fs_dir
    root = helpers.shared_fixture(NOKASLR) / "root"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # makedumpfile 1.7.2 refuses QEMU's core of the capture (its PT_LOADs' p_vaddr are 0):
    # the capture's RAM as a /proc/vmcore-like ELF, zero pages left as holes
    core = folder / "vmcore.elf"
    run_timed([sys.executable, "-m", "kcore", "dump", "--root", str(root), "--source",
               f"raw:{helpers.fixture_memory(NOKASLR)}", "--no-elide", "--no-digest",
               "--quiet", "-o", str(core)], env=env)
    filled = folder / "vmcore-filled.elf"
    helpers.filled_copy(core, filled)
    sparse = folder / "vmcore-sparse.elf"
    out_dir = Path(tempfile.mkdtemp(prefix="kcore-bench-holes-out-", dir="/dev/shm"))
    out = out_dir / "out.kdump"

    def clean() -> None:
        for f in out_dir.iterdir():  # the dump and kcore's manifest beside it
            f.unlink()

    def resparse() -> None:
        # makedumpfile mmaps its input: on tmpfs its read faults fill the holes in
        clean()
        sparse.unlink(missing_ok=True)
        subprocess.run(["cp", "--sparse=always", str(core), str(sparse)], check=True)

    def ours(src: Path) -> None:
        run_timed([sys.executable, "-m", "kcore", "dump", "--root", str(root), "--source",
                   f"elf:{src}", "--format", "kdump", "--compress", "lzo", "-d", "1",
                   "--quiet", "--no-digest", "-o", str(out)], env=env)

    def theirs(src: Path) -> None:
        run_timed(["makedumpfile", "-l", "-d", "1", str(src), str(out)])

    try:
        for label, src, setup in (("filled (one hole page)", filled, clean),
                                  ("sparse (zero pages as holes)", sparse, resparse)):
            load = os.getloadavg()[0]
            setup()
            allocated = src.stat().st_blocks * 512
            t_ours = best_time(lambda src=src: ours(src), ROUNDS, setup)
            t_theirs = best_time(lambda src=src: theirs(src), ROUNDS, setup)
            ratio = t_theirs / t_ours
            record(f"{name}: kdump lzo -d 1 of the 512 MiB capture's core, {label} "
                   f"({allocated >> 20} MiB allocated), output on tmpfs: makedumpfile -l -d 1 "
                   "time / kcore's", f"{ratio:.2f}x ({t_ours:.2f} s vs {t_theirs:.2f} s, "
                   f"load {load:.1f})", ">= 1.0x", ratio >= 1.0)
        benchmark.pedantic(lambda: None, rounds=1)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
