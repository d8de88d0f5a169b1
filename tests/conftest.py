"""pytest fixtures shared by the tests (the helpers they use live in tests/helpers.py)."""

from __future__ import annotations

import subprocess

import pytest


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
