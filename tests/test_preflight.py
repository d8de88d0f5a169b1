"""kcore.preflight against the real-kernel captures: what `kcore check` reports of a system is
what that kernel's own /proc/kcore showed (its size, its RAM segments, its VMCOREINFO)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from kcore import preflight
from kcore.discover import discover
from kcore.errors import SourceError
from kcore.sources import live
from tests.commands.test_dump import source_spec
from tests.helpers import FIXTURE_NAMES, shared_fixture

LIME_HEADER = 32


class Real:
    """A capture's root and what its real kcore showed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.folder = shared_fixture(name)
        self.root = self.folder / "root"
        self.meta = json.loads((self.folder / "expected/kcore.json").read_text())
        loads = [p for p in self.meta["phdrs"] if p["p_type"] == 1]
        self.ram = [p for p in loads if p["kind"] == "KCORE_RAM"]
        self.text = next(p for p in loads if p["kind"] == "KCORE_TEXT")
        note = next(n for n in self.meta["notes"] if n["name"] == "VMCOREINFO")
        self.info = dict(line.partition("=")[::2] for line in note["text"].splitlines())


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def real(request: pytest.FixtureRequest) -> Real:
    """Each x86-64 capture."""
    return Real(request.param)


def test_check_reports_the_kernels_facts(real: Real, tmp_path: Path) -> None:
    """Release, paging, KASLR from VMCOREINFO; RAM and the kcore and lime sizes from the real
    kcore's own RAM segments and file size."""
    rep = preflight.check(str(real.root), str(tmp_path), source_spec(real.name))
    assert rep.verdict and rep.problem is None
    assert rep.release == real.info["OSRELEASE"]
    assert rep.arch == (real.root / "proc/sys/kernel/arch").read_text().strip()
    assert rep.paging == ("5-level" if real.info["NUMBER(pgtable_l5_enabled)"] != "0"
                          else "4-level")
    offset = int(real.info["KERNELOFFSET"], 16)
    assert rep.kaslr == (f"on (KERNELOFFSET {offset:#x})" if offset else "off (KERNELOFFSET 0)")
    ram = sum(p["p_memsz"] for p in real.ram)
    # iomem's System RAM bytes: the kernel's RAM pages and the sub-page tails it leaves out
    assert rep.ram_bytes is not None and ram <= rep.ram_bytes < ram + 4096 * len(real.ram)
    assert rep.sizes["kcore"]["size"] == real.meta["kcore_st_size"]
    assert rep.sizes["lime"]["size"] == ram + LIME_HEADER * len(real.ram)
    assert rep.sizes["elf -d 31"]["size"] < rep.sizes["elf"]["size"]
    assert rep.kallsyms == "addresses visible"
    assert rep.command is not None and rep.command.endswith(f"-o {tmp_path}/mem.elf")
    assert json.loads(json.dumps(rep.as_dict()))["release"] == rep.release


def test_kallsyms_state_and_the_hidden_addresses(real: Real, tmp_path: Path) -> None:
    """_text where the kernel put it (its TEXT segment); all zeros (kptr_restrict) is hidden."""
    state, text = preflight._kallsyms_state(real.root)
    assert (state, text) == ("addresses visible", real.text["p_vaddr"])
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    lines = (real.root / "proc/kallsyms").read_text().splitlines()[:5000]
    (root / "proc/kallsyms").write_text("".join(f"{0:016x} {ln.split(' ', 1)[1]}\n"
                                                for ln in lines))
    assert preflight._kallsyms_state(root)[1] is None
    assert preflight._kallsyms_state(root)[0].startswith("addresses hidden")


def test_probe_kcore_reads_a_kcore_shaped_file(real: Real) -> None:
    """A file of the real kcore's size and header reads RAM; a /dev/null over it, or a short
    file, is a mask."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm for a sparse 128 TiB file")
    root = shm / f"kcore-test-preflight-{os.getpid()}"
    try:
        (root / "proc").mkdir(parents=True)
        with open(root / "proc/kcore", "wb") as f:
            f.write((real.folder / "expected/kcore-head-64k.bin").read_bytes())
            f.truncate(real.meta["kcore_st_size"])
        assert preflight.kcore_mask(root) is None
        probe = live.probe(root, "kcore", None, 0)
        assert (probe.name, probe.works, probe.reason) == ("kcore", True, "reads RAM")
        with live.open_auto(str(root)) as src:  # auto opens what the probe found working
            assert src.path == str(root / "proc/kcore")
        (root / "proc/kcore").unlink()
        (root / "proc/kcore").symlink_to("/dev/null")
        mask = "a character device 1:3 (/dev/null) is mounted over it (a container's mask)"
        assert preflight.kcore_mask(root) == mask
        assert not live.probe(root, "kcore", None, 0).works
        # auto, check and the manifest give the same reason for each source
        with pytest.raises(SourceError) as exc:
            live.open_auto(str(root))
        reasons = [f"{p.path}: {p.reason}" for p in live.probe_all(root)]
        assert str(exc.value) == "no live memory source works: " + "; ".join(reasons)
        assert reasons[0] == f"{root}/proc/kcore: masked: {mask}"
        assert [p.reason for p in preflight.check(str(root)).sources] == \
            [p.reason for p in live.probe_all(root)]
        (root / "proc/kcore").unlink()
        (root / "proc/kcore").write_bytes(b"\x7fELF")
        assert "4 bytes long" in (preflight.kcore_mask(root) or "")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("text, mode", [
    ("none [integrity] confidentiality\n", "integrity"),
    ("[none] integrity confidentiality\n", "none"),
    ("none integrity [confidentiality]\n", "confidentiality"),
])
def test_lockdown_mode_reads_the_kernels_file(tmp_path: Path, text: str, mode: str) -> None:
    """security/lockdown.c's show function brackets the current mode; without securityfs the
    boot command line's lockdown= is taken, and said so."""
    (tmp_path / "sys/kernel/security").mkdir(parents=True)
    (tmp_path / "sys/kernel/security/lockdown").write_text(text)
    assert preflight.lockdown_mode(tmp_path) == (mode, "from sys/kernel/security/lockdown")
    (tmp_path / "sys/kernel/security/lockdown").unlink()
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text(f"console=ttyS0 lockdown={mode}\n")
    got, how = preflight.lockdown_mode(tmp_path)
    assert got == mode and how.startswith(f"from the boot command line (lockdown={mode})")


def test_banner_in_memory_is_the_kernels(real: Real) -> None:
    """linux_banner read from memory names the release the kernel reports."""
    system = discover(real.root, source_spec(real.name))
    try:
        banner = preflight.banner_in_memory(real.root, system)
    finally:
        system.close()
    assert banner is not None and banner.startswith(f"Linux version {real.info['OSRELEASE']} (")
