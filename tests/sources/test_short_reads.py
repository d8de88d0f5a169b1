"""Every reader takes short reads: dumps served by a file system that returns 1-64 KiB per read.

9p (6.1's returns 507,904 bytes per read), NFS and FUSE may return less than asked without an
error; a reader that takes that for the end of the file calls an intact dump damaged. Each
format's dump of a real-kernel capture is served through a FUSE pass-through that cuts every
read short (tests/sources/shortread_fs.py), then verified and read back through its own source kind,
page for page against the capture's RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kcore.cli import main
from tests.helpers import FIXTURE_NAMES, fixture_memory, run_kcore, scratch_dir, shared_fixture

NOKASLR = FIXTURE_NAMES[0]
FORMATS = ("elf", "lime", "raw", "padded", "kdump", "avml")
HERE = Path(__file__).resolve().parent
STEP = 64 << 20
SAMPLE = 16 << 20


def _fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not shutil.which("fusermount3"):
        return "no fusermount3 (Debian's fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"mfusepy (the test extra) does not load: {exc}"
    return None


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest):
    """(folder of dumps, the same folder through the short-read FUSE mount)."""
    why = _fuse_missing()
    if why:
        pytest.skip(why)
    name = NOKASLR
    mem = fixture_memory(name)
    root = str(shared_fixture(name) / "root")
    src = scratch_dir(request, "dumps")
    for fmt in FORMATS:
        r = run_kcore("dump", "-q", "--root", root, "--source", f"raw:{mem}", "--format", fmt,
                      "-o", str(src / f"mem.{fmt}"))
        assert r.returncode == 0, r.stderr.decode()
    with open(src / "mem.flat", "wb") as f:  # makedumpfile's flattened stream, as -o - writes
        r = run_kcore("dump", "-q", "--root", root, "--source", f"raw:{mem}", "--format",
                      "kdump", "-o", "-", capture_output=False, stdout=f,
                      stderr=subprocess.PIPE)
    assert r.returncode == 0, r.stderr.decode()
    mnt = scratch_dir(request, "mnt")
    server = subprocess.Popen([sys.executable, str(HERE / "shortread_fs.py"), str(src),
                               str(mnt)], stderr=subprocess.PIPE)
    for _ in range(100):
        if os.path.ismount(mnt) or server.poll() is not None:
            break
        time.sleep(0.05)
    if not os.path.ismount(mnt):
        server.kill()
        pytest.skip(f"cannot mount FUSE here: {server.communicate()[1].decode().strip()}")
    yield src, mnt
    subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def test_reads_are_short(served) -> None:
    """The mount does what it is for: a 1 MiB read returns 64 KiB or less."""
    _src, mnt = served
    fd = os.open(mnt / "mem.elf", os.O_RDONLY)
    try:
        assert all(0 < len(os.pread(fd, 1 << 20, k << 20)) <= 64 << 10 for k in range(4))
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", (*FORMATS, "flat"))
def test_verify_through_short_reads(served, fmt: str, capsys) -> None:
    """kcore verify finds the dump intact through the mount: every byte hashed, its digest
    the one the dump wrote beside it."""
    src, mnt = served
    capsys.readouterr()
    rc = main(["verify", "--json", str(mnt / f"mem.{fmt}")])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["ok"], res["problems"]
    if fmt != "flat":  # the stream has no sidecar
        assert (src / f"mem.{fmt}.sha256").read_text().split()[0] == res["sha256"]
        assert set(res["digest"].values()) == {"match"}


def _ram(name: str) -> list[tuple[int, int]]:
    kc = json.loads((shared_fixture(name) / "expected" / "kcore.json").read_text())
    return [(p["p_paddr"], p["p_filesz"]) for p in kc["phdrs"]
            if p["p_type"] == 1 and p["p_paddr"] != (1 << 64) - 1
            and p["p_vaddr"] < 0xFFFFFFFF80000000]


def _digest(spec: str, ram: list[tuple[int, int]]) -> str:
    from kcore.sources import open_source

    h = hashlib.sha256()
    with open_source(spec) as src:
        for paddr, size in ram:
            for pos in range(0, size, STEP):
                h.update(src.read_phys(paddr + pos, min(STEP, size - pos))[0])
    return h.hexdigest()


def test_read_back_through_short_reads(served) -> None:
    """Each dump, read through its own source kind on the mount, holds the capture's RAM (the
    first and last 16 MiB of each range: compressed dumps are unpacked whole to open)."""
    _src, mnt = served
    ram = sorted({(a + off, min(SAMPLE, n)) for a, n in _ram(NOKASLR)
                  for off in (0, max(0, n - SAMPLE))})
    want = _digest(f"raw:{fixture_memory(NOKASLR)}", ram)
    kinds = {"elf": "elf", "lime": "lime", "raw": "raw", "padded": "padded", "kdump": "kdump",
             "avml": "avml", "flat": "kdump"}
    got = {fmt: _digest(f"{kind}:{mnt / f'mem.{fmt}'}", ram) for fmt, kind in kinds.items()}
    assert got == dict.fromkeys(kinds, want)
