"""Hole discovery in a sparse source file costs the file once, not once per batch.

On tmpfs, lseek(SEEK_HOLE) walks the page cache from the offset to the next hole, so a
source asked once per 2 MiB batch pays the square of a data run's length (issue #24: a
4.6 GB QEMU core whose holes had filled dumped 9.4x slower than makedumpfile). The kernel's
own syscall log (strace) counts the asks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import (
    FIXTURE_NAMES,
    REPO,
    filled_copy,
    fixture_memory,
    punch_hole,
    shared_fixture,
)

PAGE = 4096
BATCH = 2 << 20  # what a dump reads per call of the engine
TMPFS_MAGIC = 0x01021994
TIMESTAMP = slice(408, 424)  # struct timeval in makedumpfile's disk_dump_header


@pytest.fixture
def shm_dir():
    """A fresh folder on tmpfs (/dev/shm), where SEEK_HOLE's cost grows with the data run;
    removed after the test (its files are hundreds of MiB)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) to hold the source")
    if os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize < 2 << 30:
        pytest.skip("less than 2 GiB free on /dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="kcore-holes-", dir=shm))
    fs = subprocess.run(["stat", "-f", "-c", "%t", str(folder)], capture_output=True, text=True)
    if fs.returncode or int(fs.stdout.strip() or "0", 16) != TMPFS_MAGIC:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip("/dev/shm is not tmpfs here")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _strace() -> str:
    path = shutil.which("strace")
    if path is None:
        pytest.skip("no strace to count lseek calls (Debian: strace)")
    return path


def _seek_asks(log: Path) -> dict[str, int]:
    """SEEK_DATA and SEEK_HOLE calls in an `strace -f -e trace=lseek` log."""
    text = log.read_text()
    return {w: text.count(w) for w in ("SEEK_DATA", "SEEK_HOLE")}


def _punch(path: Path, offset: int) -> None:
    """One page out of path: the file has holes (the engine asks), its data runs are long."""
    try:
        punch_hole(path, offset, PAGE)
    except OSError as exc:
        pytest.skip(f"cannot punch a hole on this tmpfs: {exc}")


def test_batched_reads_ask_seek_hole_once_per_data_run(shm_dir):
    """256 MiB of data then a hole, read in 2 MiB batches: SEEK_HOLE once, not 128 times."""
    strace = _strace()
    src = shm_dir / "ram.bin"
    size = 256 << 20
    block = os.urandom(1 << 20)
    with open(src, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    _punch(src, size - PAGE)
    reader = ("import os, sys\n"
              "from kcore import engine\n"
              "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
              "size = os.fstat(fd).st_size\n"
              f"for off in range(0, size, {BATCH}):\n"
              f"    data, _ = engine.read_range(fd, off, {BATCH})\n"
              f"print(data == os.pread(fd, {BATCH - PAGE}, size - {BATCH}) + bytes({PAGE}))\n")
    log = shm_dir / "lseek.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([strace, "-f", "-qq", "-e", "trace=lseek", "-o", str(log),
                          sys.executable, "-c", reader, str(src)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True"]  # the last batch: its data, then the hole as zeros
    asks = _seek_asks(log)
    # one data run [0, size - PAGE), one hole: asked about once each; per batch it was 128
    assert asks["SEEK_HOLE"] <= 2, asks
    assert asks["SEEK_DATA"] <= 3, asks


def test_kdump_of_a_filled_qemu_core_on_tmpfs_asks_once(shm_dir):
    """QEMU's core of the KASLR capture, copied densely to tmpfs with one page punched (as after
    makedumpfile read it there): `dump --format kdump -d 1` asks SEEK_HOLE a handful of times
    (it was once per 2 MiB batch: 256), and its dump equals the one from the sparse original."""
    strace = _strace()
    name = FIXTURE_NAMES[1]
    root = shared_fixture(name) / "root"
    core = fixture_memory(name)
    src = shm_dir / "vmcore.elf"
    try:
        filled_copy(core, src)  # dense, but for one page of zeros near the end
    except OSError as exc:
        pytest.skip(f"cannot punch a hole on this tmpfs: {exc}")
    log = shm_dir / "lseek.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    outs = []
    for source, traced in ((src, True), (core, False)):
        out = shm_dir / f"out-{len(outs)}.kdump"
        cmd = [sys.executable, "-m", "kcore", "dump", "--root", str(root), "--source",
               f"elf:{source}", "--format", "kdump", "--compress", "lzo", "-d", "1",
               "--quiet", "--no-digest", "-o", str(out)]
        if traced:
            cmd = [strace, "-f", "-qq", "-e", "trace=lseek", "-o", str(log), *cmd]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        outs.append(out)
    asks = _seek_asks(log)
    assert 1 <= asks["SEEK_HOLE"] <= 16, asks
    a, b = (bytearray(out.read_bytes()) for out in outs)
    a[TIMESTAMP] = b[TIMESTAMP] = bytes(16)  # disk_dump_header.timestamp: when each was made
    assert a == b
