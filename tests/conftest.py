"""pytest fixtures shared by the tests (the helpers they use live in tests/helpers.py)."""

from __future__ import annotations

import subprocess

import pytest

# Earlier branches import these from conftest: kept importable here until they move.
from helpers import (  # noqa: F401
    DATA,
    FIXTURE_NAMES,
    REPO,
    SHARED_FIXTURES,
    debug_vmlinux,
    fixture_memory,
    run_kcore,
    shared_fixture,
    volatility_cmd,
)


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs mounted for one test (a disk that fills up), or skip."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)
