"""`kcore dump` on the real-kernel captures: every format checked against what the kernel gave."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.helpers import (
    FIXTURE_NAMES,
    REPO,
    fixture_memory,
    has_file_in,
    run_kcore,
    scratch_dir,
    shared_fixture,
)

NOKASLR, KASLR = FIXTURE_NAMES
LIME = struct.Struct("<IIQQ8s")
PAGE = 4096


def source_spec(name: str) -> str:
    """The memory source of a capture: the raw RAM file, or QEMU's ELF core."""
    mem = fixture_memory(name)
    return f"raw:{mem}" if name == NOKASLR else f"elf:{mem}"


def dump(name: str, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run kcore dump on a capture."""
    root = shared_fixture(name) / "root"
    r = run_kcore("dump", "--root", str(root), "--source", source_spec(name), "-o", str(out),
                  *args)
    if check:
        assert r.returncode == 0, r.stderr.decode()
    return r


def expected(name: str) -> dict:
    """The capture's kcore.json."""
    return json.loads((shared_fixture(name) / "expected" / "kcore.json").read_text())


def expected_bytes(name: str, file: str) -> bytes:
    """A file the real /proc/kcore gave."""
    return (shared_fixture(name) / "expected" / file).read_bytes()


def read_reads(name: str, kind: str) -> list[dict]:
    """The capture's recorded kcore reads of one segment kind whose bytes match the memory."""
    # kcore-ram-16M-8M.bin was read while the kernel ran on: under KASLR 35 of its pages
    # changed before the memory was taken (without KASLR it is kernel text and matches).
    return [r for r in expected(name)["reads"] if r["segment_kind"] == kind
            and not (name == KASLR and r["file"] == "kcore-ram-16M-8M.bin")]


class ElfCore:
    """Reads an ELF core by virtual or physical address (zeros where no PT_LOAD covers)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb")  # noqa: SIM115
        self.elf = ELFFile(self.f)
        self.loads = [s.header for s in self.elf.iter_segments() if s["p_type"] == "PT_LOAD"]

    def read(self, addr: int, length: int, key: str = "p_vaddr") -> bytes:
        out = bytearray(length)
        for h in self.loads:
            lo, hi = max(addr, h[key]), min(addr + length, h[key] + h.p_filesz)
            if lo < hi and h[key] != (1 << 64) - 1:
                self.f.seek(h.p_offset + lo - h[key])
                out[lo - addr:hi - addr] = self.f.read(hi - lo)
        return bytes(out)


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def elf_dump(request):
    name = request.param
    out = scratch_dir(request, "elf") / "mem.elf"
    r = dump(name, out, "--json")
    return name, out, json.loads(r.stdout)


def test_elf_header_notes_and_loads(elf_dump):
    name, out, _ = elf_dump
    core = ElfCore(out)
    h = core.elf.header
    assert h.e_type == "ET_CORE" and h.e_machine == "EM_X86_64"
    segs = list(core.elf.iter_segments())
    assert segs[0]["p_type"] == "PT_NOTE"  # crash requires phdr[0] to be the PT_NOTE
    notes = list(segs[0].iter_notes())
    assert [(n.n_name, n.n_descsz) for n in notes[:3]] == [
        ("CORE", 336), ("CORE", 136), ("CORE", expected(name)["notes"][2]["descsz"])]
    assert notes[3].n_name == "VMCOREINFO"
    vmcoreinfo = notes[3].n_desc
    vmcoreinfo = vmcoreinfo.encode() if isinstance(vmcoreinfo, str) else vmcoreinfo
    assert vmcoreinfo.decode() == expected(name)["notes"][3]["text"]
    # Loads with file bytes, and zero-fill loads (p_filesz 0) where zero runs were left out;
    # p_align 0 as in kdump's vmcores (crash then reads it as a kdump: KASLR from VMCOREINFO).
    data = [p for p in core.loads if p.p_filesz]
    assert data and all(p.p_filesz == p.p_memsz for p in data)
    assert any(p.p_filesz == 0 < p.p_memsz for p in core.loads)
    assert all(p.p_offset % PAGE == 0 and p.p_align == 0 for p in core.loads)
    # The real kcore's TEXT and RAM p_vaddr/p_paddr pairs: each dumped load lies inside one,
    # and together the loads cover every byte of them.
    kc = [p for p in expected(name)["phdrs"] if p["type"] == "PT_LOAD"
          and p["p_paddr"] != (1 << 64) - 1]
    covered = {id(k): 0 for k in kc}
    for p in core.loads:
        home = [k for k in kc if k["p_vaddr"] <= p.p_vaddr and p.p_vaddr + p.p_memsz <=
                k["p_vaddr"] + k["p_memsz"] and p.p_paddr - k["p_paddr"] == p.p_vaddr -
                k["p_vaddr"]]
        assert len(home) == 1, hex(p.p_vaddr)
        covered[id(home[0])] += p.p_memsz
    assert all(covered[id(k)] == k["p_memsz"] for k in kc), [hex(k["p_vaddr"]) for k in kc]


def test_elf_holds_the_real_kcore_reads(elf_dump):
    name, out, _ = elf_dump
    core = ElfCore(out)
    for kind in ("KCORE_TEXT", "KCORE_RAM"):
        for r in read_reads(name, kind):
            data = expected_bytes(name, r["file"])
            assert core.read(r["vaddr"], r["length"]) == data, r["file"]
            assert core.read(r["paddr"], r["length"], "p_paddr") == data, r["file"]


def test_elf_sidecars_and_summary(elf_dump):
    name, out, summary = elf_dump
    for p in (out, Path(f"{out}.sha256"), Path(f"{out}.json")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    subprocess.run(["sha256sum", "-c", out.name + ".sha256"], cwd=out.parent, check=True,
                   capture_output=True)
    manifest = json.loads(Path(f"{out}.json").read_text())
    assert manifest["kernel_release"] == "6.1.0-56-amd64"
    assert manifest["sha256"] == summary["sha256"]
    assert {"source", "root", "ranges", "pages_zero_filled", "tool", "started",
            "finished"} <= manifest.keys()
    assert summary["bytes"] == out.stat().st_size
    assert summary["bytes_elided"] > 0 and summary["pages_zero_filled"] == 0
    assert summary["bytes_copied"] + summary["bytes_elided"] >= 512 << 20


def test_elf_without_text_and_dense(tmp_path):
    out = tmp_path / "dense.elf"
    dump(NOKASLR, out, "--no-text", "--no-elide")
    core = ElfCore(out)
    assert [hex(p.p_paddr) for p in core.loads] == ["0x1000", "0x100000"]  # the RAM ranges
    ram = fixture_memory(NOKASLR).read_bytes()[:512 << 20]
    assert core.read(0x100000, 64 << 20, "p_paddr") == ram[0x100000:0x4100000]


def parse_lime(data: bytes) -> list[tuple[int, int, int]]:
    """(start, inclusive end, data offset) of each range of a LiME image."""
    out, pos = [], 0
    while pos < len(data):
        magic, version, start, end, _ = LIME.unpack_from(data, pos)
        assert (magic, version) == (0x4C694D45, 1)
        out.append((start, end, pos + LIME.size))
        pos += LIME.size + end - start + 1
    assert pos == len(data)
    return out


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_lime_ranges_hold_ram(name, tmp_path):
    out = tmp_path / "mem.lime"
    dump(name, out, "--format", "lime")
    data = out.read_bytes()
    ranges = parse_lime(data)
    ram = [(p["p_paddr"], p["p_memsz"]) for p in expected(name)["phdrs"]
           if p.get("kind", p["type"]) != "PT_NOTE" and p["p_paddr"] not in (
               (1 << 64) - 1,) and p["p_vaddr"] < 0xffffffff80000000]
    for start, end, _ in ranges:  # every LiME range lies in one System RAM range
        assert any(s <= start and end < s + n for s, n in ram), hex(start)
    r = read_reads(name, "KCORE_RAM")[0]
    mem = bytearray(r["length"])  # elided zero runs stay zero
    for start, end, off in ranges:
        lo, hi = max(start, r["paddr"]), min(end + 1, r["paddr"] + r["length"])
        if lo < hi:
            mem[lo - r["paddr"]:hi - r["paddr"]] = data[off + lo - start: off + hi - start]
    assert bytes(mem) == expected_bytes(name, r["file"])


def test_raw_and_padded_read_back(tmp_path):
    raw, padded = tmp_path / "mem.raw", tmp_path / "mem.img"
    dump(NOKASLR, raw, "--format", "raw")
    dump(NOKASLR, padded, "--format", "padded")
    ram0 = expected_bytes(NOKASLR, "kcore-ram0.bin")
    with open(raw, "rb") as f:
        f.seek(0x1000)
        assert f.read(len(ram0)) == ram0  # file offset = physical address
    assert raw.stat().st_size == padded.stat().st_size == 0x20000000 - 0x20000
    assert raw.stat().st_blocks * 512 < padded.stat().st_blocks * 512  # holes vs dense
    subprocess.run(["cmp", str(raw), str(padded)], check=True)
    # Read back by kcore's own raw source: the text the kernel showed through kcore.
    text = read_reads(NOKASLR, "KCORE_TEXT")[0]
    r = run_kcore("dump", "--root", str(shared_fixture(NOKASLR) / "root"), "--source",
                  f"raw:{raw}", "-o", str(tmp_path / "again.elf"), "--json")
    assert r.returncode == 0, r.stderr.decode()
    core = ElfCore(tmp_path / "again.elf")
    assert core.read(text["vaddr"], text["length"]) == expected_bytes(NOKASLR, text["file"])


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_kcore_format_is_the_real_kcore(name):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no tmpfs at /dev/shm for a 128 TiB sparse file")
    out = Path("/dev/shm") / f"kcore-test-{os.getpid()}-{name}.kcore"
    try:
        dump(name, out, "--format", "kcore")
        exp = expected(name)
        assert out.stat().st_size == exp["kcore_st_size"]
        head = expected_bytes(name, "kcore-head-64k.bin")
        note = exp["phdrs"][0]
        data_offset = -(-(note["p_offset"] + note["p_filesz"]) // PAGE) * PAGE
        with open(out, "rb") as f:
            mine = bytearray(f.read(data_offset))
            elf = ELFFile(f)
            task = [n for n in elf.get_segment(0).iter_notes() if n.n_type == "NT_TASKSTRUCT"]
        real = bytearray(head[:data_offset])
        # NT_TASKSTRUCT holds the reading task's own task_struct: only its size can match.
        size = task[0].n_descsz
        off = task[0].n_offset + 12 + 8  # Elf64_Nhdr, then "CORE\0" padded to 8
        mine[off:off + size] = real[off:off + size] = bytes(size)
        assert mine == real
        with open(out, "rb") as f:
            for r in read_reads(name, "KCORE_TEXT") + read_reads(name, "KCORE_RAM"):
                f.seek(r["kcore_offset"])
                assert f.read(r["length"]) == expected_bytes(name, r["file"]), r["file"]
    finally:
        for p in (out, *out.parent.glob(f"{out.name}.*")):  # and every sidecar (.symbols)
            p.unlink(missing_ok=True)


def test_kcore_format_on_ext4_says_why(tmp_path):
    if subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                      text=True).stdout.strip() != "ext2/ext3":
        pytest.skip("needs an ext4 tmp_path")
    r = dump(NOKASLR, tmp_path / "k.kcore", "--format", "kcore", check=False)
    assert r.returncode == 1
    assert b"cannot hold a 128.0 TiB sparse file" in r.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", ["elf", "lime"])
def test_stdout_to_a_pipe(fmt, tmp_path):
    root = shared_fixture(NOKASLR) / "root"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = ["python3", "-m", "kcore", "dump", "--root", str(root), "--source",
           source_spec(NOKASLR), "--format", fmt, "-o", "-", "--quiet"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    h = hashlib.sha256()
    size = 0
    while chunk := p.stdout.read(1 << 20):
        h.update(chunk)
        size += len(chunk)
    assert p.wait() == 0, p.stderr.read().decode()
    dump(NOKASLR, tmp_path / f"file.{fmt}", "--format", fmt)
    assert size == (tmp_path / f"file.{fmt}").stat().st_size
    assert f"{h.hexdigest()}  file.{fmt}\n" == (tmp_path / f"file.{fmt}.sha256").read_text()


@pytest.mark.parametrize("threads", ["1", "2"])
def test_stdout_reader_going_away(threads):
    """`kcore dump -o - | head -c 1M`: exit 1, nothing on stderr (no traceback)."""
    root = shared_fixture(NOKASLR) / "root"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = ["python3", "-m", "kcore", "dump", "--root", str(root), "--source",
           source_spec(NOKASLR), "--format", "lime", "-o", "-", "--quiet", "--threads", threads]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert len(p.stdout.read(1 << 20)) == 1 << 20
    p.stdout.close()
    assert p.wait(timeout=60) == 1
    assert p.stderr.read() == b""


def test_stdout_refused_for_seeking_formats(tmp_path):
    r = dump(NOKASLR, Path("-"), "--format", "raw", check=False)
    assert r.returncode == 2 and b"cannot go to stdout" in r.stderr


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "mem.lime"
    out.write_bytes(b"precious")
    r = dump(NOKASLR, out, "--format", "lime", check=False)
    assert r.returncode == 1 and b"already exists; use --force" in r.stderr
    assert out.read_bytes() == b"precious"
    dump(NOKASLR, out, "--format", "lime", "--force")
    assert out.read_bytes()[:4] == b"EMiL"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_symlink_output_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "mem.elf").symlink_to(victim)
    for extra in ((), ("--force",)):
        r = dump(NOKASLR, tmp_path / "mem.elf", *extra, check=False)
        assert r.returncode == 1 and b"symbolic link" in r.stderr
    assert victim.read_bytes() == b"keep"


def test_free_space_checked_up_front(small_tmpfs):
    r = dump(NOKASLR, small_tmpfs / "mem.elf", check=False)
    assert r.returncode == 1 and b"not enough space" in r.stderr
    assert os.listdir(small_tmpfs) == []


def test_compressed_kdump_starts_where_only_its_bound_does_not_fit(small_tmpfs):
    """A compressed kdump is refused up front only when its headers do not fit: its bound
    (every kept page stored whole) may pass the free space while the dump fits, as a 64 GiB
    guest's -d 1 dump (17 GB) was refused beside 50 GB free. It warns instead; a dump that
    does not fit after all ends as any full disk does: one line, nothing left."""
    subprocess.run(["mount", "-o", "remount,size=40m", str(small_tmpfs)], check=True)
    r = dump(NOKASLR, small_tmpfs / "mem.kdump", "--format", "kdump", "-d", "31", "--json")
    res = json.loads(r.stdout)
    assert res["compression"]["input_bytes"] > 40 << 20 > res["bytes"], res["compression"]
    assert any("may need up to" in w for w in res["warnings"]), res["warnings"]
    r = dump(NOKASLR, small_tmpfs / "all.kdump", "--format", "kdump", "-d", "1", check=False)
    assert r.returncode == 1 and b"space" in r.stderr and b"Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr
    assert sorted(os.listdir(small_tmpfs)) == ["mem.kdump", "mem.kdump.json", "mem.kdump.sha256"]


def test_enospc_mid_dump_leaves_nothing(small_tmpfs):
    # raw is sparse: the up-front check passes on its estimate, the copy then runs out.
    subprocess.run(["mount", "-o", "remount,size=600m", str(small_tmpfs)], check=True)
    ballast = small_tmpfs / "ballast"
    subprocess.run(["fallocate", "-l", "500m", str(ballast)], check=True)
    r = dump(NOKASLR, small_tmpfs / "mem.img", "--format", "padded", check=False)
    ballast.unlink()
    assert r.returncode == 1, r.stderr
    assert b"space" in r.stderr and b"Traceback" not in r.stderr
    assert os.listdir(small_tmpfs) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_nothing(sig, tmp_path):
    root = shared_fixture(NOKASLR) / "root"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "mem.img"
    p = subprocess.Popen(["python3", "-m", "kcore", "dump", "--root", str(root), "--source",
                          source_spec(NOKASLR), "--format", "padded", "-o", str(out)],
                         stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 30
    while not has_file_in(p.pid, tmp_path):  # the output, unnamed (O_TMPFILE) or not
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    p.send_signal(sig)
    err = p.communicate(timeout=30)[1]
    if p.returncode == 0:
        pytest.skip("the dump finished before the signal arrived")
    assert p.returncode == 130, err
    assert b"interrupted" in err and b"Traceback" not in err
    assert os.listdir(tmp_path) == []


class _MemSource:
    """Three pages of this process's memory via /proc/self/mem, the middle one unmapped."""

    def __init__(self) -> None:
        import mmap

        self.map = mmap.mmap(-1, 3 * PAGE)
        self.map.write(b"\x11" * (3 * PAGE))
        import ctypes

        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        assert libc.munmap(self.addr + PAGE, PAGE) == 0  # reads of it fail with EIO
        self.fd = os.open("/proc/self/mem", os.O_RDONLY)
        from kcore.sources.base import Extent

        self.extents = [Extent(0, 3 * PAGE, self.addr)]

    def close(self) -> None:
        os.close(self.fd)


def test_unreadable_pages_are_zeros_or_strict_failure(tmp_path):
    from kcore.errors import FaultError
    from kcore.formats.plan import Copy, Plan
    from kcore.formats.segments import Segment
    from kcore.formats.write import write_plan
    from kcore.formats.zeroruns import nonzero_runs
    from kcore.output import open_output

    src = _MemSource()
    layout = Plan([Copy(0, src.addr, 3 * PAGE)], 3 * PAGE)
    with open_output(str(tmp_path / "lax.raw")) as out:
        stats = write_plan(out, src, layout, sparse=True, strict=False)
        out.commit(layout.size)
    assert stats.pages_zero_filled == 1
    data = (tmp_path / "lax.raw").read_bytes()
    assert data == b"\x11" * PAGE + bytes(PAGE) + b"\x11" * PAGE
    with pytest.raises(FaultError):
        with open_output(str(tmp_path / "strict.raw")) as out:
            write_plan(out, src, layout, sparse=True, strict=True)
    assert os.listdir(tmp_path) == ["lax.raw"]  # nothing of the failed dump
    from kcore.engine import CopyStats

    seg = Segment.linear("ram", 0, 0, 3 * PAGE)
    st = CopyStats()
    assert nonzero_runs(src, seg, PAGE, False, st) == [(0, PAGE), (2 * PAGE, PAGE)]
    assert st.pages_zero_filled == 1
    with pytest.raises(FaultError):
        nonzero_runs(src, seg, PAGE, True, CopyStats())
    src.close()


def test_vmalloc_and_modules_match_kcorefile(tmp_path):
    import kcore

    out = tmp_path / "v.elf"
    dump(NOKASLR, out, "--vmalloc", "--modules", "--no-digest")
    core = ElfCore(out)
    root = shared_fixture(NOKASLR) / "root"
    modules = [int(line.split()[5], 16) for line in (root / "proc/modules").read_text()
               .splitlines()]
    # vmallocinfo's addresses are hashed (kptr_restrict): take the mapped pages found.
    loaded = [p for p in core.loads if p.p_paddr == (1 << 64) - 1]  # kcore's p_paddr rule
    vmalloc = [p.p_vaddr for p in loaded if p.p_vaddr < 0xffffffff80000000][:50]
    assert modules and vmalloc
    with kcore.open(str(root), f"raw:{fixture_memory(NOKASLR)}") as f:
        loads = f.header.loads
        for va in modules + vmalloc:
            entry, off = next((e, o) for e, o in loads if e.vaddr <= va < e.vaddr + e.size)
            want = f.pread(PAGE, off + va - entry.vaddr)
            assert core.read(va, PAGE) == want, hex(va)
        assert any(core.read(va, PAGE).strip(b"\0") for va in modules)


def test_zero_runs_coarsen_to_the_phdr_limit(tmp_path):
    from kcore.formats.plan import Request
    from kcore.formats.segments import Segment
    from kcore.formats.zeroruns import split_segments
    from kcore.sources import open_source

    pages = [bytes(PAGE) if i % 3 else os.urandom(PAGE) for i in range(300)]
    image = tmp_path / "mem.raw"
    image.write_bytes(b"".join(pages))
    with open_source(f"raw:{image}") as src:
        segs = [Segment.linear("ram", 0xffff888000000000, 0, 150 * PAGE),
                Segment.linear("ram", 0xffff888000000000 + 150 * PAGE, 150 * PAGE, 150 * PAGE)]
        req = Request(None, src, granule=PAGE)
        fine, elided, _ = split_segments(req, segs, 1000)
        assert len(fine) == 100 and elided == 200 * PAGE  # every data page alone
        for limit in (2, 7, 50):
            parts, elided, _ = split_segments(req, segs, limit)
            assert len(parts) <= limit
            covered = {p.paddr // PAGE + i for p in parts for i in range(p.size // PAGE)}
            assert {i for i in range(300) if i % 3 == 0} <= covered  # no data page lost
            assert all(p.vaddr - p.paddr == 0xffff888000000000 for p in parts)
            assert all(s.paddr <= p.paddr and p.paddr + p.size <= s.paddr + s.size
                       for p in parts for s in segs if s.paddr <= p.paddr < s.paddr + s.size)


def test_lime_reads_back_through_the_lime_source(tmp_path):
    lime, raw, again = tmp_path / "mem.lime", tmp_path / "mem.raw", tmp_path / "again.raw"
    dump(NOKASLR, lime, "--format", "lime", "--no-digest")
    dump(NOKASLR, raw, "--format", "raw", "--no-digest")
    root = shared_fixture(NOKASLR) / "root"
    r = run_kcore("dump", "--root", str(root), "--source", f"lime:{lime}", "--format", "raw",
                  "--no-digest", "-o", str(again))
    assert r.returncode == 0, r.stderr.decode()
    subprocess.run(["cmp", str(raw), str(again)], check=True)  # elided runs read back as zeros


def test_elf_reads_back_through_the_elf_source(tmp_path):
    elf, raw, again = tmp_path / "mem.elf", tmp_path / "mem.raw", tmp_path / "again.raw"
    dump(NOKASLR, elf, "--no-digest")
    dump(NOKASLR, raw, "--format", "raw", "--no-digest")
    root = shared_fixture(NOKASLR) / "root"
    r = run_kcore("dump", "--root", str(root), "--source", f"elf:{elf}", "--format", "raw",
                  "--no-digest", "-o", str(again))
    assert r.returncode == 0, r.stderr.decode()
    subprocess.run(["cmp", str(raw), str(again)], check=True)


def test_kcore_format_refuses_unseekable_outputs():
    r = dump(NOKASLR, Path("/dev/full"), "--format", "kcore", check=False)
    assert r.returncode == 2 and b"needs a seekable file" in r.stderr


def test_bad_option_combinations_say_why(tmp_path):
    for args, text in ((("--format", "lime", "--vmalloc"), b"--vmalloc applies to --format elf"),
                       (("--format", "raw", "--no-text"), b"--no-text applies"),
                       (("--granule", "5000"), b"must be a power of two"),
                       (("--threads", "17"), b"--threads 17 must be from 0"),
                       (("--json",), b"--json prints to stdout")):
        out = Path("-") if args == ("--json",) else tmp_path / "x"
        r = dump(NOKASLR, out, *args, check=False)
        assert r.returncode == 2 and text in r.stderr, (args, r.stderr)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_elf_one_pass_equals_two_passes(name, tmp_path):
    # --no-digest to a file: one pass (headers written last); with the digest, and to a
    # stream: a zero-run scan, then the copy. The same bytes either way.
    one, two = tmp_path / "one.elf", tmp_path / "two.elf"
    dump(name, one, "--no-digest", "--json")
    r = dump(name, two, "--json")
    assert one.read_bytes() == two.read_bytes()
    assert hashlib.sha256(one.read_bytes()).hexdigest() == json.loads(r.stdout)["sha256"]
    with one.open("rb") as f:
        elf = ELFFile(f)
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_filesz"]]
        assert elf.get_segment(0)["p_type"] == "PT_NOTE"
        assert all(s["p_filesz"] == s["p_memsz"] > 0 and s["p_offset"] % PAGE == 0
                   and s["p_paddr"] % PAGE == 0 for s in loads)
        assert [s["p_offset"] for s in loads[1:]] == [s["p_offset"] + s["p_filesz"]
                                                      for s in loads[:-1]]  # packed
        assert loads[-1]["p_offset"] + loads[-1]["p_filesz"] == one.stat().st_size


DIRECT_MAP = 0xffff888000000000


def _one_ram_system(size: int, monkeypatch):
    """A system whose kclist is one RAM range of `size` bytes at physical 0 (notes stubbed)."""
    from types import SimpleNamespace

    import kcore.elfcore

    monkeypatch.setattr(kcore.elfcore, "build_notes", lambda *a: b"notes")
    kclist = SimpleNamespace(entries=[SimpleNamespace(type="KCORE_RAM", vaddr=DIRECT_MAP,
                                                      paddr=0, size=size)])
    return SimpleNamespace(addrmap=SimpleNamespace(page_size=PAGE, arch="x86_64"),
                           kclist=kclist)


def test_packed_runs_coarsen_to_the_reserved_headers(tmp_path, monkeypatch):

    from kcore.formats import elf
    from kcore.formats.plan import Request
    from kcore.sources import open_source

    pages = [bytes(PAGE) if i % 3 else os.urandom(PAGE) for i in range(300)]
    image = tmp_path / "mem.raw"
    image.write_bytes(b"".join(pages))
    system = _one_ram_system(300 * PAGE, monkeypatch)
    monkeypatch.setattr(elf, "PACK_CHUNK", 64 * PAGE)
    for limit in (13, 19, 80, 2000):  # program headers: room for 6, 9, 39, 999 data loads
        monkeypatch.setattr(elf, "MAX_LOADS", limit)
        with open_source(f"raw:{image}") as src:
            req = Request(system, src, granule=PAGE)
            fr = elf.frame(req)
            assert fr is not None and fr.max_loads <= limit
            out = tmp_path / f"core-{limit}"
            fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                layout, stats = elf.pack(req, fr, fd)
            finally:
                os.close(fd)
        data = out.read_bytes()
        assert len(layout.ranges) <= min(limit, fr.max_loads)
        # The two-pass path's threaded scan into /dev/null keeps the same runs.
        with open_source(f"raw:{image}") as src:
            req = Request(system, src, granule=PAGE, threads=3)
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                scanned = elf.pack(req, elf.frame(req), null, scan=True)[0]
            finally:
                os.close(null)
        assert scanned.ranges == layout.ranges and scanned.size == layout.size
        if limit == 2000:
            assert len(layout.ranges) == 100 and layout.elided == 200 * PAGE  # pages alone
        elf_file = ELFFile(io.BytesIO(layout.items[0].data))  # the header pack() laid out
        assert elf_file.num_segments() <= limit + 1  # the PT_NOTE and the loads
        zero_fill = [(s["p_paddr"], s["p_memsz"]) for s in elf_file.iter_segments()
                     if s["p_type"] == "PT_LOAD" and s["p_filesz"] == 0]
        # the zero-fill loads and the data loads tile the 300 pages
        assert sum(n for _p, n in zero_fill) + sum(r["size"] for r in layout.ranges) == 300 * PAGE
        assert all(not any(b"".join(pages)[p:p + n]) for p, n in zero_fill)
        mem = bytearray(300 * PAGE)
        for r in layout.ranges:
            pa = int(r["paddr"], 16)
            assert int(r["vaddr"], 16) - pa == DIRECT_MAP and pa % PAGE == 0
            mem[pa:pa + r["size"]] = data[r["offset"]:r["offset"] + r["size"]]
        assert bytes(mem) == b"".join(pages)  # no data page lost, elided runs are zeros
        assert layout.size == len(data) and stats.bytes_read == 300 * PAGE


def test_unpacked_elf_headers_fit_with_their_zero_fill_loads(monkeypatch, tmp_path):
    """Where the packed layout does not apply, runs are merged until the data loads and the
    zero-fill loads between them fit e_phnum; the bytes stay the memory's."""

    from kcore.formats import elf
    from kcore.formats.plan import Request
    from kcore.sources import open_source

    pages = [bytes(PAGE) if i % 3 else os.urandom(PAGE) for i in range(300)]
    image = tmp_path / "mem.raw"
    image.write_bytes(b"".join(pages))
    system = _one_ram_system(300 * PAGE, monkeypatch)
    monkeypatch.setattr(elf, "PACK_CHUNK", 3 * PAGE)  # not a multiple of the granule: unpacked
    for limit in (7, 30, 150, 1000):
        monkeypatch.setattr(elf, "MAX_LOADS", limit)
        with open_source(f"raw:{image}") as src:
            req = Request(system, src, granule=2 * PAGE)
            assert elf.frame(req) is None
            layout = elf.plan(req)
        head = ELFFile(io.BytesIO(layout.items[0].data))
        assert head.num_segments() <= limit + 1
        loads = [seg for seg in head.iter_segments() if seg["p_type"] == "PT_LOAD"]
        assert sum(seg["p_memsz"] for seg in loads) == 300 * PAGE  # every byte described
        mem = b"".join(pages)
        for seg in loads:
            if seg["p_filesz"] == 0:
                assert not any(mem[seg["p_paddr"]:seg["p_paddr"] + seg["p_memsz"]])
        if limit == 1000:
            assert len(layout.ranges) == 50  # 8 KiB granules: pages 0-3, 6-9...: nothing merged


def test_packed_elf_unreadable_pages_are_zeros_or_strict_failure(tmp_path, monkeypatch):

    from kcore.errors import FaultError
    from kcore.formats import elf
    from kcore.formats.plan import Request

    src = _MemSource()
    system = _one_ram_system(3 * PAGE, monkeypatch)
    out = tmp_path / "core"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        req = Request(system, src, granule=PAGE)
        layout, stats = elf.pack(req, elf.frame(req), fd)
        assert stats.pages_zero_filled == 1 and layout.elided == PAGE
        assert [(r["paddr"], r["size"]) for r in layout.ranges] == [("0x0", PAGE),
                                                                    ("0x2000", PAGE)]
        req = Request(system, src, granule=PAGE, strict=True)
        with pytest.raises(FaultError, match="cannot read physical 0x1000"):
            elf.pack(req, elf.frame(req), fd)
        # The threaded scan (one chunk a page here): the same runs, the same strict error.
        monkeypatch.setattr(elf, "PACK_CHUNK", PAGE)
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            req = Request(system, src, granule=PAGE, threads=2)
            scanned, st = elf.pack(req, elf.frame(req), null, scan=True)
            assert scanned.ranges == layout.ranges and st.pages_zero_filled == 1
            req = Request(system, src, granule=PAGE, strict=True, threads=2)
            with pytest.raises(FaultError, match="cannot read physical 0x1000"):
                elf.pack(req, elf.frame(req), null, scan=True)
        finally:
            os.close(null)
    finally:
        os.close(fd)
        src.close()
