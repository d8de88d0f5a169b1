"""What `kcore verify` and the manifest's chunk digests cost, as ratios to sha256sum/hashlib."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
from conftest import best_times

from kcore.output import ChunkedSha256
from tests import helpers

REPO = helpers.REPO
KASLR = helpers.FIXTURE_NAMES[1]


def test_chunk_digests_cost(benchmark, record, note):
    """The whole-output SHA-256 with and without the per-64-MiB chunk digests beside it."""
    data = os.urandom(1 << 20) * 256  # 256 MiB

    def plain() -> str:
        h = hashlib.sha256()
        for i in range(0, len(data), 8 << 20):
            h.update(memoryview(data)[i:i + (8 << 20)])
        return h.hexdigest()

    def chunked() -> str:
        h = ChunkedSha256()
        for i in range(0, len(data), 8 << 20):
            h.update(memoryview(data)[i:i + (8 << 20)])
        return h.hexdigest()

    assert plain() == chunked()
    t_plain, t_chunked = best_times([plain, chunked], rounds=3)
    benchmark.pedantic(chunked, rounds=1)
    ratio = t_chunked / t_plain
    record("SHA-256 of 256 MiB plus its 4 chunk digests (second thread) vs the SHA-256 alone",
           f"{ratio:.2f}x the time ({256 / t_chunked:.0f} vs {256 / t_plain:.0f} MiB/s)",
           "<= 1.3x on 2 cores", ratio <= 1.3)
    note(f"Load average at the end of the chunk-digest run: {os.getloadavg()}.")


def test_verify_vs_sha256sum(benchmark, record, tmp_path):
    """`kcore verify` of an ELF dump (structure, digest, chunks, zero pages) vs sha256sum."""
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum")
    root = helpers.shared_fixture(KASLR) / "root"
    mem = helpers.fixture_memory(KASLR)
    out = tmp_path / "mem.elf"
    r = helpers.run_kcore("dump", "-q", "--root", str(root), "--source", f"elf:{mem}",
                                 "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def verify() -> None:
        subprocess.run([sys.executable, "-m", "kcore", "verify", str(out)], env=env, check=True,
                       capture_output=True)

    def sha256sum() -> None:
        subprocess.run(["sha256sum", str(out)], check=True, capture_output=True)

    t_verify, t_sum = best_times([verify, sha256sum], rounds=3)
    benchmark.pedantic(verify, rounds=1)
    size = out.stat().st_size >> 20
    ratio = t_verify / t_sum
    record(f"kcore verify of a {size} MiB ELF dump vs sha256sum of it",
           f"{ratio:.2f}x the time ({t_verify:.2f} s vs {t_sum:.2f} s)", "<= 3x", ratio <= 3)
