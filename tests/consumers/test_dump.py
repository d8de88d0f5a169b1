"""kcore dump's outputs opened by the tools people use: drgn, gdb, makedumpfile, Volatility 3.

The dumps under test carry the kernel's symbols (kcore keeps them by default: KCORE notes in
the ELF, a .symbols sidecar beside the LiME), and test_the_dumps_carry_symbols checks that
they do, so every consumer test here runs on a dump with symbols; gdb, drgn and makedumpfile
also give the same answers on a dump made with --no-symbols (issue 22: readers skip the notes).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.commands.test_dump import dump
from tests.helpers import (
    FIXTURE_NAMES,
    KCORE_NOTE,
    debug_vmlinux,
    elf_loads,
    elf_notes,
    kept_symbol_files,
    scratch_dir,
    shared_fixture,
    volatility_cmd,
)

pytestmark = pytest.mark.consumers


def banner_address(name: str) -> int:
    """linux_banner's address in the capture's /proc/kallsyms."""
    for line in (shared_fixture(name) / "root" / "proc" / "kallsyms").open():
        addr, _kind, sym = line.split()[:3]
        if sym == "linux_banner":
            return int(addr, 16)
    raise AssertionError("no linux_banner in kallsyms")


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def dumps(request):
    name = request.param
    folder = scratch_dir(request, "consumers")
    dump(name, folder / "mem.elf")
    dump(name, folder / "mem.lime", "--format", "lime")
    dump(name, folder / "d31.elf", "-d", "31")  # 600 PT_LOADs, most without file bytes
    dump(name, folder / "bare.elf", "--no-symbols")
    return name, folder


# what every capture's root holds and so every dump keeps (the fixtures have no BTF: the
# guests' dumps of tests/vm/test_vm_symbols.py carry it, and their consumers' tests with them)
KEPT = {"proc/kallsyms", "proc/modules"}


def test_the_dumps_carry_symbols(dumps):
    """The ELF dumps the consumers open hold KCORE notes (kallsyms, modules), the LiME dump
    its sidecar; the --no-symbols one none."""
    _name, folder = dumps
    for file in ("mem.elf", "d31.elf", "mem.lime.symbols"):
        assert KEPT <= kept_symbol_files(folder / file), file
    assert kept_symbol_files(folder / "bare.elf") == set()
    assert not (folder / "mem.lime.symbols").with_name("bare.elf.symbols").exists()


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    return path


def test_drgn_reads_linux_banner(dumps):
    drgn = pytest.importorskip("drgn", reason="drgn is not installed (.ci/run installs it)")
    name, folder = dumps
    prog = drgn.Program()
    prog.set_core_dump(str(folder / "mem.elf"))
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL  # it found VMCOREINFO
    assert prog.read(banner_address(name), 64).startswith(b"Linux version 6.1")
    bare = drgn.Program()  # the same without the kept symbols' notes
    bare.set_core_dump(str(folder / "bare.elf"))
    assert bare.read(banner_address(name), 4096) == prog.read(banner_address(name), 4096)
    # Zero runs left out of the file read as zeros (zero-fill PT_LOADs), not as faults.
    from elftools.elf.elffile import ELFFile

    with open(folder / "mem.elf", "rb") as f:
        gaps = [(s["p_vaddr"], s["p_paddr"], s["p_memsz"]) for s in ELFFile(f).iter_segments()
                if s["p_type"] == "PT_LOAD" and s["p_filesz"] == 0]
    assert gaps
    for vaddr, paddr, size in gaps:
        assert prog.read(vaddr + size - 4096, 4096) == bytes(4096)
        assert prog.read(paddr, 4096, True) == bytes(4096)


def test_gdb_reads_linux_banner(dumps):
    """gdb reads the banner and lists the core's sections; the same with --no-symbols."""
    gdb = need("gdb")
    name, folder = dumps
    out = {}
    for file in ("mem.elf", "bare.elf"):
        r = subprocess.run([gdb, "-batch", "-nx", "-c", str(folder / file), "-ex",
                            f"x/s {banner_address(name):#x}", "-ex", "info files"],
                           capture_output=True, text=True, timeout=120)
        out[file] = (r.stdout + r.stderr).replace(str(folder / file), "CORE")
    assert '"Linux version 6.1' in out["mem.elf"], out["mem.elf"]
    assert " is load" in out["mem.elf"]  # info files' sections of the core
    assert out["mem.elf"] == out["bare.elf"]


def test_makedumpfile_accepts_it(dumps, tmp_path):
    """makedumpfile -E -d 31 filters the dump: the same pages and kernel notes kept with
    symbols as with --no-symbols (it copies the KCORE notes along); --dump-dmesg prints the
    same kernel log from both."""
    makedumpfile = need("makedumpfile")
    _name, folder = dumps
    filtered, logs = {}, {}
    for file in ("mem.elf", "bare.elf"):
        out = tmp_path / f"filtered-{file}"
        r = subprocess.run([makedumpfile, "-E", "-d", "31", str(folder / file), str(out)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "makedumpfile Completed" in r.stdout + r.stderr
        notes = elf_notes(out)
        filtered[file] = (elf_loads(out), [n for n in notes if n[:2] != KCORE_NOTE],
                          kept_symbol_files(out))
        out.unlink()
        log = tmp_path / f"dmesg-{file}.txt"
        r = subprocess.run([makedumpfile, "--dump-dmesg", str(folder / file), str(log)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        logs[file] = log.read_text()
    assert filtered["mem.elf"][:2] == filtered["bare.elf"][:2]
    assert len(filtered["mem.elf"][0]) > 10
    assert KEPT <= filtered["mem.elf"][2] and not filtered["bare.elf"][2]
    assert logs["mem.elf"].startswith("[    0.000000] Linux version 6.1.0-56-amd64")
    assert logs["mem.elf"] == logs["bare.elf"]


@pytest.mark.parametrize("fmt", ["lime", "elf"])
def test_volatility_finds_the_banner(dumps, fmt, tmp_path):
    cmd = volatility_cmd()
    _name, folder = dumps
    r = subprocess.run([*cmd, "-q", "--cache-path", str(tmp_path), "-f",
                        str(folder / f"mem.{fmt}"), "banners.Banners"],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path)))
    assert "Linux version 6.1.0-56-amd64" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]



@pytest.fixture(scope="module")
def vmlinux():
    return debug_vmlinux()


@pytest.mark.parametrize("file", ("mem.elf", "d31.elf"))
def test_crash_opens_it(dumps, vmlinux, file):
    """crash with the kernel's debug info: release, command line (as /proc/cmdline), log, tasks."""
    crash = need("crash")
    name, folder = dumps
    cmdline = (shared_fixture(name) / "root" / "proc" / "cmdline").read_text().strip()
    r = subprocess.run([crash, "-s", str(vmlinux), str(folder / file)],
                       input="sys\np saved_command_line\nlog\nps\nquit\n",
                       capture_output=True, text=True, timeout=600)
    out = r.stdout
    assert "RELEASE: 6.1.0-56-amd64" in out, out[-3000:] + r.stderr[-3000:]
    assert f'"{cmdline}"' in out, out[-3000:]
    assert "Linux version 6.1.0-56-amd64" in out  # the kernel log, from its ring buffer
    assert "swapper/0" in out  # the task list
