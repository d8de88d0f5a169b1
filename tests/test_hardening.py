"""Hostile inputs, races, closed streams and kills (issue #15): each one a regression test."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from conftest import FIXTURE_NAMES, fixture_memory, run_kcore, shared_fixture

import kcore
from kcore import kcorefile
from kcore.errors import SourceError
from kcore.sources import base

NOKASLR = FIXTURE_NAMES[0]
MiB = 1 << 20


def _nokaslr() -> tuple[str, str]:
    """(root, raw source spec) of the nokaslr capture."""
    return str(shared_fixture(NOKASLR) / "root"), f"raw:{fixture_memory(NOKASLR)}"


def _held_read(monkeypatch: pytest.MonkeyPatch, module: object, name: str,
               entered: threading.Event, go_on: threading.Event) -> None:
    """Make module.name (a read taking an fd first) stop once inside, until go_on is set."""
    real = getattr(module, name)

    def slow(fd: int, *args: object, **kw: object) -> object:
        entered.set()
        go_on.wait(2)
        return real(fd, *args, **kw)

    monkeypatch.setattr(module, name, slow)


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_a_read_racing_close_never_returns_another_files_bytes(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, path: str) -> None:
    """close() during a read: the read gives the source's bytes or an error, never a new file's."""
    root, spec = _nokaslr()
    entered, go_on = threading.Event(), threading.Event()
    if path == "fast":  # KcoreFile.pread inside one RAM extent: the direct C call
        _held_read(monkeypatch, kcorefile, "_kc_read_fd", entered, go_on)
    else:  # the MemorySource path (readinto_phys)
        _held_read(monkeypatch, base, "readinto_range", entered, go_on)
    f = kcore.open(root, spec)
    want = os.pread(os.open(fixture_memory(NOKASLR), os.O_RDONLY), MiB, 0x1000000)
    ram = next(off for e, off in f.header.loads if e.paddr == 0x100000)
    offset = ram + 0x1000000 - 0x100000
    got: list[object] = []

    def reader() -> None:
        try:
            if path == "fast":
                got.append(f.pread(MiB, offset))
            else:
                got.append(f.source.read_phys(0x1000000, MiB)[0])
        except (SourceError, ValueError) as exc:
            got.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    assert entered.wait(5)
    closer = threading.Thread(target=f.close)
    closer.start()
    time.sleep(0.2)
    planted = tmp_path / "other"
    planted.write_bytes(b"\xa5" * (64 * MiB))
    others = [os.open(planted, os.O_RDONLY) for _ in range(8)]  # take any freed fd numbers
    go_on.set()
    t.join(10)
    closer.join(10)
    for fd in others:
        os.close(fd)
    assert not t.is_alive() and not closer.is_alive()
    assert len(got) == 1
    assert isinstance(got[0], Exception) or got[0] == want
    with pytest.raises(ValueError):
        f.pread(4096, offset)


def test_a_read_after_the_source_closed_is_a_clean_error() -> None:
    """A MemorySource read after close(): kcore's SourceError, not EBADF or another file."""
    _root, spec = _nokaslr()
    from kcore.sources import open_source

    src = open_source(spec)
    src.close()
    with pytest.raises(SourceError, match="closed"):
        src.read_phys(0x1000000, 4096)


def test_run_kcore_is_importable() -> None:
    """The CLI runs from this checkout (a smoke test for the helpers below)."""
    assert run_kcore("--version").returncode == 0
