"""drgn on the running KASLR guest, its RAM read from the host through QEMU's process (pid:)."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.helpers import debug_vmlinux
from tests.vm.guests import Guest


def ram_spec(guest: Guest) -> str:
    """pid:QEMU:START-END@0: where QEMU maps the guest's RAM file (offset = physical, < 4 GiB)."""
    vm = guest.vm
    for line in open(f"/proc/{vm.proc.pid}/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(vm.ram_path):
            start, end = fields[0].split("-")
            assert int(fields[2], 16) == 0, line  # the whole file, from its start
            return f"pid:{vm.proc.pid}:{start}-{end}@0"
    raise AssertionError(f"QEMU does not map {vm.ram_path}")


def comms(prog) -> set[str]:
    """The comm of every task on init_task.tasks, read now."""
    from drgn.helpers.linux.list import list_for_each_entry

    init = prog["init_task"]
    return {t.comm.string_().decode() for t in
            list_for_each_entry("struct task_struct", init.tasks.address_of_(), "tasks")}


def test_live_drgn_program_sees_a_new_process(kaslr_guest: Guest) -> None:
    """A Program made from the QEMU process's RAM mapping is live: a process started in the
    guest afterwards shows in its task list, and its banner is the guest's."""
    drgn = pytest.importorskip("drgn", reason="drgn is not installed (pip install 'kcore[drgn]')")
    from kcore.integrations.drgn import program

    vm = kaslr_guest.vm
    vmlinux = debug_vmlinux()
    if vm.kernel.release not in vmlinux.name:
        pytest.skip(f"the debug vmlinux is {vmlinux.name}, the guest runs {vm.kernel.release}")
    prog = program(str(kaslr_guest.root), ram_spec(kaslr_guest), symbols=[str(vmlinux)],
                   default_symbols=False)
    assert prog.flags & drgn.ProgramFlags.IS_LIVE
    assert prog["linux_banner"].string_().decode().startswith(
        f"Linux version {vm.kernel.release}")
    before = comms(prog)
    assert "kthreadd" in before
    name = "busybox-" + uuid.uuid4().hex[:7]  # comm: the executable's name (15 chars)
    assert name not in before
    # busybox runs the applet in argv[1] when its own name starts with "busybox"
    vm.run(f"cp /bin/busybox /tmp/{name} && setsid /tmp/{name} sleep 3600 </dev/null "
           f">/dev/null 2>&1 &\n").check()
    deadline = time.monotonic() + 60
    while name not in (now := comms(prog)):
        assert time.monotonic() < deadline, sorted(now - before)
        time.sleep(0.5)
    vm.run(f"pkill -f /tmp/{name}; rm -f /tmp/{name}\n")


def test_kcore_drgn_in_the_guest_on_its_proc_kcore(kaslr_guest: Guest) -> None:
    """`kcore drgn` inside the guest (source auto: its /proc/kcore) is a live Program whose
    linux_banner reads as the kernel's, at the address the guest's kallsyms gives."""
    pytest.importorskip("drgn", reason="drgn is not installed (pip install 'kcore[drgn]')")
    vm = kaslr_guest.vm
    banner = next(int(line.split()[0], 16) for line in (kaslr_guest.root / "proc/kallsyms").open()
                  if line.split()[2] == "linux_banner")
    code = (f"print(bool(prog.flags & drgn.ProgramFlags.IS_LIVE)); "
            f'print(prog.read({banner:#x}, 64).split(b" (")[0].decode())')  # no ' (quoted)
    # no debug info here: loading 0.3 GB of DWARF under TCG would take minutes
    r = vm.kcore("drgn", "-q", "--no-default-symbols", "--", "-e", code).check()
    assert r.stdout.splitlines() == ["True", f"Linux version {vm.kernel.release}"], r.stderr
