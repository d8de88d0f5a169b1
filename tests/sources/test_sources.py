"""Memory sources: real-kernel captures read through each source, and hostile inputs."""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import shutil
import struct
from pathlib import Path

import pytest
from elftools.construct import Container
from elftools.elf.structs import ELFStructs

from kcore.addrmap import ALL_ONES
from kcore.errors import ElfFormatError, LimeFormatError, SourceError
from kcore.sources import open_source
from tests.helpers import fixture_memory, shared_fixture

KASLR = "linux-6.1.0-56-kaslr-512M"
NOKASLR = "linux-6.1.0-56-nokaslr-512M"

ELF = ELFStructs(little_endian=True, elfclass=64)
ELF.create_basic_structs()
ELF.create_advanced_structs("ET_CORE", "EM_X86_64", "ELFOSABI_SYSV")
LIME_MAGIC, AVML_MAGIC = 0x4C694D45, 0x4C4D5641


def expected(name: str) -> tuple[Path, dict]:
    """A capture's expected/ folder and its kcore.json."""
    folder = shared_fixture(name) / "expected"
    return folder, json.loads((folder / "kcore.json").read_text())


def expected_read(name: str, file: str) -> tuple[dict, bytes]:
    """One entry of kcore.json `reads` and the bytes the real /proc/kcore gave there."""
    folder, meta = expected(name)
    entry = next(r for r in meta["reads"] if r["file"] == file)
    return entry, (folder / file).read_bytes()


def ehdr(phnum: int, phoff: int = 64, shoff: int = 0, shnum: int = 0) -> bytes:
    """An ELF64 ET_CORE x86-64 header."""
    ident = Container(EI_MAG=b"\x7fELF", EI_CLASS="ELFCLASS64", EI_DATA="ELFDATA2LSB",
                      EI_VERSION="EV_CURRENT", EI_OSABI="ELFOSABI_SYSV", EI_ABIVERSION=0)
    return ELF.Elf_Ehdr.build(Container(
        e_ident=ident, e_type="ET_CORE", e_machine="EM_X86_64", e_version="EV_CURRENT",
        e_entry=0, e_phoff=phoff, e_shoff=shoff, e_flags=0, e_ehsize=64, e_phentsize=56,
        e_phnum=phnum, e_shentsize=64 if shnum else 0, e_shnum=shnum, e_shstrndx=0))


def phdr(p_type: str, offset: int, vaddr: int, paddr: int, size: int) -> bytes:
    """An ELF64 program header."""
    return ELF.Elf_Phdr.build(Container(
        p_type=p_type, p_flags=7, p_offset=offset, p_vaddr=vaddr, p_paddr=paddr,
        p_filesz=size, p_memsz=size, p_align=4096))


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note with 4-byte padding."""
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)
    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def build_elf(loads: list[tuple[int, bytes]], notes: bytes = b"") -> bytes:
    """A physical ELF core: a PT_NOTE and one PT_LOAD per (paddr, data)."""
    nph = len(loads) + 1
    pos = 64 + nph * 56
    hdrs = [phdr("PT_NOTE", pos, 0, 0, len(notes))]
    blob = notes
    pos += len(notes)
    for paddr, data in loads:
        hdrs.append(phdr("PT_LOAD", pos, 0, paddr, len(data)))
        blob += data
        pos += len(data)
    return ehdr(nph) + b"".join(hdrs) + blob


def lime_range(s_addr: int, data: bytes, magic: int = LIME_MAGIC, version: int = 1,
               e_addr: int | None = None) -> bytes:
    """One LiME range: the 32-byte header then the bytes."""
    end = s_addr + len(data) - 1 if e_addr is None else e_addr
    return struct.pack("<IIQQ8s", magic, version, s_addr, end, bytes(8)) + data


# ---- real captures, through each source ----------------------------------------------------

def test_qemu_vmcore_elf_reads_like_kcore() -> None:
    """QEMU's dump-guest-memory core (phdrs after the section headers) reads like /proc/kcore."""
    path = fixture_memory(KASLR)
    for spec in (f"elf:{path}", str(path)):
        with open_source(spec) as src:
            assert src.kind == "elf"
            assert src.extents[0].paddr == 0 and src.extents[0].length == 512 << 20
            for file in ("kcore-ram0.bin", "kcore-text-2M.bin"):
                entry, want = expected_read(KASLR, file)
                data, stats = src.read_phys(entry["paddr"], entry["length"])
                assert data == want
                assert stats.pages_zero_filled == 0


def test_qemu_vmcore_carries_the_kernels_vmcoreinfo() -> None:
    """The VMCOREINFO note QEMU saved is the one the guest's /proc/kcore showed."""
    _, meta = expected(KASLR)
    vmci = next(n for n in meta["notes"] if n["name"] == "VMCOREINFO")
    with open_source(str(fixture_memory(KASLR))) as src:
        assert hashlib.sha256(src.vmcoreinfo).hexdigest() == vmci["desc_sha256"]


@pytest.mark.parametrize("kind", ["raw", "padded", None])
def test_raw_image_reads_like_kcore(kind: str | None) -> None:
    """A raw RAM file (offset = physical address) reads like /proc/kcore at RAM and text."""
    path = fixture_memory(NOKASLR)
    with open_source(f"{kind}:{path}" if kind else str(path)) as src:
        assert src.kind == (kind or "raw")
        assert src.vmcoreinfo is None
        for file in ("kcore-ram0.bin", "kcore-text-2M.bin"):
            entry, want = expected_read(NOKASLR, file)
            assert src.read_phys(entry["paddr"], entry["length"])[0] == want


def _lime_from_raw(tmp_path: Path, ranges: list[tuple[int, int]]) -> Path:
    """A LiME file holding the given (paddr, length) ranges of the nokaslr RAM image."""
    raw = fixture_memory(NOKASLR)
    out = tmp_path / "mem.lime"
    with open(raw, "rb") as f, open(out, "wb") as o:
        for paddr, length in ranges:
            o.write(lime_range(paddr, os.pread(f.fileno(), length, paddr)))
    return out


def test_lime_reads_like_kcore(tmp_path: Path) -> None:
    """A LiME image of RAM ranges reads like /proc/kcore; holes read as counted zeros."""
    ram0, want0 = expected_read(NOKASLR, "kcore-ram0.bin")
    text, want_text = expected_read(NOKASLR, "kcore-text-2M.bin")
    path = _lime_from_raw(tmp_path, [(0x1000, 0x9EC00), (text["paddr"], text["length"])])
    for spec in (f"lime:{path}", str(path)):
        with open_source(spec) as src:
            assert src.kind == "lime"
            assert [(e.paddr, e.length) for e in src.extents] == [
                (0x1000, 0x9EC00), (text["paddr"], text["length"])]
            assert src.read_phys(ram0["paddr"], ram0["length"])[0] == want0
            assert src.read_phys(text["paddr"], text["length"])[0] == want_text
            # Across the end of the first range into the hole: data, then zeros.
            data, stats = src.read_phys(0x9F000, 0x3000)
            with open(fixture_memory(NOKASLR), "rb") as raw:
                assert data[:0xC00] == os.pread(raw.fileno(), 0xC00, 0x9F000)
            assert data[0xC00:] == bytes(0x2400)
            assert stats.pages_zero_filled == 3


def test_kcore_file_source(tmp_path: Path) -> None:
    """A saved /proc/kcore (real header, sparse data) is detected; p_paddr gives physical."""
    folder, meta = expected(KASLR)
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no tmpfs for a 128 TiB sparse file")
    path = shm / f"kcore-test-{os.getpid()}"
    try:
        with open(path, "wb") as f:
            f.write((folder / "kcore-head-64k.bin").read_bytes())
            for r in meta["reads"][:2]:
                f.seek(r["kcore_offset"])
                f.write((folder / r["file"]).read_bytes())
            f.truncate(meta["kcore_st_size"])
        for spec in (f"kcore:{path}", str(path)):
            with open_source(spec) as src:
                assert src.kind == "kcore"
                loads = [p for p in meta["phdrs"] if p["type"] == "PT_LOAD"]
                assert [(s.vaddr, s.paddr, s.offset, s.size) for s in src.segments] == [
                    (p["p_vaddr"], p["p_paddr"], p["p_offset"], p["p_filesz"]) for p in loads]
                ram = [p for p in loads if p["kind"] == "KCORE_RAM"]
                assert [(e.paddr, e.length, e.offset) for e in src.extents] == [
                    (p["p_paddr"], p["p_filesz"], p["p_offset"]) for p in ram]
                vmci = next(n for n in meta["notes"] if n["name"] == "VMCOREINFO")
                assert src.vmcoreinfo.decode() == vmci["text"]
                ram0, text = meta["reads"][1], meta["reads"][0]
                want = (folder / ram0["file"]).read_bytes()
                assert src.read_phys(ram0["paddr"], ram0["length"])[0] == want
                want = (folder / text["file"]).read_bytes()[:4096]
                assert src.read_kcore(text["kcore_offset"], 4096) == want
    finally:
        path.unlink(missing_ok=True)


def test_devmem_source_uses_iomem_system_ram(tmp_path: Path) -> None:
    """devmem: offset = physical address, RAM from the top-level System RAM lines of iomem."""
    root = shared_fixture(NOKASLR) / "root"
    path = fixture_memory(NOKASLR)
    with open_source(f"devmem:{path}", root=str(root)) as src:
        assert src.kind == "devmem"
        assert [(e.paddr, e.length) for e in src.extents] == [(0x1000, 0x9EC00),
                                                              (0x100000, 0x1FEE0000)]
        entry, want = expected_read(NOKASLR, "kcore-ram0.bin")
        assert src.read_phys(entry["paddr"], entry["length"])[0] == want
        # Reserved (not System RAM) reads as zeros, as /proc/kcore has no entry there.
        data, stats = src.read_phys(0x9FC00, 0x400)
        assert data == bytes(0x400) and stats.pages_zero_filled == 1


def test_auto_falls_back_to_dev_mem_and_lists_failures(tmp_path: Path) -> None:
    """auto: proc/kcore, dev/crash, dev/mem in order; with none, one error naming each."""
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    shutil.copy(shared_fixture(NOKASLR) / "root/proc/iomem", root / "proc/iomem")
    with pytest.raises(SourceError) as err:
        open_source("auto", root=str(root))
    msg = str(err.value)
    assert "\n" not in msg
    for rel in ("proc/kcore", "dev/crash", "dev/mem"):
        assert f"{root}/{rel}: missing" in msg
    (root / "dev").mkdir()
    (root / "dev/mem").symlink_to(fixture_memory(NOKASLR))
    with open_source("auto", root=str(root)) as src:
        assert src.kind == "devmem" and src.path == f"{root}/dev/mem"
        entry, want = expected_read(NOKASLR, "kcore-ram0.bin")
        assert src.read_phys(entry["paddr"], entry["length"])[0] == want


def test_pid_source_reads_process_memory() -> None:
    """pid:PID:START-END@PHYS maps a range of a process's memory at a physical address."""
    size = 3 * 4096
    m = mmap.mmap(-1, size)
    m.write(bytes(range(256)) * (size // 256))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    try:
        spec = f"pid:{os.getpid()}:{addr:x}-{addr + size:#x}@0x100000"
        with open_source(spec) as src:
            assert src.kind == "pid"
            assert src.extents[0].paddr == 0x100000 and src.extents[0].length == size
            data, stats = src.read_phys(0x100000 - 4096, size + 8192)
            assert data[:4096] == bytes(4096) and data[-4096:] == bytes(4096)
            assert data[4096:-4096] == m[:]
            assert stats.pages_zero_filled == 2
    finally:
        del addr
        m.close()


@pytest.mark.parametrize("body", ["x:1-2@3", "1:2-1@0", "1:zz-1@0", "1"])
def test_pid_spec_errors(body: str) -> None:
    """Malformed pid: specs are one-line errors."""
    with pytest.raises(SourceError):
        open_source(f"pid:{body}")


# ---- small built cores ---------------------------------------------------------------------

def test_built_elf_extents_skip_all_ones_and_read_holes_as_zeros(tmp_path: Path) -> None:
    """Extents are keyed by p_paddr; all-ones p_paddr is skipped; VMCOREINFO is exposed."""
    a, b = os.urandom(8192), os.urandom(4096)
    vmci = b"OSRELEASE=6.1.0\nPAGESIZE=4096\n"
    path = tmp_path / "core.elf"
    data = build_elf([(0x2000, a), (ALL_ONES, b"x" * 4096), (0x10000, b)],
                     note(b"CORE", 1, bytes(336)) + note(b"VMCOREINFO", 0, vmci))
    path.write_bytes(data)
    with open_source(str(path)) as src:
        assert src.kind == "elf"
        assert [(e.paddr, e.length) for e in src.extents] == [(0x2000, 8192), (0x10000, 4096)]
        assert src.vmcoreinfo == vmci
        got, stats = src.read_phys(0x1000, 0x10000)
        assert got[:4096] == bytes(4096) and got[4096:4096 + 8192] == a
        assert got[0xF000:0x10000] == b
        assert stats.pages_zero_filled == 16 - 3
        buf = bytearray(4096)
        src.readinto_phys(0x10000, buf)
        assert buf == b


def test_elf_overlapping_loads_holding_the_same_bytes_are_aliases(tmp_path: Path) -> None:
    """A TEXT-like load repeating RAM (as kcore and its dumps have) is the same memory once."""
    ram = os.urandom(0x8000)
    text = ram[0x3000:0x6000]
    tail = os.urandom(0x2000)
    # RAM split in two loads (as a compact dump elides a zero run), text over the seam.
    data = build_elf([(0x10000, ram[:0x4000]), (0x14000, ram[0x4000:]),
                      (0x13000, text), (0x17000, ram[0x7000:] + tail)])
    path = tmp_path / "alias.elf"
    path.write_bytes(data)
    with open_source(str(path)) as src:
        ext = src.extents
        assert ext[0].paddr == 0x10000 and ext[-1].paddr + ext[-1].length == 0x1A000
        assert all(a.paddr + a.length == b.paddr for a, b in zip(ext, ext[1:], strict=False))
        got, stats = src.read_phys(0x10000, 0xA000)
        assert got == ram + tail and stats.pages_zero_filled == 0


def test_elf_phnum_xnum(tmp_path: Path) -> None:
    """e_phnum = PN_XNUM: the program header count is in section header 0's sh_info."""
    body = os.urandom(4096)
    shdr0 = ELF.Elf_Shdr.build(Container(sh_name=0, sh_type="SHT_NULL", sh_flags=0, sh_addr=0,
                                         sh_offset=0, sh_size=0, sh_link=0, sh_info=1,
                                         sh_addralign=0, sh_entsize=0))
    data = ehdr(0xFFFF, phoff=128, shoff=64, shnum=0) + shdr0
    data += phdr("PT_LOAD", 184, 0, 0x5000, 4096) + body
    path = tmp_path / "xnum.elf"
    path.write_bytes(data)
    with open_source(f"elf:{path}") as src:
        assert src.extents[0].paddr == 0x5000
        assert src.read_phys(0x5000, 4096)[0] == body


def _hostile(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def hostile_cases() -> list[tuple[str, bytes, type, str]]:
    """(name, file bytes, error class, offset the message must name)."""
    good = build_elf([(0x1000, bytes(4096))])
    loads_overlap = build_elf([(0x1000, bytes(8192)), (0x2000, b"\xff" * 4096)])
    past_end = good[:64 + 56] + phdr("PT_LOAD", 0x100000, 0, 0x1000, 4096) + good[64 + 112:]
    absurd = build_elf([(1 << 60, bytes(4096))])
    huge_phnum = ehdr(60000) + bytes(100)
    return [
        ("empty.elf", b"", SourceError, "0x0"),
        ("trunc.elf", good[:40], ElfFormatError, "0x0"),
        ("trunc-phdrs.elf", good[:64 + 20], ElfFormatError, "0x40"),
        ("overlap.elf", loads_overlap, ElfFormatError, "0x"),
        ("past-end.elf", past_end, ElfFormatError, "0x78"),
        ("absurd.elf", absurd, ElfFormatError, "0x"),
        ("phnum.elf", huge_phnum, ElfFormatError, "0x40"),
        ("elf32.elf", b"\x7fELF\x01\x01\x01" + bytes(57), ElfFormatError, "0x4"),
        ("noload.elf", build_elf([]), ElfFormatError, "0x40"),
        ("vmalloc-only.elf", build_elf([(ALL_ONES, bytes(16))]), ElfFormatError, "0x40"),
        ("back.lime", lime_range(0x2000, b"", e_addr=0x1000), LimeFormatError, "0x0"),
        ("trunc.lime", lime_range(0, bytes(4096)) + lime_range(0x2000, bytes(4096))[:-1],
         LimeFormatError, "0x1020"),
        ("trunc-hdr.lime", lime_range(0, bytes(4096)) + struct.pack("<II", LIME_MAGIC, 1),
         LimeFormatError, "0x1020"),
        ("badver.lime", lime_range(0, bytes(16), version=7), LimeFormatError, "0x0"),
        ("junk.lime", lime_range(0, bytes(16)) + b"garbage!" * 8, LimeFormatError, "0x30"),
        ("overlap.lime", lime_range(0, bytes(8192)) + lime_range(0x1000, bytes(4096)),
         LimeFormatError, "0x"),
        ("mem.avml", lime_range(0, bytes(16), magic=AVML_MAGIC, version=2), LimeFormatError,
         "0x"),
    ]


@pytest.mark.parametrize("case", hostile_cases(), ids=lambda c: c[0])
def test_hostile_sources_give_one_line_errors(tmp_path: Path, case) -> None:
    """Hostile files: the right error class, one line, naming the file and a hex offset."""
    name, data, cls, offset = case
    path = _hostile(tmp_path, name, data)
    kind = "lime" if name.endswith((".lime", ".avml")) else "elf"
    for spec in (str(path), f"{kind}:{path}"):
        with pytest.raises(cls) as err:
            open_source(spec).close()
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg and offset in msg, msg
    if name == "mem.avml":
        assert "AVML" in msg


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    """A missing or unreadable file is a SourceError naming it."""
    with pytest.raises(SourceError, match="missing"):
        open_source(f"raw:{tmp_path}/nothing")
    path = _hostile(tmp_path, "secret.raw", bytes(4096))
    path.chmod(0)
    if os.geteuid() == 0:
        pytest.skip("root reads mode-000 files")
    with pytest.raises(SourceError, match="run as root"):
        open_source(str(path))


def test_fifo_and_directory_are_refused_without_hanging(tmp_path: Path) -> None:
    """A FIFO (no writer) and a directory: one-line SourceErrors, no blocking open."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        for spec in (str(path), f"raw:{path}", f"elf:{path}", f"lime:{path}"):
            with pytest.raises(SourceError) as err:
                open_source(spec).close()
            assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_sources_are_opened_read_only(tmp_path: Path) -> None:
    """The source fd is O_RDONLY with close-on-exec; the file is never modified."""
    import fcntl

    path = _hostile(tmp_path, "mem.raw", os.urandom(8192))
    before = path.read_bytes()
    with open_source(f"raw:{path}") as src:
        assert fcntl.fcntl(src.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert os.get_blocking(src.fd)
        assert fcntl.fcntl(src.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        src.read_phys(0, 8192)
    assert path.read_bytes() == before


# ---- fuzzing: any damage is a one-line SourceError, never another exception ---------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hst
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    _SEEDS = [
        build_elf([(0x1000, bytes(64)), (0x3000, bytes(32))],
                  note(b"VMCOREINFO", 0, b"OSRELEASE=6.1\n")),
        lime_range(0x1000, bytes(64)) + lime_range(0x4000, bytes(32)),
    ]

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(seed=hst.sampled_from(_SEEDS),
           edits=hst.lists(hst.tuples(hst.integers(0, 400), hst.integers(0, 255)), max_size=8),
           cut=hst.integers(0, 500))
    def test_damaged_cores_fail_cleanly(tmp_path_factory, seed: bytes, edits, cut: int) -> None:
        """Byte flips and truncations of small ELF and LiME files: open or a SourceError."""
        data = bytearray(seed)
        for at, value in edits:
            if at < len(data):
                data[at] = value
        path = tmp_path_factory.mktemp("fuzz") / "core"
        path.write_bytes(bytes(data[:cut]))
        try:
            with open_source(str(path)) as src:
                for e in src.extents[:4]:
                    src.read_phys(e.paddr, min(e.length, 1 << 16))
        except SourceError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)


def _kcore_like(loads: list[tuple[int, int, int]], data_offset: int = 0x1000) -> bytes:
    """A small kcore-shaped core: p_offset = (vaddr & (2^47 - 1)) + data_offset, sparse."""
    mask = (1 << 47) - 1
    hdrs = [phdr("PT_LOAD", (va & mask) + data_offset, va, pa, n) for va, pa, n in loads]
    head = ehdr(len(hdrs)) + b"".join(hdrs)
    return head + bytes(data_offset - len(head))


def test_kcore_shaped_core_is_detected_and_checked(tmp_path: Path) -> None:
    """Offsets following kc_vaddr_to_offset() mean kcore; overlapping RAM there is an error."""
    base = 0xFFFF888000000000
    good = _kcore_like([(0xFFFFFFFF81000000, 0x1000000, 0x2000), (base + 0x1000, 0x1000, 0x1000),
                        (0xFFFFC90000000000, ALL_ONES, 0x1000)])
    bad = _kcore_like([(base + 0x1000, 0x1000, 0x2000), (base + 0x2000, 0x2000, 0x1000)])
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no tmpfs for a 128 TiB sparse file")
    paths = {name: shm / f"kcore-test-shaped-{name}-{os.getpid()}" for name in ("good", "bad")}
    try:
        for name, data in (("good", good), ("bad", bad)):
            with open(paths[name], "wb") as f:
                f.write(data)
                f.truncate(0x7FFF81000000 + 0x1000 + 0x2000)
        with open_source(str(paths["good"])) as src:
            assert src.kind == "kcore"
            assert [(e.paddr, e.length) for e in src.extents] == [(0x1000, 0x1000)]
            assert [s.vaddr for s in src.segments] == [0xFFFFFFFF81000000, base + 0x1000,
                                                       0xFFFFC90000000000]
        with pytest.raises(ElfFormatError, match="overlapping"):
            open_source(str(paths["bad"]))
    finally:
        for path in paths.values():
            path.unlink(missing_ok=True)


def test_sources_read_by_a_live_kcore_give_threads_their_own_fds(tmp_path):
    """A source whose one fd two reads must not share (the live /proc/kcore: the vm test
    test_threaded_dump_of_the_live_kcore shows the corruption) lends each read an fd no other
    read holds, reusing them (500 threads, one read each, need few); engine slots get one
    each; all close with it. The others keep their one fd."""
    import errno
    import threading

    data = os.urandom(64 * 4096)
    image = tmp_path / "mem.raw"
    image.write_bytes(data)
    with open_source(f"raw:{image}") as src:
        fd = src.borrow_fd()
        assert src.concurrent_reads_safe and src.slot_fd(3) == fd == src.fd
        src.return_fd(fd)  # close() waits for every borrowed fd to come back
    src = open_source(f"raw:{image}")
    src.concurrent_reads_safe = False  # as KcoreSource
    held = src.borrow_fd()
    second = src.borrow_fd()
    assert held == src.fd and second not in (src.fd, -1)  # a second, concurrent read
    src.return_fd(held)
    src.return_fd(second)
    ok: list[bool] = []

    def read_once() -> None:
        ok.append(src.read_phys(4096, 8192)[0] == data[4096:12288])

    for _ in range(10):
        threads = [threading.Thread(target=read_once) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(ok) == 500 and all(ok)
    assert len(src._more_fds) <= 50  # reused: at most one per read at once, not per thread
    slots = [src.slot_fd(k) for k in (0, 1, 0)]
    assert slots[0] == slots[2] != slots[1] and src.fd not in slots
    fds = {src.fd, *slots, *src._more_fds}
    src.close()
    for fd in fds:
        with pytest.raises(OSError) as exc:
            os.fstat(fd)
        assert exc.value.errno == errno.EBADF
    # A path that names another file by now is refused, not read.
    src = open_source(f"raw:{image}")
    src.concurrent_reads_safe = False
    image.rename(tmp_path / "moved.raw")
    image.write_bytes(bytes(len(data)))
    with pytest.raises(SourceError, match="replaced by another file"):
        src.slot_fd(0)
    src.close()
