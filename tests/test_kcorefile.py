"""KcoreFile against what the real /proc/kcore of the captures returned."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

import kcore
from kcore.kcorefile import KcoreFile
from tests.helpers import FIXTURE_NAMES, fixture_memory, run_kcore, shared_fixture

KASLR, NOKASLR = "linux-6.1.0-56-kaslr-512M", "linux-6.1.0-56-nokaslr-512M"
SPEC = {KASLR: "elf", NOKASLR: "raw"}
PAGE = 4096


def source_spec(name: str) -> str:
    """The memory source of a capture (QEMU's ELF core or the raw RAM file)."""
    return f"{SPEC[name]}:{fixture_memory(name)}"


def meta(name: str) -> dict:
    """expected/kcore.json of a capture."""
    return json.loads((shared_fixture(name) / "expected/kcore.json").read_text())


def expected_bytes(name: str, file: str) -> bytes:
    """One of the files the real /proc/kcore gave."""
    return (shared_fixture(name) / "expected" / file).read_bytes()


@pytest.fixture(params=FIXTURE_NAMES, scope="module")
def kf(request):
    """(name, KcoreFile) for one capture, opened through kcore.open()."""
    name = request.param
    f = kcore.open(str(shared_fixture(name) / "root"), source_spec(name))
    yield name, f
    f.close()


class MemoryImage:
    """Physical memory of a capture read with plain preads, located through pyelftools."""

    def __init__(self, name: str) -> None:
        self.f = open(fixture_memory(name), "rb")  # noqa: SIM115
        self.loads = [(0, 0, os.fstat(self.f.fileno()).st_size)]
        if SPEC[name] == "elf":
            self.loads = [(s["p_paddr"], s["p_offset"], s["p_filesz"])
                          for s in ELFFile(self.f).iter_segments() if s["p_type"] == "PT_LOAD"]

    def read(self, paddr: int, length: int) -> bytes:
        for pa, off, size in self.loads:
            if pa <= paddr and paddr + length <= pa + size:
                return os.pread(self.f.fileno(), length, off + paddr - pa)
        raise AssertionError(f"{paddr:#x} not in the image")


def test_text_and_first_ram_read_byte_for_byte(kf) -> None:
    """At the offsets of kcore.json `reads`: kcore-text-2M.bin and kcore-ram0.bin exactly."""
    name, f = kf
    for r in meta(name)["reads"]:
        if r["file"] == "kcore-ram-16M-8M.bin":
            continue
        f.seek(r["kcore_offset"])
        assert f.read(r["length"]) == expected_bytes(name, r["file"]), r["file"]
        assert f.tell() == r["kcore_offset"] + r["length"]


def test_ram_16m_matches_except_pages_the_running_kernel_changed(kf) -> None:
    """kcore-ram-16M-8M.bin: every page equal to the image's matches; few pages changed."""
    name, f = kf
    r = next(r for r in meta(name)["reads"] if r["file"] == "kcore-ram-16M-8M.bin")
    got = f.pread(r["length"], r["kcore_offset"])
    want = expected_bytes(name, r["file"])
    image = MemoryImage(name).read(r["paddr"], r["length"])
    assert got == image  # what the memory held when it was taken
    differ = [i for i in range(0, r["length"], PAGE) if got[i:i + PAGE] != want[i:i + PAGE]]
    print(f"{name}: {len(differ)} of {r['length'] // PAGE} pages changed after the kcore read")
    assert len(differ) <= 64


def test_header_region_is_the_real_kcore_head_but_the_task_struct(kf) -> None:
    """The first 64 KiB: ELF header, phdrs, notes, zeros, as the real kcore (task_struct aside)."""
    name, f = kf
    head = expected_bytes(name, "kcore-head-64k.bin")
    got = f.pread(len(head), 0)
    # NT_TASKSTRUCT holds the reading task's own task_struct: only its size can match.
    ts = next(n for n in meta(name)["notes"] if n["type"] == 4)
    start = head.find(b"CORE\0\0\0\0", 0x200 + 12 + 8 + 336 + 12 + 8 + 136) + 8
    assert got[:start] == head[:start]
    assert got[start + ts["descsz"]:] == head[start + ts["descsz"]:]
    assert f.size() == meta(name)["kcore_st_size"]


def test_pyelftools_opens_kcorefile_and_sees_kcore_ranges(kf) -> None:
    """ELFFile(KcoreFile) shows the PT_LOADs `kcore ranges` prints, and the real kcore had."""
    name, f = kf
    segs = [s.header for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]
    res = run_kcore("ranges", "--root", str(shared_fixture(name) / "root"), "--source",
                    source_spec(name), "--json", check=True)
    ranges = json.loads(res.stdout)["ranges"]
    assert [(s.p_vaddr, s.p_paddr, s.p_filesz, s.p_offset) for s in segs] == [
        (int(r["vaddr"], 16), int(r["paddr"], 16), int(r["size"], 16), int(r["offset"], 16))
        for r in ranges]
    real = [p for p in meta(name)["phdrs"] if p["type"] == "PT_LOAD"]
    assert [(s.p_vaddr, s.p_offset, s.p_filesz) for s in segs] == [
        (p["p_vaddr"], p["p_offset"], p["p_filesz"]) for p in real]


def _load(name: str, kind: str) -> dict:
    return next(p for p in meta(name)["phdrs"] if p.get("kind") == kind)


def _modules(name: str) -> list[tuple[str, int, int]]:
    lines = (shared_fixture(name) / "root/proc/modules").read_text().splitlines()
    return [(ln.split()[0], int(ln.split()[1]), int(ln.split()[-1], 16)) for ln in lines]


def test_module_reads_give_code_and_guard_pages_give_zeros(kf) -> None:
    """Each module of proc/modules: mapped code at its base; the guard page after it is zeros."""
    name, f = kf
    seg = _load(name, "KCORE_VMALLOC(modules area)")
    mods = _modules(name)
    starts = {b for _, _, b in mods}
    for mod, size, base in mods:
        off = seg["p_offset"] + base - seg["p_vaddr"]
        pages = (size + PAGE - 1) // PAGE * PAGE
        data = f.pread(pages + PAGE, off)
        assert data[:5] == b"\x0f\x1f\x44\x00\x00", mod  # the ftrace nop every function starts
        assert all(data[i:i + PAGE].strip(b"\0") for i in range(0, PAGE * 2, PAGE)), mod
        if base + pages not in starts:
            assert data[pages:] == bytes(PAGE), mod


def test_vmalloc_area_reads_mapped_pages_and_zeros(kf) -> None:
    """The vmalloc segment: the walk's mapped pages have content, unmapped ones read zeros."""
    name, f = kf
    seg = _load(name, "KCORE_VMALLOC(vmalloc area)")
    runs = f.walker.runs(seg["p_vaddr"], seg["p_filesz"])
    assert runs
    va, pa, n = runs[len(runs) // 2]
    off = seg["p_offset"] + va - seg["p_vaddr"]
    data = f.pread(n + 2 * PAGE, off - PAGE)
    assert data[PAGE:PAGE + n] == MemoryImage(name).read(pa, n)
    if f.walker.translate(va - PAGE) is None:
        assert data[:PAGE] == bytes(PAGE)
    # Far from anything mapped: zeros, fast.
    assert f.pread(1 << 20, seg["p_offset"] + seg["p_filesz"] - (1 << 20) - PAGE) == bytes(1 << 20)


def test_reads_across_segment_boundaries(kf) -> None:
    """Reads of odd sizes across header/data, segment ends and holes equal the pieces."""
    name, f = kf
    m = meta(name)
    image = MemoryImage(name)
    ram0 = next(r for r in m["reads"] if r["file"] == "kcore-ram0.bin")
    want0 = expected_bytes(name, "kcore-ram0.bin")
    end0 = ram0["kcore_offset"] + ram0["length"]
    # The end of the first RAM segment, then the hole kcore has before the next entry.
    got = f.pread(0x3001, end0 - 0x1001)
    assert got == want0[-0x1001:] + bytes(0x2000)
    # A hole, then the start of the second RAM segment (phys 1 MiB).
    ram1 = next(p for p in m["phdrs"] if p.get("kind") == "KCORE_RAM" and p["p_paddr"] == 1 << 20)
    got = f.pread(0x2345, ram1["p_offset"] - 0x123)
    assert got == bytes(0x123) + image.read(1 << 20, 0x2345 - 0x123)
    # The end of the header region (data_offset) into offsets no segment covers: zeros.
    head = expected_bytes(name, "kcore-head-64k.bin")
    at = f.header.data_offset - 0x10
    assert f.pread(0x20, at) == head[at:at + 0x20] == head[at:at + 0x10] + bytes(0x10)
    # Random reads inside RAM of odd size/alignment.
    rng = random.Random(7)
    for _ in range(50):
        pa = rng.randrange(ram1["p_paddr"], ram1["p_paddr"] + ram1["p_filesz"] - 0x20000)
        n = rng.randrange(1, 0x20000)
        off = ram1["p_offset"] + pa - ram1["p_paddr"]
        assert f.pread(n, off) == image.read(pa, n)


def test_file_semantics(kf) -> None:
    """seek/tell/read/readinto behave like a file; past st_size, like Linux 6.1's kcore.

    Measured on the 6.1 guest (tests/vm/test_vm_kcorefile.py checks it against the real file):
    reads past st_size return zeros, and from data_offset on the bytes repeat every 2^47
    (kc_offset_to_vaddr() is o | ~__VIRTUAL_MASK); only a read past 2^63 - 1 fails.
    """
    name, f = kf
    size = f.size()
    assert f.readable() and f.seekable() and not f.writable()
    assert f.seek(0) == 0 and f.read(4) == b"\x7fELF" and f.tell() == 4
    assert f.seek(-0x10, os.SEEK_END) == size - 0x10
    assert f.read(0x100) == bytes(0x100) and f.tell() == size + 0xF0
    assert f.seek(size + 5) == size + 5 and f.read(10) == bytes(10)
    text = next(r for r in meta(name)["reads"] if r["file"] == "kcore-text-2M.bin")
    want = expected_bytes(name, "kcore-text-2M.bin")
    for k in (1, 2, 0xFFFF):
        assert f.pread(0x3000, text["kcore_offset"] + (k << 47)) == want[:0x3000]
    assert f.pread(16, (1 << 47) + 5) == bytes(16)  # the header does not repeat
    assert len(f.pread(64, (1 << 63) - 16)) == 15 and f.pread(1, (1 << 63) - 1) == b""
    f.seek(size - 8)
    assert f.read() == bytes(8) and f.read() == b""  # read(-1) stops at st_size
    buf = bytearray(16)
    f.seek(0)
    assert f.readinto(buf) == 16 and buf[:4] == b"\x7fELF"
    assert f.seek(4, os.SEEK_CUR) == 20
    with pytest.raises(ValueError):
        f.seek(-1)
    f.seek(0)


def test_closed_file_refuses_reads() -> None:
    """After close(), every read raises ValueError (the source fd number may be reused)."""
    name = NOKASLR
    f = kcore.open(str(shared_fixture(name) / "root"), source_spec(name))
    r = next(r for r in meta(name)["reads"] if r["file"] == "kcore-ram0.bin")
    assert f.pread(16, r["kcore_offset"]) == expected_bytes(name, r["file"])[:16]
    f.close()
    assert f.closed and f.source.fd == -1
    for call in (lambda: f.pread(16, r["kcore_offset"]), lambda: f.read(16),
                 lambda: f.readinto(bytearray(16)), lambda: f.preadinto(bytearray(16), 0),
                 lambda: f.seek(0)):
        with pytest.raises(ValueError):
            call()


def test_concurrent_readers_see_the_same_bytes(kf) -> None:
    """Threads reading at random offsets (positional and shared-position) get exact bytes."""
    name, f = kf
    r = next(r for r in meta(name)["reads"] if r["file"] == "kcore-text-2M.bin")
    want = expected_bytes(name, r["file"])
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            at = rng.randrange(0, len(want) - 0x3000)
            n = rng.randrange(1, 0x3000)
            if f.pread(n, r["kcore_offset"] + at) != want[at:at + n]:
                errors.append(f"{seed}: {at:#x}+{n:#x}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # Shared position: every chunk handed out once, no overlap, nothing lost.
    f.seek(r["kcore_offset"])
    got: dict[int, bytes] = {}
    lock = threading.Lock()

    def reader() -> None:
        while True:
            with lock:
                pos = f.tell()
                chunk = f.read(0x10000) if pos < r["kcore_offset"] + len(want) else b""
            if not chunk:
                return
            got[pos] = chunk

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b"".join(got[k] for k in sorted(got))[:len(want)] == want


def test_hotplug_change_is_seen_on_the_next_open(tmp_path: Path) -> None:
    """A memory block going offline: the next KcoreFile has the new RAM list, the old keeps its."""
    from kcore.discover import discover

    fx = shared_fixture(NOKASLR)
    root = tmp_path / "root"
    shutil.copytree(fx / "root", root)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    mem = root / "sys/devices/system/memory"
    for i in range(4):
        (mem / f"memory{i}").mkdir(parents=True)
        (mem / f"memory{i}/state").write_text("online\n")
    system = discover(root, source_spec(NOKASLR))
    try:
        before = KcoreFile(system)
        ram_before = [e for e, _ in before.header.loads if e.type.name == "RAM"]
        assert [e.size for e in ram_before] == [0x9E000, 0x1FEE0000]
        # The block holding 384-512 MiB goes offline: iomem loses it.
        iomem = (root / "proc/iomem").read_text().replace(
            "00100000-1ffdffff : System RAM", "00100000-17ffffff : System RAM")
        (root / "proc/iomem").write_text(iomem)
        (mem / "memory3/state").write_text("offline\n")
        after = KcoreFile(system)
        ram_after = [e for e, _ in after.header.loads if e.type.name == "RAM"]
        assert [e.size for e in ram_after] == [0x9E000, 0x17F00000]
        assert [e.size for e in ram_before] == [0x9E000, 0x1FEE0000]
        assert before.size() == after.size()  # st_size is set by the highest (vmemmap) segment
        # The removed range now reads as zeros; the old file still reads it.
        seg_off = next(o for e, o in before.header.loads if e == ram_before[1])
        pos = seg_off + 0x18000000 - 0x100000
        assert after.pread(PAGE, pos) == bytes(PAGE)
        assert before.pread(PAGE, pos) == MemoryImage(NOKASLR).read(0x18000000, PAGE)
    finally:
        system.close()


def test_real_kcore_source_is_read_at_the_same_offsets() -> None:
    """With a saved real kcore as source, the data comes from its own offsets."""
    name = KASLR
    fx = shared_fixture(name)
    m = meta(name)
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no tmpfs at /dev/shm for a 128 TiB sparse file")
    path = shm / f"kcore-test-kf-{os.getpid()}"
    try:
        with open(path, "wb") as out:
            out.truncate(m["kcore_st_size"])
            out.write(expected_bytes(name, "kcore-head-64k.bin"))
            for r in m["reads"]:
                out.seek(r["kcore_offset"])
                out.write(expected_bytes(name, r["file"]))
        with kcore.open(str(fx / "root"), f"kcore:{path}") as f:
            assert f.pread(0x10000, 0) == expected_bytes(name, "kcore-head-64k.bin")
            for r in m["reads"]:
                assert f.pread(r["length"], r["kcore_offset"]) == expected_bytes(name, r["file"])
    finally:
        path.unlink(missing_ok=True)


# ---- the CLI ---------------------------------------------------------------------------------

def test_cli_read_to_stdout_and_file(tmp_path: Path) -> None:
    """`kcore read` writes the bytes at kcore offsets (hex accepted); -o is 0600, no clobber."""
    name = NOKASLR
    root = str(shared_fixture(name) / "root")
    r = next(r for r in meta(name)["reads"] if r["file"] == "kcore-ram0.bin")
    args = ("read", "--root", root, "--source", source_spec(name),
            "--offset", hex(r["kcore_offset"]), "--length", str(r["length"]))
    res = run_kcore(*args, check=True)
    assert res.stdout == expected_bytes(name, "kcore-ram0.bin")
    out = tmp_path / "ram0.bin"
    run_kcore(*args, "-o", str(out), check=True)
    assert out.read_bytes() == expected_bytes(name, "kcore-ram0.bin")
    assert out.stat().st_mode & 0o777 == 0o600
    res = run_kcore(*args, "-o", str(out))
    assert res.returncode == 1 and b"--force" in res.stderr and len(res.stderr.splitlines()) == 1
    out.write_bytes(b"old")
    run_kcore(*args, "-o", str(out), "--force", check=True)
    assert out.read_bytes() == expected_bytes(name, "kcore-ram0.bin")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    res = run_kcore(*args, "-o", str(link), "--force")
    assert res.returncode == 1 and not (tmp_path / "elsewhere").exists()


def test_cli_read_hostile_source_is_one_line(tmp_path: Path) -> None:
    """A truncated ELF as source: exit 2, one line naming the file and an offset."""
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(20))
    res = run_kcore("read", "--root", str(shared_fixture(NOKASLR) / "root"), "--source",
                    str(bad), "--offset", "0", "--length", "16")
    assert res.returncode == 2
    lines = res.stderr.decode().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "0x0" in lines[0]
    assert "Traceback" not in res.stderr.decode()


def test_vm_ram_seen_through_a_process_pid_source() -> None:
    """pid:PID:START-END@0 over a process mapping the RAM file: kcore reads as the real one."""
    import subprocess
    import sys

    name = NOKASLR
    image = fixture_memory(name)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import mmap, sys\n"
         f"f = open({str(image)!r}, 'rb')\n"
         "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
         "print('ready', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        maps = Path(f"/proc/{child.pid}/maps").read_text().splitlines()
        line = next(ln for ln in maps if ln.endswith(str(image)))
        start, end = line.split()[0].split("-")
        spec = f"pid:{child.pid}:{start}-{end}@0"
        with kcore.open(str(shared_fixture(name) / "root"), spec) as f:
            assert f.source.kind == "pid"
            for r in meta(name)["reads"][:2]:
                assert f.pread(r["length"], r["kcore_offset"]) == expected_bytes(name, r["file"])
    finally:
        child.stdin.close()
        child.wait(timeout=10)


def test_seed_layout_reads_at_its_own_offsets(kf) -> None:
    """layout="2.6": offsets are vaddr - PAGE_OFFSET + elf_buflen; the bytes are the same."""
    name, f = kf
    m = meta(name)
    with kcore.open(str(shared_fixture(name) / "root"), source_spec(name), layout="2.6") as old:
        assert old.header.data_offset != f.header.data_offset or old.header.loads != \
            f.header.loads
        for r in m["reads"][:2]:
            entry, p_offset = next((e, o) for e, o in old.header.loads
                                   if e.vaddr <= r["vaddr"] < e.vaddr + e.size)
            at = p_offset + r["vaddr"] - entry.vaddr
            assert old.pread(r["length"], at) == expected_bytes(name, r["file"])
        assert ELFFile(old).header["e_phnum"] == len(old.header.loads) + 1
        # The seed's read_kcore(): "if (buflen == 0 || *fpos >= size) return 0".
        assert old.pread(16, old.size() - 8) == bytes(8) and old.pread(16, old.size()) == b""


def test_ioremap_pages_read_as_holes(kf) -> None:
    """vmalloc pages that map no System RAM (ioremap: ACPI tables, HPET, BIOS) read zeros.

    vread() treats VM_IOREMAP areas as holes; ioremap() never maps System RAM, so kcore
    zeroes mapped vmalloc pages outside it (tests/vm/test_vm_data.py checks the real kernel).
    """
    name, f = kf
    seg = _load(name, "KCORE_VMALLOC(vmalloc area)")
    ram = [(p["p_paddr"], p["p_paddr"] + p["p_filesz"]) for p in meta(name)["phdrs"]
           if p.get("kind") == "KCORE_RAM"]
    runs = f.walker.runs(seg["p_vaddr"], seg["p_filesz"])
    outside = [(va, pa, n) for va, pa, n in runs if not any(lo <= pa < hi for lo, hi in ram)]
    # iomem: 1ffe0000-1fffffff Reserved (ACPI), fed00000 HPET, f5000 in the BIOS area.
    assert {pa & ~0xFFF for _, pa, _ in outside} >= {0x1FFE0000, 0xFED00000}
    image = MemoryImage(name)
    for va, pa, n in outside:
        off = seg["p_offset"] + va - seg["p_vaddr"]
        assert f.pread(n, off) == bytes(n), hex(va)
        if pa == 0x1FFE0000:  # the ACPI tables are in the RAM image, yet read as a hole
            assert f.walker.read(va, PAGE) == image.read(pa, PAGE) != bytes(PAGE)


def test_without_page_tables_text_uses_pa_symbol_and_vmalloc_reads_zeros() -> None:
    """No init_top_pgt known: text by __pa_symbol still matches; vmalloc/modules read zeros."""
    from kcore.discover import discover

    name = NOKASLR
    system = discover(shared_fixture(name) / "root", source_spec(name))
    try:
        system.addrmap = system.addrmap.with_(pgd_paddr=None)
        f = KcoreFile(system)
        assert f.walker is None
        r = next(r for r in meta(name)["reads"] if r["file"] == "kcore-text-2M.bin")
        assert f.pread(r["length"], r["kcore_offset"]) == expected_bytes(name, r["file"])
        seg = _load(name, "KCORE_VMALLOC(modules area)")
        _, size, base = _modules(name)[0]
        assert f.pread(size, seg["p_offset"] + base - seg["p_vaddr"]) == bytes(size)
    finally:
        system.close()
