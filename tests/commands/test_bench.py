"""kcore bench on a saved kcore (the real one is exercised in tests/vm/test_vm_bench.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import FIXTURE_NAMES, fixture_memory, run_kcore, shared_fixture

ALL_ONES = (1 << 64) - 1


@pytest.fixture(scope="module")
def saved_kcore() -> Iterator[tuple[str, int]]:
    """A kcore image of the nokaslr capture on tmpfs (sparse); its real RAM byte count."""
    name = FIXTURE_NAMES[0]
    folder = shared_fixture(name)
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm for a sparse 128 TiB kcore image")
    out = shm / f"kcore-bench-cmd-{os.getpid()}.kcore"
    r = run_kcore("dump", "--root", str(folder / "root"), "--source",
                  f"raw:{fixture_memory(name)}", "--format", "kcore", "--quiet", "--no-digest",
                  "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    real = json.loads((folder / "expected/kcore.json").read_text())
    ram = sum(p["p_filesz"] for p in real["phdrs"] if p["p_type"] == 1
              and p["p_paddr"] != ALL_ONES and p["p_vaddr"] < 0xFFFFFFFF80000000)
    try:
        yield str(out), ram
    finally:
        for path in (out, *shm.glob(out.name + ".*")):  # the dump and its sidecars
            path.unlink(missing_ok=True)


def test_bench_limit_json(saved_kcore: tuple[str, int]) -> None:
    """--limit reads that much of the RAM segments each way; the dump run is left out."""
    path, ram = saved_kcore
    limit = 32 << 20
    r = run_kcore("bench", "--against", path, "--limit", str(limit), "--rounds", "2", "--json",
                  "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    result = json.loads(r.stdout)
    assert result["bytes"] == min(limit, ram) and result["rounds"] == 2
    assert [x["name"] for x in result["runs"]] == ["dd-1M", "dd-4k", "kcore-engine"]
    assert set(result["speedup"]) == {"kcore-engine/dd-1M", "kcore-engine/dd-4k"}
    r = run_kcore("bench", "--against", path, "--limit", str(limit), "--rounds", "1", "--json",
                  "--threads", "3")
    assert r.returncode == 0, r.stderr.decode()
    result = json.loads(r.stdout)
    assert [x["name"] for x in result["runs"]] == ["dd-1M", "dd-4k", "kcore-engine",
                                                   "kcore-engine-threads"]
    assert all(x["bytes"] == min(limit, ram) for x in result["runs"])
    assert "kcore-engine-threads/dd-1M" in result["speedup"]


def test_bench_text_output(saved_kcore: tuple[str, int]) -> None:
    """The human output names every method and each speedup."""
    path, _ram = saved_kcore
    r = run_kcore("bench", "--against", path, "--limit", str(8 << 20), "--rounds", "1")
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    for word in ("dd-1M", "dd-4k", "kcore-engine", "speedup kcore-engine/dd-1M"):
        assert word in out


def test_bench_errors(tmp_path: Path) -> None:
    """A missing kcore or zero rounds: one line on stderr, exit status 2."""
    r = run_kcore("bench", "--against", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.decode().startswith("kcore: error:")
    assert len(r.stderr.decode().strip().splitlines()) == 1
