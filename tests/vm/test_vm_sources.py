"""The live `auto` source on a kernel booted with lockdown=confidentiality: one line says why."""

from __future__ import annotations

import pytest

from tests.vm import qemu_vm

pytestmark = pytest.mark.vm

SCRIPT = """\
mountpoint -q /sys/kernel/security || mount -t securityfs none /sys/kernel/security
cat /sys/kernel/security/lockdown
"$KCORE_PY" -m kcore read --source auto --offset 0 --length 16 -o /tmp/out || echo "rc=$?"
"""


def test_lockdown_confidentiality_is_reported_for_kcore_and_dev_mem() -> None:
    """/proc/kcore and /dev/mem both refuse under lockdown; the error names it for each."""
    reason = qemu_vm.unavailable_reason()
    if reason:
        pytest.skip(f"QEMU cannot run here: {reason}")
    qemu_vm.ensure_built()
    vm = qemu_vm.boot(qemu_vm.VmConfig("lockdown", mem_mib=512,
                                       extra_append="lockdown=confidentiality"))
    try:
        r = vm.run(SCRIPT)
    finally:
        vm.close()
    out = r.stdout.splitlines()
    assert out[0].strip() == "none integrity [confidentiality]", r.stdout
    assert out[-1].strip() == "rc=2", (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0] == ("kcore: error: no live memory source works: "
                        "/proc/kcore: kernel lockdown (confidentiality) forbids it; "
                        "/dev/crash: missing (the out-of-tree crash driver is not loaded); "
                        "/dev/mem: kernel lockdown (confidentiality) forbids it")
