"""`kcore check` on the real-kernel captures and on roots that mimic a locked or masked host."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import FIXTURE_NAMES, fixture_memory, run_kcore, shared_fixture

NOKASLR, KASLR = FIXTURE_NAMES


def test_check_a_capture_with_its_memory(tmp_path: Path) -> None:
    """The KASLR capture with QEMU's core: the dump would work; facts from its VMCOREINFO."""
    root = shared_fixture(KASLR) / "root"
    mem = fixture_memory(KASLR)
    r = run_kcore("check", "--root", str(root), "--source", f"elf:{mem}", "--output-dir",
                  str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr.decode()
    rep = json.loads(r.stdout)
    release = (root / "proc/sys/kernel/osrelease").read_text().strip()
    assert rep["release"] == release and rep["paging"] == "4-level"
    text = next(int(line.split()[0], 16) for line in (root / "proc/kallsyms").open()
                if line.split()[2:] == ["_text"])
    assert rep["kaslr"] == f"on (KERNELOFFSET {text - 0xFFFFFFFF81000000:#x})"
    # The lime estimate without elision: the RAM ranges plus a 32-byte header each.
    assert 500 << 20 < rep["sizes"]["lime"]["size"] < 513 << 20
    assert rep["sizes"]["padded"]["space"] == rep["sizes"]["padded"]["size"]
    assert rep["free_bytes"] > 0 and str(tmp_path) in rep["command"]
    # The default core's and -d 31's estimates are within 10% of what the dump then writes.
    for key, args in (("elf", ()), ("elf -d 31", ("-d", "31"))):
        r = run_kcore("dump", "-q", "--json", *args, "--root", str(root), "--source",
                      f"elf:{mem}", "-o", "/dev/null")
        written = json.loads(r.stdout)["bytes"]
        assert abs(rep["sizes"][key]["size"] - written) <= written // 10, (key, written)
    assert rep["sizes"]["elf"]["size"] < rep["sizes"]["elf"]["at_most"] // 2  # zero runs


def test_check_advice_follows_the_estimate(tmp_path: Path) -> None:
    """Where the whole core would not fit but -d 31 would, check says -d 31, and that dump
    fits there; where neither fits, it says to send the dump elsewhere."""
    root = shared_fixture(KASLR) / "root"
    mem = fixture_memory(KASLR)
    for mib, want in ((150, "-d 31 -o"), (8, "| zstd")):
        mnt = tmp_path / f"t{mib}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mnt)],
                           capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a small tmpfs: {r.stderr.decode().strip()}")
        try:
            r = run_kcore("check", "--root", str(root), "--source", f"elf:{mem}",
                          "--output-dir", str(mnt), "--json")
            rep = json.loads(r.stdout)
            assert rep["sizes"]["elf -d 31"]["size"] < rep["free_bytes"] < \
                rep["sizes"]["elf"]["size"] or mib == 8, rep["sizes"]
            assert want in rep["command"], rep["command"]
            if mib == 150:
                words = rep["command"].split()  # kcore dump ... (as root: no sudo)
                r = run_kcore(*words[words.index("dump"):], "-q", "--no-digest")
                assert r.returncode == 0, r.stderr.decode()
                assert (mnt / "mem.elf").stat().st_size <= rep["free_bytes"]
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def _root(tmp_path: Path, lockdown: str | None, kcore: bytes | None) -> Path:
    root = tmp_path / "root"
    for rel in ("proc/iomem", "proc/kallsyms", "proc/cmdline", "proc/sys/kernel/osrelease"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((shared_fixture(NOKASLR) / "root" / rel).read_bytes())
    if lockdown is not None:
        (root / "sys/kernel/security").mkdir(parents=True)
        (root / "sys/kernel/security/lockdown").write_text(
            lockdown.replace("confidentiality", "[confidentiality]"))
    if kcore is not None:
        (root / "proc/kcore").write_bytes(kcore)
    return root


def test_check_says_why_nothing_works(tmp_path: Path) -> None:
    """An empty proc/kcore is reported masked; exit 2 with one line of advice."""
    root = _root(tmp_path, None, b"")
    r = run_kcore("check", "--root", str(root))
    assert r.returncode == 2
    out = r.stdout.decode()
    assert "/proc/kcore masked: 0 bytes long" in out
    assert "KASLR off (_text at the default address)" in out  # the nokaslr capture's kallsyms
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kcore: a dump would not work: /proc/kcore is "
                                               "masked"), err


def test_check_reads_the_lockdown_file(tmp_path: Path) -> None:
    """sys/kernel/security/lockdown's bracketed word is the mode."""
    root = _root(tmp_path, "none integrity confidentiality\n", None)
    r = run_kcore("check", "--root", str(root), "--json")
    rep = json.loads(r.stdout)
    assert rep["lockdown"] == "confidentiality (from sys/kernel/security/lockdown)"
    assert r.returncode == 2 and "lockdown=confidentiality" in r.stderr.decode()
