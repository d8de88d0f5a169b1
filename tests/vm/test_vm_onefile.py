"""The one-file kcore (make dist) where nothing of the build host exists: x86-64 guests whose
initramfs holds Debian's busybox-static and that file only (no libc, no Python, no codec
library), the root read-only with its /tmp, on Debian's 6.1 and 6.12 kernels; what it
reads and writes there is checked against the guest's real /proc/kcore."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.destinations.servers import Nginx, free_ports, running
from tests.helpers import FIXTURE_NAMES, elf_read, fixture_memory, shared_fixture
from tests.vm.arm64 import PAGE, guest_read, kcore_offset, loads, symbol, vmcoreinfo
from tests.vm.guests import Guest, assert_same_header
from tests.vm.qemu_vm import host_kcore

# Every file and directory of the guest but /proc, /sys and the share (other filesystems);
# /dev/shm, /run and /tmp whichever are mounts of their own.
LIST = "for d in / /dev /dev/shm /run /tmp; do [ -e $d ] && find $d -xdev; done | sort -u"
# What busybox's shell says when the kernel refuses the file (another machine's ELF: ENOEXEC):
# like dash, it then reads the file as a script (POSIX), and fails on its first line; the
# README quotes it.
ARM64_MESSAGE = "{}: line 1: syntax error: unexpected"
# What the guest runs: kcore's commands with the output in OUT (a folder of the share).
# (Every start of the file unpacks it and starts Python under TCG, seconds each: the script
# keeps to the runs the issue names. The elf dump keeps its text segment, read live after the
# RAM that holds it: its .data and .bss pages differ from the RAM's copy, which verify calls
# damage; the -d 31 dump goes without it. The header holds every range: no `ranges` run.)
# First without TMPDIR on the read-only root's /tmp, then on a noexec tmpfs there (as CIS
# hardening mounts it); then with TMPDIR=/dev/shm, listing /dev/shm while the kdump runs.
SCRIPT = """\
S={share}; O=$S/out; mkdir -p $O
t() {{ echo "$(cut -d' ' -f1 /proc/uptime) $*" >> $S/times.txt; }}
ran() {{ rc=0; kcore --version > $S/$1.out 2> $S/$1.err || rc=$?; echo $rc > $S/$1.rc; }}
{list} > $S/before.txt
t start; ran rotmp
mount -t tmpfs -o noexec,nosuid,nodev,mode=1777,size=64m tmpfs /tmp
t rotmp; ran noexec
export TMPDIR=/dev/shm
t noexec; kcore --version > $S/version.txt
t version; kcore check --output-dir $O --json > $S/check.json
t check; kcore header -o $O/head.bin
t header; kcore dump -q --no-digest $O/mem.elf
t elf; kcore dump -q --no-digest --json --format kdump -o $O/mem.kdump > $S/kdump.json &
p=$!; i=0
while [ $i -lt 600 ] && kill -0 $p && ! ls -d /dev/shm/_MEI* > /dev/null 2>&1; do
  sleep 1; i=$((i+1)); done
{list} > $S/during.txt; wait $p
t kdump; kcore dump -q -d 31 --no-text --json -o $O/d31.elf > $S/d31.json
t d31; kcore verify --json $O/d31.elf > $S/verify-d31.elf.json
t verify; unset TMPDIR; {list} > $S/after.txt; umount /tmp
"""


def _run_all(g: Guest, script: str = SCRIPT, last: str = "after.txt", **fields: object) -> Path:
    """Run a script in the guest once (the guest is shared by this module's tests); `last`
    is the share's file it writes last, `fields` what the script's text leaves to fill."""
    share = g.vm.share
    failed = share / "script-failed.txt"
    if failed.exists():  # an earlier test of this guest ran it: one failure, not three runs
        pytest.fail(failed.read_text())
    if not (share / last).exists():
        # ~105 s of CPU on an idle machine; a shared one stretches that many times over
        r = g.vm.run(script.format(share=share, list=LIST, **fields), timeout=2400)
        if r.rc != 0:
            failed.write_text(f"the guest script failed (rc {r.rc}):\n{r.stderr[-3000:]}")
            pytest.fail(failed.read_text())
    return share


def test_onefile_runs_with_nothing_installed(onefile_guest: Guest, onefile: Path) -> None:
    """The guest has no libc, Python or codec library: --version names the commit and the
    bundled libraries; check's verdict is go; the kdump (zstd) is written from the file's own
    libzstd; every dump verifies intact inside the guest and again on the host."""
    g = onefile_guest
    share = _run_all(g)
    version = (share / "version.txt").read_text()
    assert version.startswith(f"kcore {onefile.name.split('-')[1]} (commit ")
    for soname in ("libzstd.so.1", "liblzo2.so.2", "libsnappy.so.1", "libz.so.1",
                   "libdeflate.so.0"):
        assert soname in version
    check = json.loads((share / "check.json").read_text())
    assert check["verdict"] is True and check["chosen"] == "/proc/kcore", check
    report = json.loads((share / "verify-d31.elf.json").read_text())
    assert report["ok"] is True and not report["problems"], report
    for name in ("mem.kdump", "d31.elf"):  # every page of the kdump decompressed
        r = host_kcore("verify", str(share / "out" / name))
        assert r.returncode == 0, r.stderr.decode()
    kdump = json.loads((share / "kdump.json").read_text())
    assert kdump["format"] == "kdump" and kdump["compression"]["codec"] == "zstd", kdump
    d31 = json.loads((share / "d31.json").read_text())
    assert d31["bytes"] < (share / "out" / "mem.elf").stat().st_size


def test_onefile_header_pages_equal_real_kcore(onefile_guest: Guest,
                                                      tmp_path: Path) -> None:
    """The file's `header`, run live in the guest, is the real kcore's (every range in its
    program headers; the reading task's NT_TASKSTRUCT aside); the kernel text of its elf,
    -d 31 and kdump dumps is the real kcore's, read with dd in the guest."""
    g = onefile_guest
    share = _run_all(g)
    assert_same_header(g, (share / "out" / "head.bin").read_bytes())
    stext = symbol(g, "_stext")
    (text,) = guest_read(g, [(kcore_offset(g, stext), 16, 0)])
    assert text != bytes(len(text))
    assert elf_read(share / "out" / "mem.elf", stext, 16 * PAGE) == text
    # d31.elf has no text segment: the same bytes where its RAM segments hold them
    text_load = next(p for p in g.kcore["phdrs"] if p["p_type"] == 1 and
                     p["p_vaddr"] <= stext < p["p_vaddr"] + p["p_memsz"])
    phys = text_load["p_paddr"] + stext - text_load["p_vaddr"]
    ram = next(p for p in g.kcore["phdrs"] if p["p_type"] == 1 and p is not text_load and
               p["p_paddr"] <= phys < p["p_paddr"] + p["p_memsz"])
    assert elf_read(share / "out" / "d31.elf", ram["p_vaddr"] + phys - ram["p_paddr"],
                    16 * PAGE) == text
    # the kdump's pages, read back through kcore on the host as /proc/kcore offsets
    out = tmp_path / "text.bin"
    r = host_kcore("read", "--root", str(g.root), "--source", f"kdump:{share / 'out/mem.kdump'}",
                   "--offset", hex(kcore_offset(g, stext)), "--length", hex(16 * PAGE),
                   "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == text


def test_onefile_footprint(onefile_guest: Guest) -> None:
    """Nothing new in the guest outside the output's folder after all those runs: while one
    runs, staticx's and PyInstaller's unpacked copies are in $TMPDIR (here the /dev/shm tmpfs),
    and both are gone after. Without TMPDIR, on the read-only root's /tmp or a noexec tmpfs
    there, the file fails in one line naming /tmp and leaves nothing."""
    g = onefile_guest
    share = _run_all(g)
    before = (share / "before.txt").read_text().splitlines()
    after = (share / "after.txt").read_text().splitlines()
    assert {"/bin/kcore", "/dev/shm", "/tmp"} <= set(before), before
    assert not {"/usr", "/lib", "/lib64"} & set(before), "a guest with busybox and the file only"
    assert after == before
    during = sorted(set((share / "during.txt").read_text().splitlines()) - set(before))
    assert all(p.startswith("/dev/shm/") for p in during), during[:20]
    mei, sx = sorted({p.split("/")[3] for p in during})  # PyInstaller's, staticx's
    assert mei.startswith("_MEI") and sx.startswith("staticx-"), (mei, sx)
    for case, problem in (("rotmp", "Failed to create temporary directory in /tmp"),
                          ("noexec", "Permission denied")):
        assert int((share / f"{case}.rc").read_text()) != 0, case
        err = (share / f"{case}.err").read_text().strip().splitlines()
        assert len(err) == 1 and "/tmp" in err[0] and problem in err[0], (case, err)
        assert not (share / f"{case}.out").read_text(), case


def test_onefile_is_static_and_small(onefile: Path) -> None:
    """make dist's file: at most 40 MiB, an ELF executable that needs no interpreter
    (staticx's loader is static), and runs here too."""
    assert onefile.stat().st_size <= 40 << 20
    with open(onefile, "rb") as f:
        kinds = [seg["p_type"] for seg in ELFFile(f).iter_segments()]
    assert "PT_LOAD" in kinds and "PT_INTERP" not in kinds and "PT_DYNAMIC" not in kinds
    r = subprocess.run([str(onefile), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "libzstd.so.1" in r.stdout, r.stderr


def _foreign_start(g: Guest, file: Path) -> str:
    """Start a one file of another machine in the guest (over its share): it fails with
    nothing on stdout and one line on stderr, returned."""
    copy = g.vm.share / file.name
    shutil.copyfile(file, copy)
    copy.chmod(0o755)
    try:
        r = g.vm.run(f"{copy} --version\n", timeout=60)
    finally:
        copy.unlink()
    assert r.rc != 0 and not r.stdout, r
    (line,) = r.stderr.strip().splitlines()
    return line


@pytest.mark.parametrize("arm64_guest", ["arm64-6.1"], indirect=True)
def test_onefile_on_arm64_host(arm64_guest: Guest, onefile: Path) -> None:
    """The x86-64 file started on an arm64 machine (an arm64 guest, over its share): the
    kernel refuses it (ENOEXEC) before any of it runs, and busybox's shell, reading it as a
    script then, stops at line 1: one line, the one the README tells users to expect."""
    g = arm64_guest
    assert _foreign_start(g, onefile).startswith(ARM64_MESSAGE.format(g.vm.share / onefile.name))


def test_onefile_uploads_over_http(onefile: Path, tmp_path: Path) -> None:
    """The file's http(s):// destinations work (urllib3, xml and ssl are inside it): an elf
    dump PUT to Debian's nginx is byte for byte the package's to a local file and verifies
    intact; https:// to a closed port fails in one line, as the package's does."""
    name = FIXTURE_NAMES[0]
    system = ["--root", str(shared_fixture(name) / "root"),
              "--source", f"raw:{fixture_memory(name)}", "-q"]
    # https:// to a closed port: retried with backoff (~15 s of sleep), so begun first
    port = free_ports(1)[0]
    https = subprocess.Popen([str(onefile), "dump", *system, f"https://127.0.0.1:{port}/x"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ref = tmp_path / "ref.elf"
    r = host_kcore("dump", *system, "-o", str(ref))
    assert r.returncode == 0, r.stderr.decode()
    with running(Nginx(tmp_path / "nginx")) as ng:
        r = subprocess.run([str(onefile), "dump", *system, ng.url("/mem.elf")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        got = ng.www / "mem.elf"
        assert got.read_bytes() == ref.read_bytes()
        r = host_kcore("verify", str(got))
        assert r.returncode == 0, r.stderr.decode()
    out, err = https.communicate(timeout=300)
    assert https.returncode == 1 and not out, err
    (line,) = err.strip().splitlines()
    assert line.startswith("kcore: error: ") and "Connection refused" in line, line


# The aarch64 file (make dist-aarch64) in the arm64 guest, live on its /proc/kcore: the
# first time kcore runs on arm64 itself.  TMPDIR on the /dev/shm tmpfs (the root is read-only).
ARM64_SCRIPT = """\
S={share}; O=$S/out; mkdir -p $O; export TMPDIR=/dev/shm
t() {{ echo "$(cut -d' ' -f1 /proc/uptime) $*" >> $S/times.txt; }}
t start; kcore --version > $S/version.txt
t version; kcore ranges --json > $S/ranges.json
t ranges; kcore header -o $O/head.bin
t header; kcore read --offset {offset} --length {length} -o $O/text.bin
t read; kcore dump -q --no-digest --json $O/mem.elf > $S/dump.json
t dump
"""
EM_AARCH64 = 183


def _run_arm64(g: Guest) -> tuple[Path, int, bytes]:
    """The aarch64 file's runs in the arm64 guest (once); _stext and 16 pages of kernel text
    from there, read with dd from the real kcore."""
    stext = symbol(g, "_stext")
    offset = kcore_offset(g, stext)
    (text,) = guest_read(g, [(offset, 16, 0)])
    assert text != bytes(len(text))
    share = _run_all(g, ARM64_SCRIPT, "dump.json", offset=hex(offset), length=hex(len(text)))
    return share, stext, text


def test_aarch64_file_live_on_real_arm64_kcore(onefile_arm64_guest: Guest) -> None:
    """In the busybox-only arm64 guest the aarch64 file names itself so; its `ranges` are the
    real kcore's PT_LOADs field by field, with its data offset and size; its `header` is the
    real one's bytes; its `read` and its dump's kernel text are what dd read from the real
    /proc/kcore."""
    g = onefile_arm64_guest
    share, stext, text = _run_arm64(g)
    version = (share / "version.txt").read_text()
    assert "one file for linux-aarch64" in version and "libzstd.so.1" in version, version
    ours = json.loads((share / "ranges.json").read_text())
    rows = [(int(x["vaddr"], 16), int(x["paddr"], 16), int(x["size"], 16), int(x["offset"], 16))
            for x in ours["ranges"]]
    assert rows == [(p["p_vaddr"], p["p_paddr"], p["p_filesz"], p["p_offset"]) for p in loads(g)]
    assert int(ours["data_offset"], 16) == g.kcore["data_offset"]
    assert int(ours["file_size"], 16) == g.kcore["st_size"]
    assert_same_header(g, (share / "out" / "head.bin").read_bytes())
    assert (share / "out" / "text.bin").read_bytes() == text
    assert elf_read(share / "out" / "mem.elf", stext, len(text)) == text
    dump = json.loads((share / "dump.json").read_text())
    assert dump["format"] == "elf", dump


def test_aarch64_dump_opens_in_drgn(onefile_arm64_guest: Guest) -> None:
    """drgn, on this host, takes the dump the aarch64 file wrote live for an aarch64 Linux
    core: walking its page tables from VMCOREINFO it reads the kernel's release where
    init_uts_ns holds it, and the kernel text dd read from the real kcore."""
    drgn = pytest.importorskip("drgn", reason="drgn is not installed (.ci/run installs it)")
    g = onefile_arm64_guest
    share, stext, text = _run_arm64(g)
    prog = drgn.Program()
    prog.set_core_dump(str(share / "out" / "mem.elf"))
    assert prog.platform.arch == drgn.Architecture.AARCH64
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    info = vmcoreinfo(g)
    uts = int(info["SYMBOL(init_uts_ns)"], 16) + int(info["OFFSET(uts_namespace.name)"])
    release = prog.read(uts + 2 * 65, 65).split(b"\0")[0].decode()  # name.release
    assert release == info["OSRELEASE"] == g.vm.kernel.release
    assert prog.read(stext, len(text)) == text


def test_aarch64_file_is_static_and_small(onefile_aarch64: Path) -> None:
    """make dist-aarch64's file: at most 40 MiB, an aarch64 ELF executable that needs no
    interpreter; started on this x86-64 machine (through qemu-user-static's binfmt handler,
    which building it needs) it says in one line which machine it is for."""
    assert onefile_aarch64.stat().st_size <= 40 << 20
    with open(onefile_aarch64, "rb") as f:
        elf = ELFFile(f)
        assert elf["e_machine"] == "EM_AARCH64"
        kinds = [seg["p_type"] for seg in elf.iter_segments()]
    assert "PT_LOAD" in kinds and "PT_INTERP" not in kinds and "PT_DYNAMIC" not in kinds
    r = subprocess.run([str(onefile_aarch64), "--version"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and not r.stdout, r
    native = onefile_aarch64.name.replace("aarch64", "x86_64")
    assert r.stderr == ("kcore: error: this kcore file is built for linux-aarch64 but this "
                        f"machine is x86_64: run {native} instead\n")


@pytest.mark.parametrize("onefile_guest", ["onefile-6.1"], indirect=True)
def test_aarch64_file_on_amd64_host(onefile_guest: Guest, onefile_aarch64: Path) -> None:
    """The aarch64 file started on an x86-64 machine with no emulator (the busybox-only
    guest): the kernel refuses it, and busybox's shell, reading it as a script, stops at its
    first line in one line (`line 0: syntax error: unexpected word`, the README quotes it)."""
    g = onefile_guest
    copy = g.vm.share / onefile_aarch64.name
    assert _foreign_start(g, onefile_aarch64).startswith(f"{copy}: line 0: syntax error: "
                                                         "unexpected")
