"""`kcore dump --order critical` and `--times` on the real-kernel captures.

The critical set is checked against what Volatility 3's linux.pslist lists from the same
memory (its own layers, an ISF pakunoda made from the kernel's BTF); the pages read first
against the capture's RAM, with the source changed under the dump between the early read and
the copy (as a running kernel changes it); the time record against the dump it describes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.helpers import (
    CACHE,
    FIXTURE_NAMES,
    fixture_memory,
    make_isf,
    pid1_comm,
    run_kcore,
    shared_cache,
    shared_fixture,
)

NOKASLR, KASLR = FIXTURE_NAMES
PAGE = 4096


def spec(name: str) -> str:
    """The memory source of a capture: the raw RAM file, or QEMU's ELF core."""
    mem = fixture_memory(name)
    return f"raw:{mem}" if name == NOKASLR else f"elf:{mem}"


def root(name: str) -> str:
    return str(shared_fixture(name) / "root")


def test_volatility_follows_the_critical_pages(tmp_path):
    """On a LiME dump of the KASLR capture (QEMU's ELF core) made with --order critical
    --times, Volatility's linux.pslist (through kcore's layer, run by `kcore smear`) lists
    the tasks the walk found, and nearly every page it reads is one the dump read first."""
    pytest.importorskip("volatility3", reason="volatility3 is not installed")
    from kcore.commands.smear import measure
    from tests.integrations.test_volatility import pslist

    out = tmp_path / "m.lime"
    r = run_kcore("dump", "--root", root(KASLR), "--source", spec(KASLR), "--format", "lime",
                  "--order", "critical", "--times", "--json", "-o", str(out), check=True,
                  text=True)
    result = json.loads(r.stdout)
    kinds = result["critical"]["kinds"]
    for kind in ("page_tables", "task_struct", "mm_struct", "vma", "files", "cred", "modules"):
        assert kinds.get(kind), (kind, kinds)
    isf = make_isf()
    # Volatility's symbol index, shared with tests/integrations/test_volatility.py
    with shared_cache("vol-cache") as cache:
        got, *more = (measure(str(out), plugin, ["-s", isf], str(cache))
                      for plugin in ("linux.pslist", "linux.proc.Maps", "linux.lsof"))
    assert got["exit_status"] == 0, got["error"]
    rows = pslist(subprocess.CompletedProcess([], 0, got["stdout"], ""))
    assert (1, 0, pid1_comm(KASLR)) in rows, rows
    from kcore import critical
    from kcore.discover import discover

    system = discover(root(KASLR), spec(KASLR))
    try:
        walked = {(pid, comm) for pid, comm in critical.find(system).tasks if pid}
    finally:
        system.close()
    assert walked == {(pid, comm) for pid, _ppid, comm in rows}
    assert got["pages"] > 20 and got["pages_without_time"] == 0
    # every page the plugins follow (tasks, threads, maps with their files' paths, open
    # files) was read first: none is read later in address order
    assert got["pages_critical"] == got["pages"], got
    for other in more:  # linux.proc.Maps, linux.lsof
        assert other["exit_status"] == 0 and other["rows"] > 5, other["error"]
        assert other["pages"] > 20 and other["pages_critical"] == other["pages"], other


def test_the_walk_finds_the_maps_volatility_lists():
    """The critical walk decodes each process's maple tree of VMAs: the VMAs it finds are
    the ones Volatility's linux.proc.Maps lists (PID and start address)."""
    pytest.importorskip("volatility3", reason="volatility3 is not installed")
    from kcore import critical
    from kcore.commands.smear import measure
    from kcore.discover import discover
    from kcore.kallsyms import parse_kallsyms

    system = discover(root(KASLR), spec(KASLR))
    try:
        walk = critical._Walk(system, system.source)
        kallsyms = (shared_fixture(KASLR) / "root/proc/kallsyms").read_text()
        symbols = parse_kallsyms(kallsyms, critical.SYMBOLS, where="kallsyms",
                                 required=("init_task",))
        walk.btf = btf = critical.load_btf(shared_fixture(KASLR) / "root", walk.read, symbols)
        o = {m: btf.offset("task_struct", m) for m in ("tasks", "mm", "pid")}
        ma_root = btf.offset("mm_struct", "mm_mt") + btf.offset("maple_tree", "ma_root")
        start = btf.offset("vm_area_struct", "vm_start")
        ours = set()
        init = symbols["init_task"]
        for task in walk.list_entries(init + o["tasks"], o["tasks"], 1 << 16):
            mm = walk.ptr(task + o["mm"])
            if mm:
                pid = walk.ptr(task + o["pid"]) & 0xFFFFFFFF
                ours |= {(pid, walk.ptr(v + start))
                         for v in critical._maple_entries(walk, mm + ma_root)}
    finally:
        system.close()
    dump = run_kcore("dump", "--root", root(KASLR), "--source", spec(KASLR), "--format",
                     "lime", "--times", "-q", "-o", str(CACHE / f"maps-{os.getpid()}.lime"),
                     "--force", check=True)
    assert dump.returncode == 0
    lime = CACHE / f"maps-{os.getpid()}.lime"
    try:
        isf = make_isf()
        with shared_cache("vol-cache") as cache:
            got = measure(str(lime), "linux.proc.Maps", ["-s", isf], str(cache))
    finally:
        for p in (lime, *(Path(f"{lime}.{ext}") for ext in ("times", "sha256", "json",
                                                             "symbols"))):
            p.unlink(missing_ok=True)
    assert got["exit_status"] == 0, got["error"]
    theirs = set()
    for line in got["stdout"].splitlines():
        cols = line.split("\t")
        if len(cols) > 3 and cols[0].isdigit() and cols[2].startswith("0x"):
            theirs.add((int(cols[0]), int(cols[2], 16)))
    assert len(theirs) > 10 and ours == theirs, (sorted(ours ^ theirs)[:10], len(ours))


def test_the_kernels_zero_data_pages_are_left_to_address_order():
    """Of the kernel's .data and .bss in the capture's RAM (the raw file: offset = physical
    address), the set holds every page with a non-zero byte and, of the all-zero ones, only
    the few something else walked to (a page table, a task): init_task's page is in, the 12
    MiB of AMD microcode buffers (amd_ucode_patch, all zero in the guest) are not."""
    from kcore import critical
    from kcore.discover import discover

    kallsyms = (shared_fixture(NOKASLR) / "root/proc/kallsyms").read_text()
    sym = {parts[2]: int(parts[0], 16) for parts in map(str.split, kallsyms.splitlines())
           if len(parts) >= 3 and parts[2] in ("_sdata", "_edata", "__bss_start", "_end",
                                               "init_task", "amd_ucode_patch")}
    system = discover(root(NOKASLR), spec(NOKASLR))
    try:
        pages = set(critical.find(system).pages)
        pa = system.addrmap.pa_symbol
    finally:
        system.close()
    ram = fixture_memory(NOKASLR).read_bytes()
    held, zero, zero_held = 0, 0, 0
    for lo, hi in (("_sdata", "_edata"), ("__bss_start", "_end")):
        for va in range(sym[lo] & ~(PAGE - 1), sym[hi], PAGE):
            p = pa(va)
            if ram[p:p + PAGE].count(0) != PAGE:
                assert p in pages, hex(va)
                held += 1
            else:
                zero, zero_held = zero + 1, zero_held + (p in pages)
    assert pa(sym["init_task"]) & ~(PAGE - 1) in pages
    assert pa(sym["amd_ucode_patch"] + (1 << 20)) & ~(PAGE - 1) not in pages
    assert held > 500 and zero > 3000 and zero_held < zero // 50, (held, zero, zero_held)


def test_the_next_task_the_kernel_allocates_is_read_first():
    """A task forked while the walk runs lands where SLUB hands out the next task_struct:
    the object at the head of the CPU's freelist for task_struct_cachep (the capture's
    kmem_cache_cpu, else its slab's freelist). Its pages are in the set, though no task
    there was walked; so are the next signal_struct's and cred's."""
    from kcore import critical
    from kcore.discover import discover
    from kcore.kallsyms import parse_kallsyms

    system = discover(root(KASLR), spec(KASLR))
    try:
        pages = set(critical.find(system).pages)
        walk = critical._Walk(system, system.source)
        kallsyms = (shared_fixture(KASLR) / "root/proc/kallsyms").read_text()
        symbols = parse_kallsyms(kallsyms, critical.SYMBOLS, where="kallsyms",
                                 required=("init_task",))
        walk.btf = btf = critical.load_btf(shared_fixture(KASLR) / "root", walk.read, symbols)
        cpu0 = walk.ptr(symbols["__per_cpu_offset"])
        for cachep, struct_name in (("task_struct_cachep", "task_struct"),
                                    ("signal_cachep", "signal_struct"), ("cred_jar", "cred")):
            cache = walk.ptr(symbols[cachep])
            kcc = walk.ptr(cache + btf.offset("kmem_cache", "cpu_slab")) + cpu0
            nxt = walk.ptr(kcc + btf.offset("kmem_cache_cpu", "freelist"))
            if not nxt:
                slab = walk.ptr(kcc + btf.offset("kmem_cache_cpu", "slab"))
                nxt = walk.ptr(slab + btf.offset("slab", "freelist"))
            assert nxt, cachep
            for va in range(nxt & ~(PAGE - 1), nxt + btf.size(struct_name), PAGE):
                assert walk.phys(va) in pages, (cachep, hex(va))
    finally:
        system.close()


def test_critical_pages_are_the_early_reads(tmp_path, monkeypatch):
    """The pages read first stand in the output, whatever the copy read of them later: the
    source's critical pages are overwritten right after the early read (a kernel at work);
    the raw dump (hashed as written) and the padded one (not hashed) hold the capture's pages
    there and the changed source everywhere else, and their SHA-256 is the file's."""
    from kcore import cli, critical

    ram = tmp_path / "ram.bin"
    shutil.copyfile(fixture_memory(NOKASLR), ram)
    original = fixture_memory(NOKASLR)
    seen: dict[str, list[int]] = {}
    real = critical.read_first

    def read_then_change(source, cset, times=None):
        snap = real(source, cset, times)
        seen["pages"] = list(cset.pages)
        with open(ram, "r+b") as f:  # the kernel moves on: every critical page changes...
            for pa in cset.pages:
                f.seek(pa)
                f.write(b"\xa5" * PAGE)
            f.seek(0x200000)  # ...and so does one page outside the set
            f.write(b"\x5a" * PAGE)
        return snap

    monkeypatch.setattr(critical, "read_first", read_then_change)
    for fmt, extra in (("raw", ()), ("padded", ("--no-digest",))):
        out = tmp_path / f"out.{fmt}"
        shutil.copyfile(original, ram)
        rc = cli.main(["dump", "--root", root(NOKASLR), "--source", f"raw:{ram}", "--format",
                       fmt, "--order", "critical", "-q", "-o", str(out), *extra])
        assert rc == 0
        pages = seen.pop("pages")
        assert len(pages) > 100
        assert 0x200000 not in pages
        with open(out, "rb") as got, open(original, "rb") as want:
            for pa in pages:
                got.seek(pa)
                want.seek(pa)
                assert got.read(PAGE) == want.read(PAGE), hex(pa)
            got.seek(0x200000)
            assert got.read(PAGE) == b"\x5a" * PAGE
        if fmt == "raw":
            digest = hashlib.sha256(out.read_bytes()).hexdigest()
            assert (tmp_path / "out.raw.sha256").read_text().split()[0] == digest


def test_unchanged_memory_gives_the_same_dump(tmp_path):
    """On memory that does not change, --order critical changes no byte: elf (hashed, the
    pages put over the copy) and lime to stdout (the pages spliced into the stream)."""
    base = ["dump", "--root", root(KASLR), "--source", spec(KASLR), "-q"]
    plain, crit = tmp_path / "plain.elf", tmp_path / "crit.elf"
    run_kcore(*base, "-o", str(plain), check=True)
    run_kcore(*base, "-o", str(crit), "--order", "critical", check=True)
    assert plain.read_bytes() == crit.read_bytes()
    plain, crit = tmp_path / "plain.lime", tmp_path / "stream.lime"
    run_kcore(*base, "--format", "lime", "--no-digest", "-o", str(plain), check=True)
    with open(crit, "wb") as f:
        r = run_kcore(*base, "--format", "lime", "--order", "critical", "-o", "-", stdout=f,
                      capture_output=False)
    assert r.returncode == 0
    assert crit.read_bytes() == plain.read_bytes()


def test_times_record_every_page_of_the_dump(tmp_path):
    """OUTPUT.times gives a read time to every page the ELF core holds (pyelftools' PT_LOADs),
    the critical pages first and flagged; the manifest, --json and verify give its windows;
    it adds less than 0.1% to the size."""
    from kcore.pagetimes import CRITICAL, PageTimes

    out = tmp_path / "m.elf"
    r = run_kcore("dump", "--root", root(KASLR), "--source", spec(KASLR), "--json",
                  "--order", "critical", "--times", "-o", str(out), check=True, text=True)
    result = json.loads(r.stdout)
    times = PageTimes.load(str(out) + ".times")
    assert os.path.getsize(str(out) + ".times") <= out.stat().st_size // 1000
    crit = [r for r in times.records if r[2] & CRITICAL]
    bulk = [r for r in times.records if not r[2] & CRITICAL]
    assert crit and bulk
    assert max(r[4] for r in crit) <= min(r[3] for r in bulk)
    with open(out, "rb") as f:
        for seg in ELFFile(f).iter_segments("PT_LOAD"):
            if seg["p_filesz"] == 0 or seg["p_paddr"] == (1 << 64) - 1:
                continue
            for pa in (seg["p_paddr"], seg["p_paddr"] + seg["p_filesz"] - PAGE):
                assert times.when(pa) is not None, hex(pa)
    manifest = json.loads((tmp_path / "m.elf.json").read_text())
    summary = times.summary()
    for where in (manifest["times"], result["times"]):
        assert where["dump"] == summary["dump"] and where["critical"] == summary["critical"]
    assert summary["critical"]["pages"] == result["critical"]["pages"]
    assert 0 < summary["critical_share"] < 1  # its size is a wall-clock figure: bench/, not here
    v = run_kcore("verify", "--json", str(out), text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    assert json.loads(v.stdout)["times"]["critical"] == summary["critical"]
    data = bytearray((tmp_path / "m.elf.times").read_bytes())
    os.chmod(tmp_path / "m.elf.times", 0o600)
    (tmp_path / "m.elf.times").write_bytes(bytes(data[:-7]))
    v = run_kcore("verify", str(out), text=True)
    assert v.returncode == 1 and "m.elf.times" in v.stderr and "Traceback" not in v.stderr


def test_refusals_are_one_line(tmp_path):
    """What cannot be done says why in one line, exit 2: kdump and avml compress in order,
    --times needs a file, a kernel without BTF has no critical set to find, smear needs the
    dump's times."""
    base = ["dump", "--root", root(NOKASLR), "--source", spec(NOKASLR), "-q"]
    for args in (("--format", "kdump", "--order", "critical", "-o", str(tmp_path / "a")),
                 ("--format", "avml", "--times", "-o", str(tmp_path / "b")),
                 ("--format", "lime", "--times", "-o", "-")):
        r = run_kcore(*base, *args, text=True)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    fake = tmp_path / "root"
    shutil.copytree(root(NOKASLR), fake)
    text = (fake / "proc/kallsyms").read_text()
    (fake / "proc/kallsyms").write_text("".join(
        line for line in text.splitlines(keepends=True) if "_BTF" not in line))
    r = run_kcore("dump", "--root", str(fake), "--source", spec(NOKASLR), "--order",
                  "critical", "-o", str(tmp_path / "c.elf"), text=True)
    assert r.returncode == 2 and "BTF" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "c.elf").exists()
    (tmp_path / "plain.lime").write_bytes(b"")
    r = run_kcore("smear", str(tmp_path / "plain.lime"), "linux.pslist", text=True)
    assert r.returncode == 2 and "plain.lime.times: missing" in r.stderr


def test_the_critical_read_runs_at_realtime_priority_then_returns():
    """Where the process may (CAP_SYS_NICE), the critical read runs at SCHED_FIFO as the
    kernel reports it, and the thread is back at its policy afterwards, even through Ctrl-C."""
    from kcore import critical

    before = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
    with critical._realtime() as realtime:
        inside = os.sched_getscheduler(0)
    assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == before
    assert inside == (os.SCHED_FIFO if realtime else before[0])
    with pytest.raises(KeyboardInterrupt), critical._realtime():
        raise KeyboardInterrupt
    assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == before


def test_hostile_btf_is_one_error():
    """Truncated or corrupt BTF is an InputError, never an exception of another kind."""
    from kcore.critical import Btf
    from kcore.errors import InputError

    good = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 12, 12, 4) + struct.pack(
        "<III", 1, 4 << 24, 8) + b"\0ab\0"
    assert Btf(good, "ok").size("ab") == 8
    with pytest.raises(InputError, match="no struct task_struct"):
        Btf(good, "ok").size("task_struct")
    for bad in (b"", good[:20], b"\0" * 40, good[:30], good[:24] + b"\xff" * 16,
                good[:24] + struct.pack("<III", 0, 4 << 24 | 5, 8) + b"\0ab\0"):
        with pytest.raises(InputError):
            Btf(bad, "bad")


def test_times_file_parser_refuses_damage(tmp_path):
    """A damaged times file is an InputError naming it."""
    from kcore.errors import InputError
    from kcore.pagetimes import HEADER, PageTimes

    for data in (b"", b"KCTIMES1", HEADER.pack(b"KCTIMES1", 1, 4096, 5, 0),
                 HEADER.pack(b"KCTIMES2", 1, 4096, 0, 0), HEADER.pack(b"KCTIMES1", 1, 3, 0, 0)):
        with pytest.raises(InputError, match="x.times"):
            PageTimes(data, str(tmp_path / "x.times"))
    assert PageTimes(HEADER.pack(b"KCTIMES1", 1, 4096, 0, 0), "ok").when(0) is None


def test_arm64_is_refused():
    """The walk reads x86-64 page tables: another architecture is refused, not misread."""
    from types import SimpleNamespace

    from kcore import critical
    from kcore.errors import InputError

    system = SimpleNamespace(addrmap=SimpleNamespace(arch="aarch64"), source=None, root="/")
    with pytest.raises(InputError, match="x86-64"):
        critical.find(system)
