"""kcore header's output file: 0600, never overwritten without --force, never through a symlink."""

from __future__ import annotations

import os

from tests.helpers import FIXTURE_NAMES, fixture_memory, run_kcore, shared_fixture


def _args(out) -> list[str]:
    name = FIXTURE_NAMES[0]
    return ["header", "--root", str(shared_fixture(name) / "root"),
            "--source", f"raw:{fixture_memory(name)}", "-o", str(out)]


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "head.bin"
    out.write_bytes(b"keep me")
    res = run_kcore(*_args(out))
    assert res.returncode == 1 and b"--force" in res.stderr
    assert out.read_bytes() == b"keep me"
    assert run_kcore(*_args(out), "--force").returncode == 0
    assert out.read_bytes()[:4] == b"\x7fELF" and (out.stat().st_mode & 0o777) == 0o600


def test_planted_symlink_is_not_followed(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"secret")
    os.chmod(target, 0o644)
    link = tmp_path / "head.bin"
    link.symlink_to(target)
    assert run_kcore(*_args(link)).returncode == 1
    assert run_kcore(*_args(link), "--force").returncode == 0
    assert target.read_bytes() == b"secret"  # the link was replaced, not written through
    assert not link.is_symlink() and link.read_bytes()[:4] == b"\x7fELF"
    assert (link.stat().st_mode & 0o777) == 0o600


def test_header_to_stdout_is_the_same_bytes(tmp_path):
    out = tmp_path / "head.bin"
    assert run_kcore(*_args(out)).returncode == 0
    res = run_kcore(*_args("-"))
    assert res.returncode == 0 and res.stdout == out.read_bytes()
