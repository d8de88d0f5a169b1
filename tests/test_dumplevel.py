"""`kcore dump -d N`: the pages kept are the pages makedumpfile keeps, on real-kernel captures.

Both tools read the same dense ELF core of each capture (kcore's own `--no-elide` dump of it)
and their outputs are compared page frame by page frame. Differences allowed, each with the
makedumpfile rule behind it:
- `makedumpfile -E` writes a run of fewer than PFN_EXCLUDED (256) excluded pages when a kept
  page follows it in the same PT_LOAD (write_elf_pages_cyclic); kcore leaves every excluded
  page out. The comparison applies that rule to kcore's pages (pagesets.e_closure).
- The kdump format's bitmap 2 holds the mem_map classes only (zero pages are dropped while
  writing), so levels are compared there without the zero bit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import pagesets
from tests.commands.test_dump import source_spec
from tests.helpers import FIXTURE_NAMES, run_kcore, scratch_dir, shared_fixture

LEVELS = (1, 16, 17, 23, 31)
NOKASLR, KASLR = FIXTURE_NAMES


def need_makedumpfile() -> None:
    if shutil.which("makedumpfile") is None:
        pytest.skip("makedumpfile is not installed (.ci/run installs it)")


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def dense(request):
    """(capture name, its root, a dense ELF core of it made by kcore, page frames)."""
    name = request.param
    root = shared_fixture(name) / "root"
    folder = scratch_dir(request, f"dense-{name}")
    core = folder / "dense.elf"
    r = run_kcore("dump", "--root", str(root), "--source", source_spec(name), "--no-elide",
                  "--no-digest", "-q", "-o", str(core))
    assert r.returncode == 0, r.stderr.decode()
    npfn = max(pa + memsz for pa, _f, memsz in pagesets.loads(core)) // pagesets.PAGE
    return name, root, core, npfn


def kcore_dump(root: Path, core: Path, out: Path, *args: str) -> dict:
    """kcore dump of a dense core with extra options; its JSON summary."""
    r = run_kcore("dump", "--root", str(root), "--source", f"elf:{core}", "--no-digest", "-q",
                  "--json", "--force", "-o", str(out), *args)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


@pytest.mark.parametrize("level", LEVELS)
def test_elf_keeps_the_pages_makedumpfile_E_keeps(dense, level, tmp_path):
    need_makedumpfile()
    name, root, core, npfn = dense
    mine = tmp_path / "kcore.elf"
    summary = kcore_dump(root, core, mine, "-d", str(level))
    theirs = tmp_path / "makedumpfile.elf"
    pagesets.makedumpfile(["-E", "-d", str(level)], core, theirs)
    held = pagesets.elf_held(mine, npfn)
    expected = pagesets.e_closure(held, pagesets.loads(core))
    got = pagesets.elf_held(theirs, npfn)
    count, first = pagesets.differences(expected, got)
    assert count == 0, f"{name} -d {level}: {count} pages differ, first pfns {first}"
    # kcore really left pages out (makedumpfile's writes of short runs aside)
    assert pagesets.pages(held) <= pagesets.pages(got)
    assert summary["dump_level"]["level"] == level
    if level & 16:
        assert summary["dump_level"]["pages_excluded"]["free"] > 50000


@pytest.mark.parametrize("level", (16, 22, 30))
def test_mem_map_classes_equal_makedumpfile_bitmap(dense, level, tmp_path):
    """Without zero pages, kcore's page set is makedumpfile's kdump bitmap 2, exactly."""
    need_makedumpfile()
    name, root, core, npfn = dense
    mine = tmp_path / "kcore.elf"
    summary = kcore_dump(root, core, mine, "-d", str(level))
    theirs = tmp_path / "makedumpfile.kdump"
    pagesets.makedumpfile(["-d", str(level)], core, theirs)
    bitmap = pagesets.kdump_held(theirs)
    held = pagesets.elf_held(mine, len(bitmap) * 8)
    count, first = pagesets.differences(held, bitmap)
    assert count == 0, f"{name} -d {level}: {count} pages differ, first pfns {first}"
    excluded = summary["dump_level"]["pages_excluded"]
    assert excluded["zero"] == 0
    # the text PT_LOAD's frames are RAM frames: the set counts them once
    assert summary["dump_level"]["pages_kept"] == pagesets.pages(held)
    # --estimate's table gives makedumpfile's count for this level too
    r = run_kcore("dump", "--root", str(root), "--source", f"elf:{core}", "--estimate",
                  "-d", str(level), "--json")
    assert json.loads(r.stdout)["levels"][str(level)] == pagesets.pages(bitmap)


def test_estimate_equals_the_dump_that_follows(dense, tmp_path):
    name, root, core, npfn = dense
    r = run_kcore("dump", "--root", str(root), "--source", f"elf:{core}", "--estimate",
                  "-d", "31", "--json")
    assert r.returncode == 0, r.stderr.decode()
    estimate = json.loads(r.stdout)
    out = tmp_path / "d31.elf"
    summary = kcore_dump(root, core, out, "-d", "31", "--no-text")
    done = summary["dump_level"]
    assert estimate["dump_level"]["pages_excluded"] == done["pages_excluded"]
    assert estimate["dump_level"]["pages_kept"] == done["pages_kept"]
    # and the file holds exactly those pages
    assert pagesets.pages(pagesets.elf_held(out, npfn)) == done["pages_kept"]
    # the per-level table: -d 30 keeps what -d 31 keeps plus its zero pages
    assert estimate["levels"]["30"] == done["pages_kept"] + done["pages_excluded"]["zero"]
    assert estimate["levels"]["0"] == done["pages_in_ram"]
    # bytes: the pages plus the headers' room (the one-pass writer reserves more of it)
    assert abs(estimate["bytes"] - summary["bytes"]) < (2 << 20)


def test_formats_leave_out_the_same_pages(dense, tmp_path):
    """lime splits its ranges, raw leaves holes: the pages kept are the ELF core's."""
    name, root, core, npfn = dense
    elf = tmp_path / "d31.elf"
    kcore_dump(root, core, elf, "-d", "30", "--no-text")
    held = pagesets.elf_held(elf, npfn)
    lime = tmp_path / "d31.lime"
    kcore_dump(root, core, lime, "-d", "30", "--format", "lime")
    got = bytearray(len(held))
    with open(lime, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        magic, _v, start, end, _r = pagesets.LIME.unpack_from(data, pos)
        assert magic == pagesets.LIME_MAGIC
        pagesets._set(got, start // pagesets.PAGE, (end + 1) // pagesets.PAGE)
        pos += pagesets.LIME.size + end + 1 - start
    assert pagesets.differences(held, got)[0] == 0
    raw = tmp_path / "d30.raw"
    kcore_dump(root, core, raw, "-d", "30", "--format", "raw")
    with open(raw, "rb") as r, open(core, "rb") as d:
        ld = pagesets.loads(core)
        for pfn in range(0, npfn, 97):  # a sample of page frames
            page = _pread(r, pfn * pagesets.PAGE)
            kept = held[pfn >> 3] >> (pfn & 7) & 1
            if kept:
                assert page == _dense_page(d, ld, pfn), pfn
            else:
                assert page == bytes(pagesets.PAGE), pfn


def _pread(f, off: int) -> bytes:
    f.seek(off)
    return f.read(pagesets.PAGE).ljust(pagesets.PAGE, b"\0")


def _dense_page(f, loads_: list[tuple[int, int, int]], pfn: int) -> bytes:
    """A page of the dense core, by page frame (its RAM PT_LOAD's file offset)."""
    from elftools.elf.elffile import ELFFile

    f.seek(0)
    pa = pfn * pagesets.PAGE
    for s in ELFFile(f).iter_segments():
        if (s["p_type"] == "PT_LOAD" and s["p_vaddr"] < 0xFFFFFFFF80000000
                and s["p_paddr"] <= pa < s["p_paddr"] + s["p_filesz"]):
            f.seek(s["p_offset"] + pa - s["p_paddr"])
            return f.read(pagesets.PAGE)
    return bytes(pagesets.PAGE)


def test_vmcoreinfo_without_the_fields_a_level_needs(tmp_path):
    """A kernel whose VMCOREINFO lacks the page-flag numbers: one line naming them, exit 2."""
    name = NOKASLR
    root = shared_fixture(name) / "root"
    core = tmp_path / "small.elf"
    r = run_kcore("dump", "--root", str(root), "--source", source_spec(name), "--no-digest",
                  "-q", "-o", str(core))
    assert r.returncode == 0, r.stderr.decode()
    from elftools.elf.elffile import ELFFile

    with open(core, "r+b") as f:
        note = next(ELFFile(f).iter_segments("PT_NOTE"))
        f.seek(note["p_offset"])
        blob = bytearray(f.read(note["p_filesz"]))
        for key in (b"NUMBER(PG_lru)=", b"NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)="):
            at = blob.find(key)
            assert at > 0
            blob[at:at + 1] = b"X"  # the same length: the note stays well-formed
        f.seek(note["p_offset"])
        f.write(blob)
    bare = tmp_path / "root"
    shutil.copytree(root, bare)
    (bare / "sys/kernel/vmcoreinfo").unlink()  # VMCOREINFO from the core's note
    r = run_kcore("dump", "--root", str(bare), "--source", f"elf:{core}", "-d", "31", "-q",
                  "-o", str(tmp_path / "out.elf"))
    err = r.stderr.decode().strip()
    assert r.returncode == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "NUMBER(PG_lru)" in err and "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)" in err
    assert not (tmp_path / "out.elf").exists()
    # a level that needs neither still dumps
    r = run_kcore("dump", "--root", str(bare), "--source", f"elf:{core}", "-d", "1", "-q",
                  "--no-digest", "-o", str(tmp_path / "out.elf"))
    assert r.returncode == 0, r.stderr.decode()


def test_unreadable_mem_map_page_keeps_its_pages():
    """A struct page array page the source cannot give: its 64 pages are kept, counted."""
    from kcore.discover import discover
    from kcore.dumplevel import ram_ranges
    from kcore.pageclass import Translator, classify, mem_map_sections

    name = NOKASLR
    system = discover(shared_fixture(name) / "root", source_spec(name))
    try:
        ram = ram_ranges(system)
        whole = classify(system, 31, ram)
        # a free block: pick a mem_map page whose 64 pages are all excluded
        pfn = next(p for p in range(0x10000, whole.max_pfn, 64)
                   if not any(whole.bitmap[(p + i) >> 3] >> ((p + i) & 7) & 1
                              for i in range(64)))
        sec = next(s for s in mem_map_sections(system, whole.max_pfn)
                   if s.pfn_start <= pfn < s.pfn_end)
        vaddr = sec.mem_map + (pfn - sec.pfn_start) * 64
        (_va, bad, _n), = Translator(system).runs(vaddr, 4096)
        source = system.source
        real = source.readinto_phys

        def readinto_phys(paddr, buf, *, strict=False):
            st = real(paddr, buf, strict=strict)
            if paddr <= bad < paddr + len(buf):  # that page reads as a fault would
                memoryview(buf)[bad - paddr:bad - paddr + 4096] = bytes(4096)
                st.pages_zero_filled += 1
            return st

        source.readinto_phys = readinto_phys
        again = classify(system, 31, ram)
    finally:
        system.close()
    assert again.unreadable_mem_map == 64
    assert all(again.bitmap[(pfn + i) >> 3] >> ((pfn + i) & 7) & 1 for i in range(64))
    # a free block whose head was there is kept whole (its other pages are not marked)
    assert again.counts["free"] <= whole.counts["free"] - 64
    assert all(a | w == a for a, w in zip(again.bitmap, whole.bitmap, strict=True))


def test_kcore_format_ignores_the_level(tmp_path):
    r = run_kcore("dump", "--root", str(shared_fixture(NOKASLR) / "root"), "--source",
                  source_spec(NOKASLR), "--format", "kcore", "-d", "31", "--json", "-o",
                  str(Path("/dev/shm") / f"kcore-dl-{tmp_path.name}.kcore"))
    out = Path("/dev/shm") / f"kcore-dl-{tmp_path.name}.kcore"
    try:
        if r.returncode and b"sparse" in r.stderr:
            pytest.skip(r.stderr.decode().strip())
        assert r.returncode == 0, r.stderr.decode()
        summary = json.loads(r.stdout)
        assert any("--dump-level" in w and "kcore" in w for w in summary["warnings"])
    finally:
        for p in (out, *out.parent.glob(f"{out.name}.*")):  # every sidecar (.symbols too)
            p.unlink(missing_ok=True)


def test_bad_levels_are_refused():
    for bad in ("32", "-1", "x"):
        r = run_kcore("dump", "--root", str(shared_fixture(NOKASLR) / "root"), "--source",
                      source_spec(NOKASLR), "-d", bad, "-o", "/dev/null")
        assert r.returncode == 2
        assert "dump level" in r.stderr.decode()


def test_makedumpfile_reads_the_filtered_elf(dense, tmp_path):
    """makedumpfile opens kcore's -d 31 core as it opens the dense core (its mmap path on):
    --dump-dmesg gives the same log, -E -d 31 keeps the same pages, and -F -d 31 piped to -R
    rebuilds the same kdump bitmap.

    Before the zero-fill loads' p_offset moved to the end of the file, 1.7.2's mmap windows,
    sized by the first load whose [p_offset, p_offset + p_memsz) held a file offset, ran into
    other loads' bytes: it read the top page table as zeros (--dump-dmesg failed) or died.
    """
    need_makedumpfile()
    _name, root, core, npfn = dense
    mine = tmp_path / "k31.elf"
    kcore_dump(root, core, mine, "-d", "31")
    logs = []
    for src in (core, mine):
        out = tmp_path / f"{src.stem}.dmesg"
        pagesets.makedumpfile(["--dump-dmesg"], src, out)
        logs.append(out.read_bytes())
    assert logs[0] == logs[1] and b"Linux version" in logs[0]
    again = tmp_path / "again.elf"
    pagesets.makedumpfile(["-E", "-d", "31"], mine, again)
    held = int.from_bytes(pagesets.elf_held(again, npfn), "little")
    assert held and not held & ~int.from_bytes(pagesets.elf_held(mine, npfn), "little")
    from elftools.elf.elffile import ELFFile

    from kcore.sources import open_source

    with open(again, "rb") as f, open_source(f"elf:{core}") as dense_src:
        for seg in ELFFile(f).iter_segments():  # every page it wrote is the memory's
            if seg["p_type"] == "PT_LOAD" and seg["p_filesz"]:
                pa = seg["p_paddr"]
                assert seg.data() == dense_src.read_phys(pa, seg["p_filesz"])[0], hex(pa)
    flat = subprocess.run(["makedumpfile", "-F", "-d", "31", str(mine)], capture_output=True,
                          timeout=600)
    assert flat.returncode == 0, flat.stderr.decode()[-2000:]
    rebuilt, ref = tmp_path / "again.kdump", tmp_path / "theirs.kdump"
    r = subprocess.run(["makedumpfile", "-R", str(rebuilt)], input=flat.stdout,
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    pagesets.makedumpfile(["-d", "31"], core, ref)
    # its bitmap is the dense core's less the pages kcore's core holds no bytes for (zero
    # pages; makedumpfile's exclude_nodata_pages drops what lies past p_filesz)
    want = int.from_bytes(pagesets.kdump_held(ref), "little") & int.from_bytes(
        pagesets.elf_held(mine, npfn), "little")
    assert int.from_bytes(pagesets.kdump_held(rebuilt), "little") == want


def _need_kdump_format() -> None:
    from kcore.formats import FORMATS

    if "kdump" not in FORMATS:
        pytest.skip("no kdump format in this kcore")


@pytest.mark.parametrize("level", (16, 30))
def test_kdump_bitmap_is_makedumpfiles(dense, level, tmp_path):
    """--format kdump: its bitmap 2 is makedumpfile's, page for page (same format, same rules)."""
    need_makedumpfile()
    _need_kdump_format()
    name, root, core, _npfn = dense
    mine = tmp_path / "kcore.kdump"
    kcore_dump(root, core, mine, "-d", str(level), "--format", "kdump")
    theirs = tmp_path / "makedumpfile.kdump"
    pagesets.makedumpfile(["-d", str(level)], core, theirs)
    a, b = pagesets.kdump_held(mine), pagesets.kdump_held(theirs)
    n = min(len(a), len(b))
    assert not any(a[n:]) and not any(b[n:])
    count, first = pagesets.differences(a[:n], b[:n])
    assert count == 0, f"{name} -d {level}: {count} pages differ, first pfns {first}"
