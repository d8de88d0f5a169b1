"""`kcore check` on the real-kernel captures and on roots that mimic a locked or masked host."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import FIXTURE_NAMES, fixture_memory, run_kcore, shared_fixture

NOKASLR, KASLR = FIXTURE_NAMES


def test_check_a_capture_with_its_memory(tmp_path: Path) -> None:
    """The KASLR capture with QEMU's core: the dump would work; facts from its VMCOREINFO."""
    root = shared_fixture(KASLR) / "root"
    mem = fixture_memory(KASLR)
    r = run_kcore("check", "--root", str(root), "--source", f"elf:{mem}", "--output-dir",
                  str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr.decode()
    rep = json.loads(r.stdout)
    assert rep["release"] == "6.1.0-56-amd64" and rep["paging"] == "4-level"
    text = next(int(line.split()[0], 16) for line in (root / "proc/kallsyms").open()
                if line.split()[2:] == ["_text"])
    assert rep["kaslr"] == f"on (KERNELOFFSET {text - 0xFFFFFFFF81000000:#x})"
    # The lime estimate without elision: the RAM ranges plus a 32-byte header each.
    assert 500 << 20 < rep["sizes"]["lime"]["size"] < 513 << 20
    assert rep["sizes"]["padded"]["space"] == rep["sizes"]["padded"]["size"]
    assert rep["free_bytes"] > 0 and str(tmp_path) in rep["command"]
    # -d 31's estimate bounds what the dump then writes, and is well below the whole RAM.
    r = run_kcore("dump", "-q", "--json", "-d", "31", "--root", str(root), "--source",
                  f"elf:{mem}", "-o", "/dev/null")
    written = json.loads(r.stdout)["bytes"]
    assert written <= rep["sizes"]["elf -d 31"]["size"] < rep["sizes"]["elf"]["size"] // 2


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
