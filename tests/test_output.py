"""Safe outputs: 0600, O_EXCL, no symlinks, temp name + rename, sidecars checked by sha256sum."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess

import pytest

from kcore.errors import OutputError
from kcore.output import open_output


def _write(out, data: bytes, offset: int = 0) -> None:
    """Write data at offset as a dump does: the hasher, if any, takes the bytes in order."""
    os.pwrite(out.fd, data, offset)
    if out.hasher is not None:
        out.hasher.submit(data)


def test_file_is_0600_and_sidecars_pass_sha256sum(tmp_path):
    path = tmp_path / "dump.bin"
    os.umask(0o022)
    data = os.urandom(3 << 20) + bytes(1 << 20)
    with open_output(str(path)) as out:
        out.set_size(len(data) + 4096)  # a tail hole: must hash as zeros
        out.start_digest()
        _write(out, data)
        out.hasher.submit(bytes(4096))  # the hole is hashed as the zeros it reads as
        out.commit(len(data) + 4096, {"source": "test"})
    expect = hashlib.sha256(data + bytes(4096)).hexdigest()
    for p in (path, tmp_path / "dump.bin.sha256", tmp_path / "dump.bin.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert (tmp_path / "dump.bin.sha256").read_text() == f"{expect}  dump.bin\n"
    assert json.loads((tmp_path / "dump.bin.json").read_text())["sha256"] == expect
    subprocess.run(["sha256sum", "-c", "dump.bin.sha256"], cwd=tmp_path, check=True,
                   capture_output=True)
    assert sorted(os.listdir(tmp_path)) == ["dump.bin", "dump.bin.json", "dump.bin.sha256"]


def test_existing_file_needs_force(tmp_path):
    path = tmp_path / "dump.bin"
    path.write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists; use --force"):
        open_output(str(path))
    assert path.read_bytes() == b"old"
    with open_output(str(path), force=True) as out:
        _write(out, b"new")
        out.commit(3)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_force_without_digest_drops_the_old_digest(tmp_path):
    """--force --no-digest over a digested dump: the old OUTPUT.sha256, which sha256sum says
    no longer matches, is not left beside the new dump."""
    path = tmp_path / "dump.bin"
    with open_output(str(path)) as out:
        out.start_digest()
        _write(out, b"old" * 4096)
        out.commit(3 * 4096)
    with open_output(str(path), force=True, digest=False) as out:
        _write(out, b"new" * 4096)
        check = subprocess.run(["sha256sum", "-c", "dump.bin.sha256"], cwd=tmp_path,
                               capture_output=True)
        out.commit(3 * 4096)
    assert check.returncode == 0  # before the commit the old digest still held
    assert subprocess.run(["sha256sum", "-c", "dump.bin.sha256"], cwd=tmp_path,
                          capture_output=True).returncode != 0
    assert sorted(os.listdir(tmp_path)) == ["dump.bin"]


def test_existing_sidecar_needs_force(tmp_path):
    (tmp_path / "dump.bin.sha256").write_text("x")
    with pytest.raises(OutputError, match="dump.bin.sha256 already exists"):
        open_output(str(tmp_path / "dump.bin"))


def test_symlink_is_refused_even_with_force(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "dump.bin"
    link.symlink_to(victim)
    for force in (False, True):
        with pytest.raises(OutputError, match="symbolic link"):
            open_output(str(link), force=force)
    assert victim.read_bytes() == b"keep"
    assert link.is_symlink()


def test_temp_name_never_follows_planted_symlinks(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    planted = []
    import kcore.output as mod

    real = mod._create_exclusive

    def plant_then_create(dir_fd, name):
        if not planted:  # an attacker guessed the first temp name: it must not be used
            os.symlink(victim, name, dir_fd=dir_fd)
            planted.append(name)
        return real(dir_fd, name)

    monkeypatch.setattr(mod, "_open_unnamed", lambda dir_fd: None)  # named temps (vfat...)
    monkeypatch.setattr(mod, "_create_exclusive", plant_then_create)
    with open_output(str(tmp_path / "dump.bin")) as out:
        _write(out, b"data")
        out.commit(4)
    assert planted and victim.read_bytes() == b"keep"
    assert (tmp_path / "dump.bin").read_bytes() == b"data"


def test_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with open_output(str(tmp_path / "dump.bin")) as out:
            out.start_digest()
            _write(out, b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_keyboard_interrupt_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with open_output(str(tmp_path / "dump.bin")) as out:
            _write(out, b"partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_free_space_is_checked_up_front(tmp_path):
    with open_output(str(tmp_path / "dump.bin")) as out:
        with pytest.raises(OutputError, match="not enough space .* up to .*conservative"):
            out.check_space(1 << 62, estimate=True)
    assert os.listdir(tmp_path) == []


def test_enospc_removes_the_partial_file(small_tmpfs):
    with pytest.raises(OutputError, match="no space left.*removed"):
        with open_output(str(small_tmpfs / "dump.bin")) as out:
            for i in range(16):
                _write(out, bytes([1]) * (1 << 20), i << 20)
    assert os.listdir(small_tmpfs) == []


def test_char_device_is_written_in_place():
    # /dev/null takes writes at any offset (threads write in any order); /dev/full does not
    # count as seekable.
    with open_output("/dev/null") as out:
        assert out.kind == "device" and out.seekable
        os.pwrite(out.fd, b"x" * 10, 1 << 40)
        out.commit(10)
    assert out.sha256 is None
    with open_output("/dev/full") as out:
        assert out.kind == "device" and not out.seekable


@pytest.mark.parametrize("sparse", [True, False])
def test_inline_digest_hashes_what_write_plan_wrote(tmp_path, sparse):
    from kcore.formats.plan import Blob, Copy, Plan, Zeros
    from kcore.formats.write import write_plan

    src = tmp_path / "src.bin"
    data = os.urandom(3 << 20) + bytes(5 << 20) + os.urandom(12345)
    src.write_bytes(data)
    layout = Plan([Blob(0, b"head" * 1000), Copy(4000, 4096 * 5 + 7, len(data) - 4096 * 5 - 7),
                     Zeros(4000 + len(data) - 4096 * 5 - 7, 3 << 20)],
                    4000 + len(data) - 4096 * 5 - 7 + (3 << 20))
    assert layout.contiguous
    assert not Plan([Blob(0, b"x"), Zeros(2, 3)], 5).contiguous
    path = tmp_path / "out.bin"
    fd = os.open(src, os.O_RDONLY)
    try:
        with open_output(str(path)) as out:
            out.start_digest()
            assert out.hasher is not None
            write_plan(out, type("S", (), {"fd": fd})(), layout, sparse=sparse, strict=False)
            out.commit(layout.size)
    finally:
        os.close(fd)
    written = path.read_bytes()
    assert written == b"head" * 1000 + data[4096 * 5 + 7:] + bytes(3 << 20)
    assert out.sha256 == hashlib.sha256(written).hexdigest()
    subprocess.run(["sha256sum", "-c", "out.bin.sha256"], cwd=tmp_path, check=True,
                   capture_output=True)


def test_inline_digest_is_dropped_on_abort(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with open_output(str(tmp_path / "x.bin")) as out:
            out.start_digest()
            buf = out.hasher.buffer()
            os.pwrite(out.fd, buf, 0)
            out.hasher.submit(buf)
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
