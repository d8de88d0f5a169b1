"""kcore ranges / header against the real /proc/kcore of two Linux 6.1 boots (the fixtures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.helpers import FIXTURE_NAMES, fixture_memory, run_kcore, shared_fixture


def source_spec(name: str) -> str:
    mem = fixture_memory(name)
    return f"{'elf' if mem.suffix == '.elf' else 'raw'}:{mem}"


def expected(name: str) -> dict:
    return json.loads((shared_fixture(name) / "expected/kcore.json").read_text())


def real_data_offset(name: str) -> int:
    """PAGE_ALIGN(end of the real PT_NOTE): where the real kcore's data starts."""
    note = next(p for p in expected(name)["phdrs"] if p["type"] == "PT_NOTE")
    return (note["p_offset"] + note["p_filesz"] + 0xFFF) & ~0xFFF


def taskstruct_span(head: bytes) -> tuple[int, int]:
    """Where the NT_TASKSTRUCT descriptor lies in a real kcore header (read with pyelftools)."""
    import io

    elf = ELFFile(io.BytesIO(head))
    note_seg = next(s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE")
    for n in note_seg.iter_notes():
        if n["n_type"] == "NT_TASKSTRUCT":
            start = n["n_offset"] + 12 + 8  # Elf64_Nhdr + "CORE\0" padded to 8
            return start, start + n["n_descsz"]
    raise AssertionError("no NT_TASKSTRUCT note in the real header")


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_ranges_equal_the_real_program_headers(name):
    root = shared_fixture(name) / "root"
    out = run_kcore("ranges", "--root", str(root), "--source", source_spec(name), "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    real = [p for p in expected(name)["phdrs"] if p["type"] == "PT_LOAD"]
    assert len(got["ranges"]) == len(real)
    for mine, theirs in zip(got["ranges"], real, strict=True):
        assert mine["kind"] == theirs["kind"]
        assert int(mine["vaddr"], 16) == theirs["p_vaddr"]
        assert int(mine["paddr"], 16) == theirs["p_paddr"]
        assert int(mine["size"], 16) == theirs["p_filesz"] == theirs["p_memsz"]
        assert int(mine["offset"], 16) == theirs["p_offset"]
    assert int(got["data_offset"], 16) == real_data_offset(name)
    assert int(got["file_size"], 16) == expected(name)["kcore_st_size"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_header_equals_the_real_kcore_head_but_the_task_struct(name, tmp_path):
    fx = shared_fixture(name)
    real = (fx / "expected/kcore-head-64k.bin").read_bytes()
    out = tmp_path / "head.bin"
    res = run_kcore("header", "--root", str(fx / "root"), "--source", source_spec(name),
                    "-o", str(out))
    assert res.returncode == 0, res.stderr
    mine = out.read_bytes()
    assert (out.stat().st_mode & 0o777) == 0o600
    data_offset = real_data_offset(name)
    start, end = taskstruct_span(real)
    assert len(mine) == data_offset
    assert mine[:start] == real[:start]
    assert mine[start:end] == bytes(end - start)  # no userspace tool knows the reader's task
    assert mine[end:] == real[end:data_offset]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_kaslr_bases_read_from_memory_match_the_kernels(name):
    from kcore.discover import discover

    fx = shared_fixture(name)
    system = discover(fx / "root", source_spec(name))
    try:
        real = expected(name)["values_read_through_kcore"]
        assert system.addrmap.page_offset == int(real["page_offset_base"], 16)
        assert system.addrmap.vmalloc_start == int(real["vmalloc_base"], 16)
        assert system.addrmap.vmemmap_start == int(real["vmemmap_base"], 16)
        assert system.addrmap.phys_base == int(real["phys_base"], 16)
        assert system.task_struct_size == expected(name)["notes"][2]["descsz"]
        assert system.vmcoreinfo.data.decode() == expected(name)["notes"][3]["text"]
    finally:
        system.close()


def _copy_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(shared_fixture(FIXTURE_NAMES[0]) / "root", root)
    return root


def _fails_cleanly(res, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    err = res.stderr.decode()
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_garbled_iomem_line(tmp_path):
    root = _copy_root(tmp_path)
    lines = (root / "proc/iomem").read_text().splitlines()
    lines[2] = "0009fc00-zzzz : Reserved"
    (root / "proc/iomem").write_text("\n".join(lines) + "\n")
    res = run_kcore("ranges", "--root", str(root), "--source", source_spec(FIXTURE_NAMES[0]))
    _fails_cleanly(res, "iomem:3", "malformed")


def test_kallsyms_without_text(tmp_path):
    root = _copy_root(tmp_path)
    ks = root / "proc/kallsyms"
    ks.write_text("".join(ln for ln in ks.read_text().splitlines(True)
                          if not ln.rstrip().endswith(" _text")))
    res = run_kcore("ranges", "--root", str(root), "--source", source_spec(FIXTURE_NAMES[0]))
    _fails_cleanly(res, "kallsyms", "_text")


def test_vmcoreinfo_address_outside_memory(tmp_path):
    root = _copy_root(tmp_path)
    (root / "sys/kernel/vmcoreinfo").write_text("0x000000fff0000000 1024\n")
    res = run_kcore("header", "--root", str(root), "--source", source_spec(FIXTURE_NAMES[0]),
                    "-o", str(tmp_path / "h.bin"))
    _fails_cleanly(res, "0xfff0000000", "outside the memory source")
    assert not (tmp_path / "h.bin").exists()


def test_source_too_small(tmp_path):
    root = _copy_root(tmp_path)
    ram = fixture_memory(FIXTURE_NAMES[0])
    small = tmp_path / "ram-64M.bin"
    with open(ram, "rb") as src, open(small, "wb") as dst:
        dst.write(src.read(64 << 20))
    res = run_kcore("ranges", "--root", str(root), "--source", f"raw:{small}")
    _fails_cleanly(res, str(small), "truncated")


def test_missing_root(tmp_path):
    res = run_kcore("ranges", "--root", str(tmp_path / "nope"), "--source",
                    source_spec(FIXTURE_NAMES[0]))
    _fails_cleanly(res, "missing")


@pytest.fixture
def saved_real_kcore(tmp_path_factory):
    """A sparse file holding what the real /proc/kcore gave: its header and the reads."""
    name = FIXTURE_NAMES[1]
    fx = shared_fixture(name)
    exp = expected(name)
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no tmpfs at /dev/shm for a 128 TiB sparse file")
    path = shm / f"kcore-test-saved-{name}-{id(exp)}"
    with open(path, "wb") as f:
        f.truncate(exp["kcore_st_size"])
        f.write((fx / "expected/kcore-head-64k.bin").read_bytes())
        for r in exp["reads"]:
            f.seek(r["kcore_offset"])
            f.write((fx / "expected" / r["file"]).read_bytes())
    yield fx, exp, path
    path.unlink()


def test_a_saved_real_kcore_is_its_own_truth(saved_real_kcore):
    from kcore.discover import discover
    from kcore.elfcore import build_header

    fx, exp, path = saved_real_kcore
    system = discover(fx / "root", f"kcore:{path}")
    try:
        hdr = build_header(system)
        entries = system.kclist.entries
        # The next open re-reads the file's program headers: a saved file has not changed.
        assert system.kclist.refresh() is False and system.kclist.entries == entries
    finally:
        system.close()
    real = [p for p in exp["phdrs"] if p["type"] == "PT_LOAD"]
    assert [(e.kind, e.vaddr, e.size, e.paddr) for e in entries] == [
        (p["kind"], p["p_vaddr"], p["p_filesz"], p["p_paddr"]) for p in real]
    # With the real notes at hand, even NT_TASKSTRUCT is the reading task's own.
    head = (fx / "expected/kcore-head-64k.bin").read_bytes()
    assert hdr.data == head[:hdr.data_offset]
    assert hdr.file_size == exp["kcore_st_size"]
