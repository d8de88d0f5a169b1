"""drgn reading the fixtures' kernels through kcore.integrations.drgn (no dump written),
checked against the real /proc/kcore's bytes and crash's `ps` on kcore's ELF dump."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.commands.test_dump import dump, expected, expected_bytes, source_spec
from tests.helpers import FIXTURE_NAMES, REPO, debug_vmlinux, pid1_comm, run_kcore, shared_fixture

pytestmark = pytest.mark.consumers
drgn = pytest.importorskip("drgn", reason="drgn is not installed (pip install 'kcore[drgn]')")

# crash's `list ... -s task_struct.pid,comm`: an address line, then "  pid = N," "  comm = "...","
LIST_ADDR = re.compile(r"^([0-9a-f]{16})$")
LIST_FIELD = re.compile(r'^\s+(pid|comm) = (?:(\d+),|"(.*)",)$')


@pytest.fixture(scope="module")
def vmlinux():
    return debug_vmlinux()


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def prog(request, vmlinux):
    from kcore.integrations.drgn import program

    name = request.param
    p = program(str(shared_fixture(name) / "root"), source_spec(name), symbols=[str(vmlinux)],
                default_symbols=False)
    return name, p


def tasks(prog) -> tuple[list[tuple[int, int, str]], int]:
    """(pid, task address, comm) of init_task and each task on init_task.tasks; all threads."""
    from drgn.helpers.linux.list import list_for_each_entry

    init = prog["init_task"]
    leaders = [(init.pid.value_(), init.address_of_().value_(), init.comm.string_().decode())]
    threads = 0
    for t in list_for_each_entry("struct task_struct", init.tasks.address_of_(), "tasks"):
        leaders.append((t.pid.value_(), t.value_(), t.comm.string_().decode()))
        threads += sum(1 for _ in list_for_each_entry(
            "struct task_struct", t.signal.thread_head.address_of_(), "thread_node"))
    return leaders, threads


def crash_tasks(name: str, vmlinux, tmp_path) -> tuple[list[tuple[int, int, str]], int]:
    """crash on kcore's ELF dump of the capture: init_task.tasks walked, and nr_threads.

    (crash 8.0.2's `ps` lists only swapper/0 on these 6.1.192 kernels, on QEMU's own vmcore
    too: its task table stops at the idle task; its `list` command walks the same list.)
    """
    crash = shutil.which("crash")
    if crash is None:
        pytest.skip("crash is not installed (.ci/run installs it)")
    elf = tmp_path / "mem.elf"
    dump(name, elf)
    r = subprocess.run([crash, "-s", str(vmlinux), str(elf)],
                       input="p nr_threads\nlist task_struct.tasks -s task_struct.pid,comm "
                       "-h init_task\nquit\n", capture_output=True, text=True, timeout=600)
    nr = re.search(r"^nr_threads = \$\d+ = (\d+)$", r.stdout, re.M)
    assert nr, r.stdout[-3000:] + r.stderr[-3000:]
    out: list[tuple[int, int, str]] = []
    addr = pid = None
    for line in r.stdout.splitlines():
        if m := LIST_ADDR.match(line):
            addr = int(m.group(1), 16)
        elif (m := LIST_FIELD.match(line)) and addr is not None:
            if m.group(1) == "pid":
                pid = int(m.group(2))
            else:
                out.append((pid, addr, m.group(3).split("\\000")[0]))
    return out, int(nr.group(1))


def test_banner_and_kernel_text_as_the_real_kcore(prog):
    """linux_banner by name; 2 MiB of text and the first RAM range read as the real kcore's."""
    name, p = prog
    assert p.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    assert not p.flags & drgn.ProgramFlags.IS_LIVE  # a file, not a running kernel
    assert p["linux_banner"].string_().startswith(b"Linux version 6.1.0-56-amd64")
    loads = [ph for ph in expected(name)["phdrs"] if ph["type"] == "PT_LOAD"]
    text = loads[0]  # the TEXT segment comes first
    assert p.read(text["p_vaddr"], 2 << 20) == expected_bytes(name, "kcore-text-2M.bin")
    ram0 = next(ph for ph in loads if ph["p_paddr"] == 0x1000)
    real = expected_bytes(name, "kcore-ram0.bin")
    assert p.read(ram0["p_vaddr"], len(real)) == real
    assert p.read(0x1000, len(real), True) == real  # the same bytes as physical memory


def test_unmapped_addresses_fault(prog):
    """Outside the kclist (virtual) or System RAM (physical): drgn.FaultError, as drgn -k."""
    _name, p = prog
    with pytest.raises(drgn.FaultError):
        p.read(0xFFFF000000000000, 8)  # below the direct map: no kcore segment
    with pytest.raises(drgn.FaultError):
        p.read(0xA0000, 8, True)  # the VGA hole, not System RAM
    with pytest.raises(drgn.FaultError):
        p.read(0x40000000, 8, True)  # above the 512 MiB of RAM


def test_task_list_is_crash_s(prog, vmlinux, tmp_path):
    """init_task.tasks walked by drgn through kcore = walked by crash on kcore's ELF dump;
    the threads counted on each task's signal->thread_head = the kernel's nr_threads."""
    name, p = prog
    leaders, threads = tasks(p)
    assert (1, leaders[1][1], pid1_comm(name)) == leaders[1]
    want, nr_threads = crash_tasks(name, vmlinux, tmp_path)
    assert leaders == want
    assert threads == nr_threads


def test_kcore_drgn_command_runs_code(vmlinux):
    """`kcore drgn ... -- -e CODE` runs the code with `prog` bound to the fixture's kernel."""
    name = FIXTURE_NAMES[1]
    r = run_kcore("drgn", "--root", str(shared_fixture(name) / "root"), "--source",
                  source_spec(name), "-s", str(vmlinux), "--no-default-symbols", "-q", "--",
                  "-e", "print(prog['init_task'].comm.string_().decode(), prog.flags)")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().split() == ["swapper/0", "ProgramFlags.IS_LINUX_KERNEL"]


def test_kcore_drgn_without_drgn_says_how_to_install():
    """Without drgn: one line naming the extra to install, exit 1, no traceback."""
    code = ("import sys; sys.modules['drgn'] = None; "  # `import drgn` fails as if not installed
            "from kcore.cli import main; sys.exit(main(sys.argv[1:]))")
    name = FIXTURE_NAMES[0]
    r = subprocess.run([sys.executable, "-c", code, "drgn", "--root",
                        str(shared_fixture(name) / "root"), "--source", source_spec(name)],
                       capture_output=True, text=True, cwd=str(REPO))
    assert r.returncode == 1, r.stderr
    assert r.stderr == ("kcore: error: drgn is not installed: pip install 'kcore[drgn]' "
                        "(or pip install drgn)\n")


def test_kcore_drgn_interactive_shell(vmlinux, tmp_path):
    """On a terminal, `kcore drgn` is drgn's interactive shell with `prog` set."""
    import os
    import pty
    import select
    import time

    name = FIXTURE_NAMES[0]
    primary, secondary = pty.openpty()
    env = dict(os.environ, HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path),
               PYTHONPATH=str(REPO), TERM="dumb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kcore", "drgn", "--root", str(shared_fixture(name) / "root"),
         "--source", source_spec(name), "-s", str(vmlinux), "--no-default-symbols", "-q"],
        stdin=secondary, stdout=secondary, stderr=secondary, env=env, close_fds=True)
    os.close(secondary)
    os.write(primary, b"print('comm:', prog['init_task'].comm.string_().decode())\nexit()\n")
    out = b""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if select.select([primary], [], [], 0.5)[0]:
            try:
                out += os.read(primary, 65536)
            except OSError:
                break
    proc.wait(timeout=30)
    os.close(primary)
    assert b"comm: swapper/0" in out, out[-2000:]
    assert b">>> " in out  # drgn's prompt


def test_kdump_source_gives_the_same_tasks(vmlinux, tmp_path):
    """drgn through kcore on kcore's kdump-compressed dump of a capture lists the tasks that
    drgn through kcore lists on the capture's own memory."""
    from kcore.formats import FORMATS
    from kcore.integrations.drgn import program

    if "kdump" not in FORMATS:
        pytest.skip("kcore has no kdump format here")
    name = FIXTURE_NAMES[0]
    root = str(shared_fixture(name) / "root")
    dump(name, tmp_path / "mem.kdump", "--format", "kdump")
    on_kdump = program(root, f"kdump:{tmp_path / 'mem.kdump'}", symbols=[str(vmlinux)],
                       default_symbols=False)
    on_ram = program(root, source_spec(name), symbols=[str(vmlinux)], default_symbols=False)
    assert on_kdump["linux_banner"].string_().startswith(b"Linux version 6.1.0-56-amd64")
    assert tasks(on_kdump) == tasks(on_ram)
    assert len(tasks(on_ram)[0]) > 40
