"""The format registry and each format's plan on a small synthetic memory, read back by
pyelftools (ELF) and by the LiME layout of docs/kernel-facts.md section 5, not by kcore."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from elftools.elf.elffile import ELFFile

from kcore.errors import InputError
from kcore.formats import FORMATS
from kcore.formats.plan import Request
from kcore.formats.write import write_plan
from kcore.formats.zeroruns import coarsen_runs
from kcore.output import open_output
from kcore.sources import open_source
from tests.helpers import FIXTURE_NAMES, fixture_memory, run_kcore, shared_fixture

PAGE = 4096
DIRECT_MAP = 0xFFFF888000000000
LIME_HEADER = struct.Struct("<IIQQ8s")  # LiME's lime_mem_range_header


def _system(ranges: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A system whose kclist is these (paddr, size) RAM ranges (notes stubbed)."""
    import kcore.elfcore

    monkeypatch.setattr(kcore.elfcore, "build_notes", lambda *a: b"notes")
    entries = [SimpleNamespace(type="KCORE_RAM", vaddr=DIRECT_MAP + pa, paddr=pa, size=n)
               for pa, n in ranges]
    return SimpleNamespace(addrmap=SimpleNamespace(page_size=PAGE, arch="x86_64"),
                           kclist=SimpleNamespace(entries=entries))


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    """A 96-page raw image: random pages, with a run of 32 zero pages in the middle."""
    pages = [bytes(PAGE) if 32 <= i < 64 or i % 7 == 3 else os.urandom(PAGE) for i in range(96)]
    data = b"".join(pages)
    path = tmp_path / "mem.raw"
    path.write_bytes(data)
    return path, data


def _write(name: str, req: Request, out: Path) -> None:
    fmt = FORMATS[name]
    plan = fmt.plan(req)
    with open_output(str(out), digest=False) as o:
        write_plan(o, req.source, plan, sparse=fmt.sparse, strict=False)
        o.commit(plan.size)


def test_elf_plan_is_the_memory_by_p_paddr_with_zero_runs_left_out(image, tmp_path,
                                                                    monkeypatch) -> None:
    """pyelftools reads the ELF core: every byte of RAM by p_paddr; the zero run is no file
    bytes, only a PT_LOAD with p_filesz 0 (read as zeros by crash, gdb, drgn)."""
    path, data = image
    system = _system([(0, len(data))], monkeypatch)
    with open_source(f"raw:{path}") as src:
        _write("elf", Request(system, src, granule=PAGE), tmp_path / "m.elf")
    with open(tmp_path / "m.elf", "rb") as f:
        elf = ELFFile(f)
        assert elf["e_type"] == "ET_CORE" and elf["e_machine"] == "EM_X86_64"
        segs = list(elf.iter_segments())
        assert segs[0]["p_type"] == "PT_NOTE"
        got = bytearray(len(data))
        for s in segs[1:]:
            assert s["p_type"] == "PT_LOAD" and s["p_vaddr"] == DIRECT_MAP + s["p_paddr"]
            got[s["p_paddr"]:s["p_paddr"] + s["p_filesz"]] = s.data()
        assert bytes(got) == data
        assert sum(s["p_filesz"] for s in segs[1:]) <= len(data) - 32 * PAGE
        assert sum(s["p_memsz"] for s in segs[1:]) == len(data)
    assert os.path.getsize(tmp_path / "m.elf") < len(data)


def test_lime_plan_is_one_header_and_the_bytes_per_range(image, tmp_path, monkeypatch) -> None:
    """LiME without elision: per RAM range a header {magic, 1, start, inclusive end}, then
    exactly the range's bytes."""
    path, data = image
    system = _system([(0, 40 * PAGE), (48 * PAGE, 48 * PAGE)], monkeypatch)
    with open_source(f"raw:{path}") as src:
        _write("lime", Request(system, src, elide=False), tmp_path / "m.lime")
    raw = (tmp_path / "m.lime").read_bytes()
    pos, seen = 0, []
    while pos < len(raw):
        magic, version, start, end, _ = LIME_HEADER.unpack_from(raw, pos)
        assert (magic, version) == (0x4C694D45, 1)
        pos += LIME_HEADER.size
        assert raw[pos:pos + end - start + 1] == data[start:end + 1]
        seen.append((start, end + 1))
        pos += end - start + 1
    assert seen == [(0, 40 * PAGE), (48 * PAGE, 96 * PAGE)]


def test_raw_and_padded_put_each_byte_at_its_physical_address(image, tmp_path,
                                                               monkeypatch) -> None:
    """raw leaves the gap between ranges a hole, padded writes it; both read as zeros."""
    path, data = image
    system = _system([(0, 40 * PAGE), (48 * PAGE, 48 * PAGE)], monkeypatch)
    want = data[:40 * PAGE] + bytes(8 * PAGE) + data[48 * PAGE:]
    with open_source(f"raw:{path}") as src:
        for name in ("raw", "padded"):
            _write(name, Request(system, src), tmp_path / name)
            assert (tmp_path / name).read_bytes() == want, name


def test_nothing_to_dump_is_an_input_error(image, monkeypatch) -> None:
    """A kclist without RAM: an InputError (exit status 2), for every format that plans RAM."""
    path, _data = image
    system = _system([], monkeypatch)
    with open_source(f"raw:{path}") as src:
        for name in ("elf", "raw", "padded"):
            with pytest.raises(InputError, match="nothing to dump") as err:
                FORMATS[name].plan(Request(system, src))
            assert err.value.exit_code == 2


def test_coarsen_runs_closes_the_smallest_gaps_within_a_segment() -> None:
    """Worked by hand: gaps 1, 5 and 2 pages in segment 0; a limit of 3 closes 1 and 2."""
    runs = [[(0, 1), (2, 1), (8, 1), (11, 1)], [(0, 4)]]
    assert coarsen_runs(runs, 3) == [[(0, 3), (8, 4)], [(0, 4)]]
    assert coarsen_runs(runs, 5) == runs


def test_the_registry_is_what_the_cli_offers() -> None:
    """Every registered format is a --format choice; -o - is refused (exit 2) exactly for
    the formats that are not streamable."""
    name = FIXTURE_NAMES[0]
    root = shared_fixture(name) / "root"
    spec = f"raw:{fixture_memory(name)}"
    help_text = run_kcore("dump", "--help", check=True).stdout.decode()
    for fmt in FORMATS.values():
        assert f"\n  {fmt.name:<7} " in help_text, fmt.name
        if not fmt.streamable:
            r = run_kcore("dump", "--root", str(root), "--source", spec, "--format", fmt.name,
                          "-o", "-", "-q")
            assert r.returncode == 2 and b"cannot go to stdout" in r.stderr, fmt.name
