"""arm64: kcore's ranges, header, reads and dumps against a real arm64 kernel's /proc/kcore.

The fixtures (tests/data/arm64-*, made by tests/vm/arm64_fixture.py from one boot each of
Debian's arm64 kernels under qemu-system-aarch64) hold that boot's /proc and /sys files, the
real kcore's header, regions of the real kcore read in the guest with dd, and the physical
pages those need as a LiME image. 6.1: 48-bit VAs, 4 levels, no _text/_end in kallsyms, the
64 KiB before _stext unmapped. 6.12: built for 52-bit VAs, run with LPA2 (5 levels), and on a
CPU without LPA2 (6.12-48: 48-bit VAs, 4 levels, a randomized linear map: PHYS_OFFSET < 0).
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kcore
from tests.helpers import DATA, elf_read, run_kcore, scratch_dir, volatility_cmd

FIXTURES = ("arm64-6.1", "arm64-6.12", "arm64-6.12-48")
PAGE = 4096
EM_AARCH64 = 183


class Fixture:
    """One arm64 capture, its memory unpacked into a temporary LiME file."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.dir = DATA / name
        self.root = self.dir / "root"
        self.kcore = json.loads((self.dir / "kcore.json").read_text())
        self.reads = json.loads((self.dir / "reads.json").read_text())
        self.lime = tmp / f"{name}.lime"
        self.lime.write_bytes(lzma.decompress((self.dir / "memory.lime.xz").read_bytes()))
        blob = lzma.decompress((self.dir / "reads.bin.xz").read_bytes())
        self.real: list[bytes] = []
        at = 0
        for r in self.reads["regions"]:
            self.real.append(blob[at:at + r["length"]])
            at += r["length"]

    @property
    def source(self) -> str:
        """The --source of the fixture's memory."""
        return f"lime:{self.lime}"

    def vmcoreinfo(self) -> dict[str, str]:
        """The real kcore's VMCOREINFO note as KEY -> value."""
        note = next(n for n in self.kcore["notes"] if n["name"] == "VMCOREINFO")
        return dict(line.partition("=")[::2] for line in
                    bytes.fromhex(note["desc"]).decode().splitlines())


@pytest.fixture(scope="module", params=FIXTURES)
def fx(request: pytest.FixtureRequest) -> Fixture:
    """Each arm64 capture."""
    return Fixture(request.param, scratch_dir(request, request.param))


def _header_without_task(data: bytes, fx: Fixture) -> bytes:
    """The header bytes with the reading task's NT_TASKSTRUCT descriptor zeroed."""
    task = next(n for n in fx.kcore["notes"] if (n["name"], n["type"]) == ("CORE", 4))
    out = bytearray(data)
    out[task["desc_offset"]:task["desc_offset"] + task["descsz"]] = bytes(task["descsz"])
    return bytes(out)


def test_header_and_ranges_equal_the_real_kcore(fx: Fixture, tmp_path: Path) -> None:
    """EM_AARCH64, every PT_LOAD field by field in the kernel's order, the notes (392-byte
    prstatus, task_struct size from slabinfo, VMCOREINFO), data_offset and the file size."""
    out = tmp_path / "head.bin"
    r = run_kcore("header", "--root", str(fx.root), "--source", fx.source, "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    real = (fx.dir / "kcore-head.bin").read_bytes()
    assert int.from_bytes(real[18:20], "little") == EM_AARCH64
    assert _header_without_task(out.read_bytes(), fx) == _header_without_task(real, fx)
    r = run_kcore("ranges", "--json", "--root", str(fx.root), "--source", fx.source)
    assert r.returncode == 0, r.stderr.decode()
    ours = json.loads(r.stdout)
    rows = [(int(x["vaddr"], 16), int(x["paddr"], 16), int(x["size"], 16), int(x["offset"], 16))
            for x in ours["ranges"]]
    assert rows == [(p["p_vaddr"], p["p_paddr"], p["p_filesz"], p["p_offset"])
                    for p in fx.kcore["phdrs"] if p["p_type"] == 1]
    assert int(ours["file_size"], 16) == fx.kcore["st_size"]


def test_reads_equal_the_real_kcore(fx: Fixture) -> None:
    """Reads through the arm64 page tables and the linear map, page by page against the
    guest's dd of its /proc/kcore: text (and, on 6.1, the zeros of its unmapped first
    64 KiB), the linear map, init_uts_ns and linux_banner exactly; vmalloc, module and
    struct page areas changed between the guest's read and the pause: at most a quarter."""
    with kcore.open(str(fx.root), fx.source) as f:
        for r, real in zip(fx.reads["regions"], fx.real, strict=True):
            ours = f.pread(r["length"], r["offset"])
            assert len(ours) == len(real) == r["pages"] * PAGE
            differ = [i for i in range(r["pages"])
                      if ours[i * PAGE:(i + 1) * PAGE] != real[i * PAGE:(i + 1) * PAGE]]
            if r["strict"]:
                assert not differ, f"{r['what']} at {r['vaddr']:#x}: pages {differ} differ"
            else:
                assert len(differ) <= r["pages"] // 4, f"{r['what']}: pages {differ} differ"
            if r["what"] == "text head" and fx.reads["release"].startswith("6.1.0-"):
                assert ours == real == bytes(len(real))  # 6.1 maps the image from _stext


@pytest.fixture(scope="module")
def elf_dump(fx: Fixture, request: pytest.FixtureRequest) -> Path:
    """kcore dump --format elf of the fixture."""
    out = scratch_dir(request, "dump") / "mem.elf"
    r = run_kcore("dump", "--root", str(fx.root), "--source", fx.source, "--format", "elf",
                  "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    return out


def test_elf_dump_opens_in_drgn_as_arm64(fx: Fixture, elf_dump: Path) -> None:
    """drgn takes the dump for an aarch64 Linux kernel core and, walking the page tables
    itself from VMCOREINFO, reads init_uts_ns's release where the real kcore had it."""
    drgn = pytest.importorskip("drgn", reason="drgn is not installed (.ci/run installs it)")
    prog = drgn.Program()
    prog.set_core_dump(str(elf_dump))
    assert prog.platform.arch == drgn.Architecture.AARCH64
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    info = fx.vmcoreinfo()
    uts = int(info["SYMBOL(init_uts_ns)"], 16) + int(info["OFFSET(uts_namespace.name)"])
    release = prog.read(uts + 2 * 65, 65).split(b"\0")[0].decode()  # name.release
    assert release == info["OSRELEASE"] == fx.reads["release"]


def test_elf_dump_banner_in_volatility(fx: Fixture, elf_dump: Path, tmp_path: Path) -> None:
    """Volatility 3's banners plugin finds the kernel's banner in the arm64 dump."""
    cmd = volatility_cmd()
    r = subprocess.run([*cmd, "-q", "--cache-path", str(tmp_path), "-f", str(elf_dump),
                        "banners.Banners"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path)))
    version = (fx.root / "proc/version").read_text().split(" (")[0]
    assert version in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_elf_dump_verifies_without_warning(fx: Fixture, elf_dump: Path) -> None:
    """kcore verify takes the arm64 dump as complete, with no warning (its e_machine, 183,
    is one kcore reads: it was once said not to be x86-64)."""
    r = run_kcore("verify", "--json", str(elf_dump))
    assert r.returncode == 0, r.stderr.decode()
    res = json.loads(r.stdout)
    assert res["warnings"] == [] and res["format"] == "elf", res


def test_elf_dump_text_equals_the_real_kcores(fx: Fixture, elf_dump: Path) -> None:
    """The dump's kernel text is what the real /proc/kcore read there (the VM test checks the
    unmapped head of 6.1's image, which these captures do not hold)."""
    texts = [(r, real) for r, real in zip(fx.reads["regions"], fx.real, strict=True)
             if r["what"].startswith("text")]
    assert texts
    for r, real in texts:
        assert elf_read(elf_dump, r["vaddr"], len(real)) == real, f"{r['what']} at {r['vaddr']:#x}"


@pytest.mark.parametrize("fmt", ["elf", "lime", "raw", "padded"])
def test_dumps_reopen_as_arm64_sources(fx: Fixture, fmt: str, tmp_path: Path) -> None:
    """Each dump format of arm64 memory is a source again: header equal to the real one."""
    out = tmp_path / f"mem.{fmt}"
    r = run_kcore("dump", "--root", str(fx.root), "--source", fx.source, "--format", fmt,
                  "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    head = tmp_path / "head.bin"
    r = run_kcore("header", "--root", str(fx.root), "--source", f"{fmt}:{out}", "-o", str(head))
    assert r.returncode == 0, r.stderr.decode()
    real = (fx.dir / "kcore-head.bin").read_bytes()
    assert _header_without_task(head.read_bytes(), fx) == _header_without_task(real, fx)


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    """A root of an architecture kcore does not know: one line, exit 2, no traceback."""
    root = tmp_path / "root"
    src = DATA / "arm64-6.1" / "root"
    subprocess.run(["cp", "-r", str(src), str(root)], check=True)
    (root / "proc/sys/kernel/arch").write_text("riscv64\n")
    r = run_kcore("ranges", "--root", str(root), "--source", f"raw:{sys.executable}")
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "riscv64" in err, err
    assert "Traceback" not in err


def test_foreign_elf_machine_is_refused(fx: Fixture, elf_dump: Path, tmp_path: Path) -> None:
    """An ELF core whose e_machine kcore does not know, or of another architecture than the
    root's: one line, exit 2."""
    data = bytearray(elf_dump.read_bytes())
    for machine, words in ((243, "machine 243"), (62, "x86_64 machine")):
        data[18:20] = machine.to_bytes(2, "little")  # EM_RISCV, EM_X86_64
        core = tmp_path / f"core-{machine}"
        core.write_bytes(bytes(data))
        r = run_kcore("ranges", "--root", str(fx.root), "--source", f"elf:{core}")
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and words in err, err


def test_kcore_format_dump_is_the_real_kcore(fx: Fixture) -> None:
    """`--format kcore`: a sparse file of the real kcore's size whose header and stable
    regions are the real kcore's bytes (tmpfs: arm64's kcore is 252 TiB or more)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm for a sparse 252 TiB file")
    out = shm / f"kcore-test-arm64-{os.getpid()}.kcore"
    try:
        r = run_kcore("dump", "--root", str(fx.root), "--source", fx.source, "--format",
                      "kcore", "-o", str(out))
        assert r.returncode == 0, r.stderr.decode()
        assert out.stat().st_size == fx.kcore["st_size"]
        with open(out, "rb") as f:
            head = f.read(fx.kcore["data_offset"])
            real = (fx.dir / "kcore-head.bin").read_bytes()
            assert _header_without_task(head, fx) == _header_without_task(real, fx)
            for reg, data in zip(fx.reads["regions"], fx.real, strict=True):
                if reg["strict"]:
                    f.seek(reg["offset"])
                    assert f.read(reg["length"]) == data, reg["what"]
    finally:
        for p in (out, *shm.glob(f"{out.name}.*")):  # the sidecars too (.symbols, .json...)
            p.unlink(missing_ok=True)


def test_dump_without_slabinfo(fx: Fixture, tmp_path: Path) -> None:
    """Only NT_TASKSTRUCT's size needs proc/slabinfo (root only on a live system): without it a
    raw dump still holds the fixture's memory (the guest's real kcore reads of the linear map
    found in it), and what needs the size says so in one line."""
    root = tmp_path / "root"
    shutil.copytree(fx.root, root)
    (root / "proc/slabinfo").unlink()
    out = tmp_path / "mem.raw"
    r = run_kcore("dump", "--quiet", "--no-digest", "--root", str(root), "--source", fx.source,
                  "--format", "raw", "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    linear = [(reg, real) for reg, real in zip(fx.reads["regions"], fx.real, strict=True)
              if reg["what"] == "linear map"]
    assert linear, "the fixture has no linear-map read"
    with open(out, "rb") as f:
        for reg, real in linear:  # the real kcore's PT_LOAD gives the physical address
            load = next(p for p in fx.kcore["phdrs"] if p["p_type"] == 1
                        and p["p_vaddr"] <= reg["vaddr"] < p["p_vaddr"] + p["p_memsz"])
            f.seek(load["p_paddr"] + reg["vaddr"] - load["p_vaddr"])
            assert f.read(len(real)) == real, reg["what"]
    r = run_kcore("header", "--root", str(root), "--source", fx.source,
                  "-o", str(tmp_path / "head.bin"))
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and "slabinfo" in err, err


@pytest.mark.parametrize("name", FIXTURES)
def test_real_kcore_as_source_leaves_text_out(name: str) -> None:
    """The real arm64 /proc/kcore as a memory source (what the aarch64 one file reads live):
    its kernel-image PT_LOAD, whose p_paddr (__pa_symbol) aliases RAM, is the one holding
    _stext and stays out of the physical view; the linear-map PT_LOADs left make it without
    overlap, inside iomem's System RAM (with the image, opening it failed: overlapping ranges)."""
    from kcore.addrmap import ALL_ONES
    from kcore.errors import ElfFormatError
    from kcore.iomem import parse_iomem
    from kcore.sources.base import Extent, check_extents
    from kcore.sources.kcore import Segment, kernel_text

    real = json.loads((DATA / name / "kcore.json").read_text())
    segs = [Segment(p["p_vaddr"], p["p_paddr"], p["p_offset"], p["p_filesz"])
            for p in real["phdrs"] if p["p_type"] == 1]
    info = bytes.fromhex(next(n for n in real["notes"] if n["name"] == "VMCOREINFO")["desc"])
    text = kernel_text(real["e_machine"], info, segs, name)
    kallsyms = (DATA / name / "root/proc/kallsyms").read_text()
    stext = int(next(ln for ln in kallsyms.splitlines() if ln.endswith(" _stext")).split()[0], 16)
    assert text is not None and text.vaddr <= stext < text.vaddr + text.size
    ram = [Extent(s.paddr, s.size, s.offset) for s in segs if s.paddr != ALL_ONES and s is not text]
    with pytest.raises(ElfFormatError, match="overlapping memory ranges"):
        check_extents([*ram, Extent(text.paddr, text.size, text.offset)], name, ElfFormatError)
    system_ram = parse_iomem((DATA / name / "root/proc/iomem").read_text(), name).system_ram()
    for e in check_extents(ram, name, ElfFormatError):
        assert any(lo <= e.paddr and e.paddr + e.length <= hi + 1 for lo, hi in system_ram), e
