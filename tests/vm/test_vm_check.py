"""`kcore check` in real guests: lockdown modes, a masked /proc/kcore, a normal system.

Each verdict is compared with what `kcore dump` then does in the same guest.
"""

from __future__ import annotations

import json

from tests.vm.guests import Guest

SECURITYFS = "mount -t securityfs securityfs /sys/kernel/security 2>/dev/null || true\n"


def check(guest: Guest, prefix: str = "") -> tuple[int, dict, str]:
    """Run `kcore check --json` in the guest; its exit status, report and stderr."""
    r = guest.vm.run(prefix + 'set +e\n"$KCORE_PY" -m kcore check --json --output-dir /tmp\n'
                     'echo "rc=$?" >&2\n', timeout=300)
    rc = int(r.stderr.strip().rsplit("rc=", 1)[1])
    return rc, json.loads(r.stdout), r.stderr


def dump_rc(guest: Guest, prefix: str = "") -> tuple[int, str]:
    """Run `kcore dump -o /dev/null` in the guest; its exit status and stderr."""
    r = guest.vm.run(prefix + 'set +e\n"$KCORE_PY" -m kcore dump -q --no-digest -o /dev/null\n'
                     'echo "rc=$?" >&2\n', timeout=600)
    rc = int(r.stderr.strip().rsplit("rc=", 1)[1])
    return rc, r.stderr


def source(report: dict, name: str) -> dict:
    """One probed source of a check report."""
    return next(s for s in report["sources"] if s["name"] == name)


def test_check_lockdown(lockdown_guest: Guest) -> None:
    """lockdown=integrity: /dev/mem refused, /proc/kcore works; confidentiality: both refused."""
    mode = lockdown_guest.name.removeprefix("lockdown-")
    # Without securityfs the mode comes from the command line, and says so.
    rc, rep, _ = check(lockdown_guest)
    assert rep["lockdown"].startswith(f"{mode} (from the boot command line"), rep["lockdown"]
    rc, rep, err = check(lockdown_guest, SECURITYFS)
    assert rep["lockdown"] == f"{mode} (from sys/kernel/security/lockdown)"
    assert "kernel lockdown" in source(rep, "mem")["reason"]
    assert not source(rep, "mem")["works"]
    drc, derr = dump_rc(lockdown_guest, SECURITYFS)
    if mode == "integrity":
        assert rc == 0 and rep["verdict"], err
        assert source(rep, "kcore")["works"]
        assert rep["chosen"] == "/proc/kcore"
        assert drc == 0, derr
    else:
        assert rc == 2 and not rep["verdict"]
        assert source(rep, "kcore")["reason"] == "kernel lockdown (confidentiality) forbids it"
        assert "lockdown=confidentiality" in err.splitlines()[-2]  # the one line of advice
        assert drc == 2, derr
        assert "lockdown (confidentiality)" in derr


def test_check_normal_then_masked(kaslr_guest: Guest) -> None:
    """A normal guest: the dump works and fits the estimate; with /dev/null over /proc/kcore
    (a container's mask) check and dump both fail, and check says why."""
    rc, rep, err = check(kaslr_guest)
    assert rc == 0 and rep["verdict"], err
    assert source(rep, "kcore")["works"]
    assert "STRICT_DEVMEM" in source(rep, "mem")["reason"]  # Debian: CONFIG_STRICT_DEVMEM=y
    assert rep["kaslr"].startswith("on"), rep["kaslr"]
    assert rep["paging"] == "4-level"
    assert rep["release"] == kaslr_guest.vm.kernel.release
    assert rep["kcore_masked"] == "no"
    ram = sum(int(p["p_filesz"]) for p in kaslr_guest.kcore["phdrs"]
              if p["p_type"] == 1 and p["p_paddr"] != (1 << 64) - 1
              and p["p_vaddr"] < 0xFFFFFFFF80000000)
    assert rep["ram_bytes"] >= ram  # iomem's System RAM, of which kcore shows all but a page
    r = kaslr_guest.vm.run('"$KCORE_PY" -m kcore dump -q --json --format lime -o /dev/null\n',
                           timeout=600).check()
    assert json.loads(r.stdout)["bytes"] <= rep["sizes"]["lime"]["size"]

    mask = "mount --bind /dev/null /proc/kcore\ntrap 'umount /proc/kcore' EXIT\n"
    rc, rep, err = check(kaslr_guest, mask)
    assert rc == 2 and not rep["verdict"]
    assert rep["kcore_masked"].startswith("a character device 1:3 (/dev/null)")
    assert source(rep, "kcore")["reason"].startswith("masked")
    assert "masked" in err.splitlines()[-2]
    drc, derr = dump_rc(kaslr_guest, mask)
    assert drc == 2, derr
    # Unmounted again: the guest is as before for the tests after this one.
    assert check(kaslr_guest)[0] == 0


WRITER = r'''
import json, os, struct, sys, time
share = sys.argv[1]
n = 2048  # 8 MiB of pages, each rewritten over and over
buf = bytearray(n * 4096)
buf[::4096] = b"\x01" * n
pfns = []
with open("/proc/self/pagemap", "rb") as f:
    import ctypes  # the buffer's data address, through the buffer protocol
    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    for i in range(n):
        f.seek((addr // 4096 + i) * 8)
        entry, = struct.unpack("<Q", f.read(8))
        if entry >> 63:
            pfns.append(entry & ((1 << 55) - 1))
tmp = os.path.join(share, "writer.json.tmp")
with open(tmp, "w") as f:
    json.dump({"pfns": pfns}, f)
os.rename(tmp, os.path.join(share, "writer.json"))
k = 1
stop = os.path.join(share, "writer.stop")
while not os.path.exists(stop):
    k = k % 250 + 1
    buf[::4096] = bytes([k]) * n
    time.sleep(0.01)
'''


def test_recheck_measures_the_smear(kaslr_guest: Guest) -> None:
    """A process rewrites a known buffer while the guest dumps itself with --recheck: the
    ranges holding the buffer show changed pages, the kernel code none."""
    vm = kaslr_guest.vm
    (vm.share / "writer.py").write_text(WRITER)
    for name in ("writer.json", "writer.stop"):
        (vm.share / name).unlink(missing_ok=True)
    # In the background: the agent runs one command at a time.
    vm.run(f'"$KCORE_PY" {vm.share / "writer.py"} {vm.share} > /dev/null 2>&1 &\n').check()
    try:
        vm._wait_for(lambda: (vm.share / "writer.json").exists(), 120, "the writer's PFNs")
        pfns = set(json.loads((vm.share / "writer.json").read_text())["pfns"])
        assert len(pfns) > 1000
        out = vm.share / "smear.elf"
        r = vm.kcore("dump", "-q", "--json", "--no-digest", "--recheck", "--force", "-o",
                     str(out), timeout=900).check()
    finally:
        (vm.share / "writer.stop").write_text("")
    summary = json.loads(r.stdout)["recheck"]
    manifest = json.loads(out.with_name("smear.elf.json").read_text())["recheck"]
    out.unlink()
    assert summary["changed"] > 0 and summary["share"] > 0
    code = summary["kernel_code"]
    assert code["pages"] > 1000 and code["changed"] == 0, code
    hit = [r for r in manifest["ranges"]
           if any(int(a, 16) // 4096 in pfns for a in r["changed_at"])]
    assert hit, "no changed page of the recheck is one of the writer's"
    assert all(r["changed"] > 0 and r["share"] > 0 for r in hit)
    for r in manifest["ranges"]:
        if r["kind"] == "text":  # the image's code pages never change; data pages may
            lo, hi = int(code["paddr"], 16), int(code["paddr"], 16) + code["size"]
            assert not [a for a in r["changed_at"] if lo <= int(a, 16) < hi]
