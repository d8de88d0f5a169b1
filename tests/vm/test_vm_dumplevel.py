"""The live KASLR guest dumps itself with -d 31 from /proc/kcore: crash, drgn, makedumpfile."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import pagesets
from tests.helpers import debug_vmlinux, scratch_dir
from tests.vm.guests import Guest, Pool
from tests.vm.qemu_vm import phdrs_after_ehdr


@dataclass
class LevelDump:
    """kcore's -d 31 dumps of the live guest and makedumpfile's of QEMU's core right after."""

    guest: Guest
    elf: Path
    summary: dict
    kdump: Path | None  # --format kdump --compress none, where this kcore has it
    md_elf_size: int  # makedumpfile -E -d 31 of QEMU's core
    md_kdump_size: int  # makedumpfile -d 31


@pytest.fixture(scope="module")
def level_dump(vm_pool: Pool, request: pytest.FixtureRequest) -> LevelDump:
    if shutil.which("makedumpfile") is None:
        pytest.skip("makedumpfile is not installed (.ci/run installs it)")
    guest = vm_pool.get("kaslr")
    vm = guest.vm
    out = vm.share / "d31.elf"
    # --no-text: like QEMU's core, the dump holds the kernel image once (in its RAM frames);
    # crash and drgn find the kernel through VMCOREINFO
    r = vm.kcore("dump", "-d", "31", "--no-text", "--source", "kcore:/proc/kcore", "--quiet",
                 "--json", "--no-digest", "-o", str(out), timeout=600).check()
    summary = json.loads(r.stdout)
    from kcore.formats import FORMATS

    kdump = None
    if "kdump" in FORMATS:
        kdump = vm.share / "d31.kdump"
        vm.kcore("dump", "-d", "31", "--format", "kdump", "--compress", "none", "--source",
                 "kcore:/proc/kcore", "--quiet", "--no-digest", "-o", str(kdump),
                 timeout=600).check()
    folder = scratch_dir(request, "d31")
    core = folder / "qemu.elf"
    with vm.paused():
        vm.dump_guest_memory(core)
    phdrs_after_ehdr(core)
    md = folder / "md.elf"
    pagesets.makedumpfile(["-E", "-d", "31"], core, md)
    md_elf = md.stat().st_size
    md.unlink()
    pagesets.makedumpfile(["-d", "31"], core, md)
    md_kdump = md.stat().st_size
    md.unlink()
    core.unlink()
    return LevelDump(guest, out, summary, kdump, md_elf, md_kdump)


def test_d31_of_the_live_guest_is_small(kaslr_guest: Guest, level_dump: LevelDump) -> None:
    """Free, cache and user pages are left out; the size is makedumpfile's."""
    level = level_dump.summary["dump_level"]
    assert level["level"] == 31
    assert level["pages_excluded"]["free"] > 10000
    assert level["pages_kept"] < level["pages_in_ram"] // 2
    size = level_dump.elf.stat().st_size
    assert size <= 1.1 * level_dump.md_kdump_size, (size, level_dump.md_kdump_size)
    assert size <= 1.1 * level_dump.md_elf_size, (size, level_dump.md_elf_size)
    assert level_dump.summary["pages_zero_filled"] == 0


def _dump_file(level_dump: LevelDump, fmt: str) -> Path:
    if fmt == "elf":
        return level_dump.elf
    if level_dump.kdump is None:
        pytest.skip("no kdump format in this kcore")
    return level_dump.kdump


def test_kdump_d31_is_makedumpfiles_size(kaslr_guest: Guest, level_dump: LevelDump) -> None:
    """--format kdump --compress none -d 31: within 1.1x of makedumpfile -d 31 (uncompressed)."""
    size = _dump_file(level_dump, "kdump").stat().st_size
    assert size <= 1.1 * level_dump.md_kdump_size, (size, level_dump.md_kdump_size)


@pytest.mark.parametrize("fmt", ["elf", "kdump"])
def test_crash_runs_log_and_ps_on_it(kaslr_guest: Guest, level_dump: LevelDump, fmt: str) -> None:
    crash = shutil.which("crash")
    if crash is None:
        pytest.skip("crash is not installed (.ci/run installs it)")
    release = kaslr_guest.vm.kernel.release
    vmlinux = debug_vmlinux()
    if release not in vmlinux.name:
        pytest.skip(f"the debug vmlinux is {vmlinux.name}, the guest runs {release}")
    r = subprocess.run([crash, "-s", str(vmlinux), str(_dump_file(level_dump, fmt))],
                       input="sys\nlog\nps\nquit\n", capture_output=True, text=True, timeout=600)
    assert f"RELEASE: {release}" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"Linux version {release}" in r.stdout  # log: the kernel's ring buffer
    # ps ran: crash 8.0.2 finds one task (TASKS: 1) in these cores, dense ones too; drgn
    # walks the whole list below
    assert "swapper/0" in r.stdout


def _drgn_program(guest: Guest, level_dump: LevelDump, fmt: str):
    """drgn on one of the dumps with the guest kernel's debug info, or skip."""
    drgn = pytest.importorskip("drgn", reason="drgn is not installed (.ci/run installs it)")
    release = guest.vm.kernel.release
    vmlinux = debug_vmlinux()
    if release not in vmlinux.name:
        pytest.skip(f"the debug vmlinux is {vmlinux.name}, the guest runs {release}")
    prog = drgn.Program()
    prog.set_core_dump(str(_dump_file(level_dump, fmt)))
    prog.load_debug_info([str(vmlinux)])
    return prog


@pytest.mark.parametrize("fmt", ["elf", "kdump"])
def test_drgn_walks_the_task_list(kaslr_guest: Guest, level_dump: LevelDump, fmt: str) -> None:
    from drgn.helpers.linux.pid import for_each_task

    prog = _drgn_program(kaslr_guest, level_dump, fmt)
    comms = {t.comm.string_().decode() for t in for_each_task(prog)}
    assert "kthreadd" in comms and len(comms) > 10, comms


@pytest.mark.parametrize("fmt", ["elf", "kdump"])
def test_every_task_struct_and_kernel_stack_is_kept(kaslr_guest: Guest, level_dump: LevelDump,
                                                   fmt: str) -> None:
    """-d 31 of a live kernel keeps each task's task_struct and kernel stack (crash reads both
    for every task), those of the dumping process's own threads included."""
    prog = _drgn_program(kaslr_guest, level_dump, fmt)
    import drgn
    from drgn.helpers.linux.pid import for_each_task

    size = drgn.sizeof(prog.type("struct task_struct"))
    thread_size = 16 << 10  # x86-64 THREAD_SIZE, no KASAN (arch/x86/include/asm/page_64_types.h)
    lost, names = [], []
    for task in for_each_task(prog):
        name = f"{task.pid.value_()} {task.comm.string_().decode()}"
        names.append(name)
        for what, addr, n in (("task_struct", task.value_(), size),
                              ("stack", task.stack.value_(), thread_size)):
            try:
                data = prog.read(addr, n)
            except drgn.FaultError:  # kdump: a page -d left out
                lost.append(f"{name}: {what}")
                continue
            if not any(data):  # elf: a zero-fill load where a page was left out
                lost.append(f"{name}: {what} reads as zeros")
    assert any("kcore" in n or "python" in n for n in names), names  # the dumping process
    assert not lost, lost
