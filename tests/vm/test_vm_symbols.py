"""Dumps that carry their own symbols: Debian's 6.1 and 6.12 guests dump themselves, and on
the host Volatility lists their processes and modules with no debug package, no -s and no
dwarf2json (the ISF comes from the BTF and kallsyms kcore kept in the dump), drgn resolves
symbols from the kept kallsyms, and `kcore verify` says the symbols match the dump."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO, run_kcore, shared_cache, volatility_cmd
from tests.vm import qemu_vm
from tests.vm.guests import Guest, Pool

# ps's view of the guest before and after its dump: PID and the task's comm
_PS = ('for d in /proc/[0-9]*; do printf "%s\\t" "${d#/proc/}"; '
       'cat "$d/comm" 2>/dev/null || echo; done\n')


@dataclass
class SelfDump:
    """A guest's dump of itself (elf, and lime with its sidecar), and what ps showed."""

    guest: Guest
    elf: Path
    lime: Path
    before: dict[int, str]
    after: dict[int, str]
    modules: list[str]
    kallsyms: dict[str, int]


def _ps(text: str) -> dict[int, str]:
    out = {}
    for line in text.splitlines():
        pid, _, comm = line.partition("\t")
        if pid.isdigit() and comm:
            out[int(pid)] = comm
    return out


def same_task(vol_comm: str | None, ps_comm: str) -> bool:
    """Whether Volatility's COMM (task_struct's comm, at most 15 characters) names the task
    ps showed: /proc/PID/comm adds a workqueue worker's queue ("kworker/0:1-events" on 6.1,
    "kworker/R-kvfree_rcu_reclaim" on 6.12, whose comm is "kworker/R-kvfre")."""
    if vol_comm is None:
        return False
    return vol_comm == ps_comm[:15] or (ps_comm.startswith("kworker/")
                                        and ps_comm.startswith(vol_comm))


def self_dump(pool: Pool, name: str) -> SelfDump:
    """The guest `name` runs ps, dumps itself (elf), runs ps again; then on the host QEMU's
    core of it becomes a LiME dump whose sidecar comes from the guest's captured root (a
    saved root's files: its BTF and kallsyms)."""
    guest = pool.get(name)
    vm = guest.vm
    elf, lime = vm.share / "self.elf", vm.share / "self.lime"
    r = vm.run(f"echo $$ $PPID\n{_PS}echo ==\n"
               f'"$KCORE_PY" -m kcore dump -q --no-digest -o {elf} || exit 1\n'
               f"{_PS}echo ==\n"
               "cat /proc/modules; echo ==; cat /proc/kallsyms\n", timeout=1800).check()
    before, after, modules, syms = r.stdout.split("==\n")
    # the command's own shell and its timeout wrapper: gone when QEMU's core is taken
    own, _, before = before.partition("\n")
    for pid in own.split():
        before = "\n".join(line for line in before.splitlines()
                           if line.split("\t")[0] != pid)
    host_dumps(guest, lime)
    kallsyms = {}
    for line in syms.splitlines():
        parts = line.split()
        if len(parts) == 3:
            kallsyms.setdefault(parts[2], int(parts[0], 16))
    return SelfDump(guest, elf, lime, _ps(before), _ps(after),
                    [line.split()[0] for line in modules.splitlines() if line.strip()],
                    kallsyms)


def host_dumps(guest: Guest, *outputs: Path) -> None:
    """QEMU's core of the paused guest made, on the host, into dumps (the format is each
    output's suffix: elf with the vmalloc and module areas' pages, where isf_walk reads the
    modules' list by virtual address (arm64 6.12 loads modules in the vmalloc area, within 2
    GiB of the kernel image); lime with its sidecar) whose symbols come from the guest's captured
    root (a saved root's files: its BTF and kallsyms)."""
    vm = guest.vm
    core = vm.share / "qemu.core"
    try:
        with vm.paused():
            vm.dump_guest_memory(core)
        for out in outputs:
            r = run_kcore("dump", "-q", "--no-digest", "--root", str(guest.root), "--source",
                          f"elf:{core}", "--format", out.suffix[1:], "-o", str(out),
                          *(["--vmalloc", "--modules"] if out.suffix == ".elf" else []),
                          text=True)
            assert r.returncode == 0, r.stderr
    finally:
        core.unlink(missing_ok=True)


def arm64_capture_dump(pool: Pool, name: str) -> SelfDump:
    """An arm64 guest's capture dumped on the host: the guest (busybox, no Python) runs ps
    before and after QEMU's core of it is taken; its root (captured at boot by
    guest_capture.sh: BTF of the kernel and modules, kallsyms, modules) gives the symbols."""
    reason = qemu_vm.unavailable_reason("arm64")
    if reason:
        pytest.skip(f"QEMU cannot run arm64 guests here: {reason}")
    guest = pool.get(name)
    vm = guest.vm
    assert (guest.root / "sys/kernel/btf/vmlinux").exists(), "the capture lacks the BTF"
    elf, lime = vm.share / "self.elf", vm.share / "self.lime"
    # the command's shell is gone when QEMU's core is taken (busybox's timeout runs it in
    # its own process: the parent is the agent, PID 1)
    before = vm.run(f"echo $$\n{_PS}echo ==\ncat /proc/modules\n").check().stdout
    before, _, modules = before.partition("==\n")
    own, _, before = before.partition("\n")
    before = "\n".join(line for line in before.splitlines()
                       if line.split("\t")[0] not in own.split())
    host_dumps(guest, elf, lime)
    after = vm.run(_PS).check().stdout
    kallsyms = {}
    for line in (guest.root / "proc/kallsyms").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            kallsyms.setdefault(parts[2], int(parts[0], 16))
    return SelfDump(guest, elf, lime, _ps(before), _ps(after),
                    [line.split()[0] for line in modules.splitlines() if line.strip()],
                    kallsyms)


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.guest(name))
                                        for name in ("kaslr", "kaslr-6.12", "arm64-6.12")])
def dumped(request: pytest.FixtureRequest, vm_pool: Pool) -> SelfDump:
    """Each guest's dump of itself (Debian 12's 6.1, then bookworm-backports' 6.12), and an
    arm64 guest's capture dumped on the host (6.12: Debian 12's arm64 6.1 has no data symbols
    in kallsyms, CONFIG_KALLSYMS_ALL being off, so no init_task for an ISF to give)."""
    if request.param.startswith("arm64"):
        return arm64_capture_dump(vm_pool, request.param)
    return self_dump(vm_pool, request.param)


# Volatility's symbol index, built once (slow), then reused; this file's own: another vol
# updating a shared index without kcore's ISF folder drops the entry kcore's stacker added
# (its guests' tests may run on both xdist workers: shared_cache lets one vol at a time in)
VOL_CACHE = "vol-cache-symbols"


@pytest.fixture(scope="module", autouse=True)
def _drop_built_isfs() -> Iterator[None]:
    """The ISFs kcore's stacker builds into Volatility's cache (one per guest boot) go after."""
    yield
    with shared_cache(VOL_CACHE) as cache:
        shutil.rmtree(cache / "kcore-isf", ignore_errors=True)


def vol(tmp_path: Path, image: Path, *args: str) -> subprocess.CompletedProcess:
    """`vol -p <kcore's plugin folder> -f image ARGS`: no -s anywhere, no ISF in the cache
    but those kcore's stacker builds."""
    from kcore.integrations.volatility import plugin_dir

    env = dict(os.environ, HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with shared_cache(VOL_CACHE) as cache:
        return subprocess.run([*volatility_cmd(), "-q", "--cache-path", str(cache),
                               "-p", plugin_dir(), "-f", str(image), *args],
                              capture_output=True, text=True, timeout=900, env=env)


def rows(r: subprocess.CompletedProcess, pid_col: int, name_col: int) -> dict[int, str]:
    """A Volatility table's (PID -> name) rows."""
    out = {}
    for line in r.stdout.splitlines():
        cols = line.split("\t")
        if len(cols) > max(pid_col, name_col) and cols[pid_col].isdigit():
            out[int(cols[pid_col])] = cols[name_col]
    return out


def volatility_reads(dumped: SelfDump) -> None:
    """Skip where Volatility cannot translate the dump's addresses: its releases (2.28.2
    today) have Intel translation layers only (layers/intel.py; the Linux stackers build
    Intel ones), so no arm64 image stacks, with or without symbols; AArch64 support is
    volatility3's unmerged pull request #1088. The arm64 ISF is checked by
    test_symbols_isf_and_verify's walk of the task and module lists instead."""
    if dumped.guest.vm.arch.deb_arch == "amd64":
        return
    import importlib.util

    layers = pytest.importorskip("volatility3.framework.layers")
    if not any(importlib.util.find_spec(f"{layers.__name__}.{m}") for m in ("arm", "aarch64")):
        from volatility3.framework.constants import PACKAGE_VERSION

        pytest.skip(f"Volatility 3 {PACKAGE_VERSION} has no AArch64 translation layer")


class ElfMemory:
    """A dump's kernel memory by virtual address, from its PT_LOADs (pyelftools' view)."""

    def __init__(self, path: Path) -> None:
        from elftools.elf.elffile import ELFFile

        self.f = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.loads = [(s["p_vaddr"], s["p_filesz"], s["p_memsz"], s["p_offset"])
                      for s in ELFFile(self.f).iter_segments("PT_LOAD")]

    def read(self, vaddr: int, size: int) -> bytes:
        """size bytes at vaddr (all in one PT_LOAD; past its file bytes, zeros)."""
        for va, filesz, memsz, off in self.loads:
            if va <= vaddr and vaddr + size <= va + memsz:
                data = os.pread(self.f.fileno(), max(0, min(size, va + filesz - vaddr)),
                                off + vaddr - va)
                return data + bytes(size - len(data))
        raise AssertionError(f"{vaddr:#x} is in no PT_LOAD of the dump")

    def u64(self, vaddr: int) -> int:
        """The 64-bit word at vaddr."""
        return int.from_bytes(self.read(vaddr, 8), "little")

    def close(self) -> None:
        """Close the file."""
        self.f.close()


def isf_walk(isf: dict, dump: Path, kallsyms: dict[str, int], modules: bool
             ) -> tuple[dict[int, str], set[str]]:
    """The tasks (PID -> comm, init_task's list as pslist walks it) and, if asked (the dump
    holds the module area), the module names (the `modules` list) of a dump, read with the
    offsets of the ISF built from its BTF."""
    def off(struct: str, member: str) -> int:
        return isf["user_types"][struct]["fields"][member]["offset"]

    mem = ElfMemory(dump)
    try:
        tasks = {}
        head = kallsyms["init_task"] + off("task_struct", "tasks")
        at = mem.u64(head)
        while at != head and len(tasks) < 100000:
            task = at - off("task_struct", "tasks")
            pid = int.from_bytes(mem.read(task + off("task_struct", "pid"), 4), "little")
            tasks[pid] = mem.read(task + off("task_struct", "comm"), 16).split(b"\0")[0].decode()
            at = mem.u64(at)
        names = set()
        head = kallsyms["modules"]
        at = mem.u64(head) if modules else head
        while at != head and len(names) < 10000:
            name = mem.read(at - off("module", "list") + off("module", "name"), 56)
            names.add(name.split(b"\0")[0].decode())
            at = mem.u64(at)
    finally:
        mem.close()
    return tasks, names


def assert_tasks(dumped: SelfDump, tasks: dict[int, str]) -> None:
    """tasks (read from the dump) hold every PID and name ps showed both before and after
    the dump; those that started or ended meanwhile aside, counted."""
    steady = {pid: name for pid, name in dumped.before.items()
              if dumped.after.get(pid) == name}
    missed = {pid: (name, tasks.get(pid)) for pid, name in steady.items()
              if not same_task(tasks.get(pid), name)}
    assert not missed, missed
    changing = set(dumped.before) ^ set(dumped.after)
    extra = set(tasks) - set(steady)
    assert len(extra) <= len(changing) + 4, (extra, changing)  # the dump's own processes
    assert len(steady) > 20 and same_task(tasks[1], steady[1])


@pytest.mark.parametrize("fmt", ["elf", "lime"])
def test_pslist_with_no_symbols_given(dumped: SelfDump, fmt: str, tmp_path: Path) -> None:
    """linux.pslist over the guest's own dump (elf: symbols in its notes; lime: in its
    sidecar) lists the PIDs and names ps showed, with nothing but the dump: processes started
    or ended while it dumped aside (the dumping python among them), counted."""
    pytest.importorskip("pakunoda", reason="pakunoda builds the ISF (kcore[volatility])")
    volatility_reads(dumped)
    image = dumped.elf if fmt == "elf" else dumped.lime
    if fmt == "lime":
        assert image.with_name(image.name + ".symbols").exists()
    r = vol(tmp_path, image, "linux.pslist")
    tasks = rows(r, 1, 4)
    assert tasks, r.stdout[-2000:] + r.stderr[-3000:]
    assert_tasks(dumped, tasks)


def test_lsmod_with_no_symbols_given(dumped: SelfDump, tmp_path: Path) -> None:
    """linux.lsmod over the guest's own elf dump lists the modules of /proc/modules."""
    pytest.importorskip("pakunoda", reason="pakunoda builds the ISF (kcore[volatility])")
    volatility_reads(dumped)
    r = vol(tmp_path, dumped.elf, "linux.lsmod")
    listed = {cols[1] for cols in (line.split("\t") for line in r.stdout.splitlines())
              if len(cols) > 2 and cols[0].startswith("0x")}
    assert listed == set(dumped.modules), (dumped.modules, r.stdout[-2000:], r.stderr[-2000:])


def test_symbols_isf_and_verify(dumped: SelfDump, tmp_path: Path) -> None:
    """`kcore symbols` writes the ISF of the kept BTF and kallsyms: init_task at its
    link-time address (kallsyms' minus KERNELOFFSET), and its structures' offsets walk the
    dump's tasks and modules as ps and /proc/modules showed them; `kcore verify` reports the
    LiME dump's symbols (its sidecar) and that they match the kernel's VMCOREINFO."""
    pytest.importorskip("pakunoda", reason="pakunoda builds the ISF (kcore[symbols])")
    r = run_kcore("symbols", str(dumped.elf), "-o", str(tmp_path), "--json", text=True)
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["warnings"] == []
    offset = int(made["kernel_offset"], 16)
    assert offset != 0  # KASLR guests
    import gzip

    isf = json.loads(gzip.decompress(Path(made["isf"]).read_bytes()))
    assert isf["symbols"]["init_task"]["address"] == dumped.kallsyms["init_task"] - offset
    assert isf["user_types"]["task_struct"]["fields"]["pid"]["offset"] > 0
    assert made["release"] == dumped.guest.vm.kernel.release
    # the ISF's offsets read the dump's task list as ps showed it, its modules' list as
    # /proc/modules (Volatility's pslist and lsmod do the same where it can stack the image;
    # the amd64 guests' own dumps leave the module area out: Volatility's lsmod reads it there
    # through the page tables, the arm64 host dump holds it for this walk)
    arm64 = dumped.guest.vm.arch.deb_arch != "amd64"
    tasks, modules = isf_walk(isf, dumped.elf, dumped.kallsyms, modules=arm64)
    assert_tasks(dumped, tasks)
    if arm64:
        assert modules == set(dumped.modules)
    r = run_kcore("verify", str(dumped.lime), "--json", text=True)
    assert r.returncode == 0, r.stderr
    sym = json.loads(r.stdout)["symbols"]
    assert sym["present"] and sym["match"], sym
    assert sym["release"] == dumped.guest.vm.kernel.release
    assert "sys/kernel/btf/vmlinux" in sym["files"]


def test_drgn_resolves_symbols_from_the_dump(dumped: SelfDump) -> None:
    """`kcore drgn DUMP` loads the dump's own kallsyms: symbols resolve at their run-time
    addresses with no debug info, and memory reads at them."""
    pytest.importorskip("drgn", reason="drgn is not installed (kcore[drgn])")
    code = ("s = prog.symbol('init_task'); print(hex(s.address)); "
            "print(prog.symbol(s.address + 8).name); "
            "print(prog.read(prog.symbol('linux_banner').address, 14).decode())")
    r = subprocess.run([sys.executable, "-m", "kcore", "drgn", "-q", str(dumped.elf), "--",
                        "-e", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split()
    assert int(lines[0], 16) == dumped.kallsyms["init_task"]
    assert lines[1] == "init_task"
    assert r.stdout.rstrip().endswith("Linux version")


def test_symbols_warns_without_data_symbols(dumped: SelfDump, tmp_path: Path) -> None:
    """A kernel built without CONFIG_KALLSYMS_ALL (Debian 12's arm64 6.1) lists only text
    symbols in kallsyms: `kcore symbols` still writes the ISF (types from the BTF) and says
    that init_task is missing. The arm64 guest's files, its kallsyms cut to text symbols."""
    pytest.importorskip("pakunoda", reason="pakunoda builds the ISF (kcore[symbols])")
    if dumped.guest.vm.arch.deb_arch == "amd64":
        pytest.skip("once, on the arm64 guest's capture")
    root = tmp_path / "root"
    shutil.copytree(dumped.guest.root, root)
    kallsyms = root / "proc/kallsyms"
    lines = kallsyms.read_text().splitlines(keepends=True)
    kallsyms.write_text("".join(x for x in lines if x.split()[1] in "tT"))
    r = run_kcore("symbols", "--root", str(root), "--source", f"raw:{os.devnull}", "-o",
                  str(tmp_path / "isf"), "--json", text=True)
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["user_types"] > 1000 and made["symbols"] > 1000
    assert len(made["warnings"]) == 1 and "init_task" in made["warnings"][0]
