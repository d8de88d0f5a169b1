"""kcore.wire.diskdump against a file makedumpfile wrote: `makedumpfile -c -d 31` of a real
kernel's memory (the nokaslr capture, as a dense ELF core).

Every layout of the module reads makedumpfile's bytes and packs them back: the disk_dump_header,
the kdump_sub_header, where the notes, bitmaps, page descriptors and data sit (Geometry), the
bitmaps as page runs, the VMCOREINFO note.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kcore.iomem import parse_iomem
from kcore.wire import diskdump
from tests.commands.test_dump import source_spec
from tests.helpers import FIXTURE_NAMES, run_kcore, shared_fixture

NOKASLR = FIXTURE_NAMES[0]
PAGE = 4096
_MADE: dict[str, Path] = {}


def makedumpfile_files(folder: Path) -> dict[str, Path]:
    """makedumpfile -c -d 31 of the nokaslr capture: the kdump file and its flattened stream
    (-F), written once per session into folder (the dense ELF core in between is removed)."""
    if shutil.which("makedumpfile") is None:
        pytest.skip("makedumpfile is not installed (.ci/run installs it)")
    if not _MADE:
        dense = folder / "dense.elf"
        r = run_kcore("dump", "--root", str(shared_fixture(NOKASLR) / "root"), "--source",
                      source_spec(NOKASLR), "--no-elide", "--no-text", "--no-digest", "-q",
                      "-o", str(dense))
        assert r.returncode == 0, r.stderr.decode()
        try:
            kdump, flat = folder / "mem.kdump", folder / "mem.flat"
            r = subprocess.run(["makedumpfile", "-c", "-d", "31", str(dense), str(kdump)],
                               capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            with open(flat, "wb") as out:
                r = subprocess.run(["makedumpfile", "-F", "-c", "-d", "31", str(dense)],
                                   stdout=out, stderr=subprocess.PIPE, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-2000:]
        finally:
            dense.unlink(missing_ok=True)
            Path(f"{dense}.json").unlink(missing_ok=True)
        _MADE.update(kdump=kdump, flat=flat)
    return _MADE


class Made:
    """makedumpfile's kdump file, parsed with kcore.wire.diskdump."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        self.head = diskdump.DiskDumpHeader.unpack(self.data)
        self.sub = diskdump.SubHeader.unpack(self.data[self.head.block_size:],
                                             self.head.header_version)
        half = self.head.bitmap_blocks * self.head.block_size // 2
        at = (1 + self.head.sub_hdr_size) * self.head.block_size
        self.bitmap1 = self.data[at:at + half]
        self.bitmap2 = self.data[at + half:at + 2 * half]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    """The kdump file makedumpfile made."""
    return Made(makedumpfile_files(tmp_path_factory.mktemp("makedumpfile"))["kdump"])


def test_disk_dump_header(made: Made) -> None:
    """makedumpfile's header reads as version 6 with 4 KiB blocks, the kernel's utsname, zlib
    pages, and packs back to its 464 bytes."""
    root = shared_fixture(NOKASLR) / "root"
    h = made.head
    assert (h.signature, h.header_version, h.block_size) == (diskdump.KDUMP_SIGNATURE, 6, PAGE)
    release = (root / "proc/sys/kernel/osrelease").read_text().strip()
    assert h.utsname[2].rstrip(b"\0").decode() == release
    assert h.utsname[4].rstrip(b"\0") == b"x86_64"
    assert h.status & diskdump.DH_CODECS == diskdump.DH_ZLIB and h.nr_cpus == 1
    assert h.pack() == made.data[:diskdump.HEADER.size]


def test_sub_header(made: Made) -> None:
    """The sub header: level 31, phys_base from VMCOREINFO, max_mapnr the end of System RAM
    in /proc/iomem, and the VMCOREINFO it points at the real kcore's note; it packs back."""
    folder = shared_fixture(NOKASLR)
    s = made.sub
    assert s.dump_level == 31 and s.split == 0
    ram = parse_iomem((folder / "root/proc/iomem").read_text(), "iomem").system_ram()
    end_pfn = (max(end for _start, end in ram) + 1) // PAGE  # iomem's ends are inclusive
    assert s.max_mapnr == made.head.max_mapnr == end_pfn
    info = made.data[s.offset_vmcoreinfo:s.offset_vmcoreinfo + s.size_vmcoreinfo]
    kcore = json.loads((folder / "expected/kcore.json").read_text())
    note = next(n for n in kcore["notes"] if n["name"] == "VMCOREINFO")
    assert info.decode() == note["text"]
    phys_base = next(int(line.partition("=")[2]) for line in note["text"].splitlines()
                     if line.startswith("NUMBER(phys_base)="))
    assert s.phys_base == phys_base
    start = made.head.block_size
    assert s.pack() == made.data[start:start + diskdump.SUB_HEADER.size]
    notes = made.data[s.offset_note:s.offset_note + s.size_note]
    assert diskdump.vmcoreinfo_span(notes) == (s.offset_vmcoreinfo - s.offset_note,
                                               s.size_vmcoreinfo)


def test_bitmaps_are_page_runs(made: Made) -> None:
    """Bitmap 1 holds the System RAM page frames of /proc/iomem; runs_of and bitmap_of turn
    both bitmaps into runs and back."""
    ram = parse_iomem((shared_fixture(NOKASLR) / "root/proc/iomem").read_text(),
                      "iomem").system_ram()
    want = [(-(-start // PAGE), (end + 1) // PAGE - -(-start // PAGE)) for start, end in ram]
    assert diskdump.runs_of(made.bitmap1, made.sub.max_mapnr) == want
    for bitmap in (made.bitmap1, made.bitmap2):
        runs = diskdump.runs_of(bitmap, made.sub.max_mapnr)
        assert diskdump.bitmap_of(runs, len(bitmap)) == bytearray(bitmap)


def test_geometry_places_every_part(made: Made) -> None:
    """Geometry.of gives makedumpfile's sub header and bitmap sizes; the first page descriptor
    points at its data_offset, the last one's data ends the file."""
    dumped = sum(n for _pfn, n in diskdump.runs_of(made.bitmap2, made.sub.max_mapnr))
    g = diskdump.Geometry.of(PAGE, made.sub.max_mapnr, made.sub.size_note, dumped)
    assert (g.sub_hdr_size, g.bitmap_blocks) == (made.head.sub_hdr_size, made.head.bitmap_blocks)
    assert g.notes_offset == made.sub.offset_note
    assert g.bitmap_len == len(made.bitmap1)
    first = diskdump.PAGE_DESC.unpack_from(made.data, g.desc_offset)
    last = diskdump.PAGE_DESC.unpack_from(made.data, g.data_offset - diskdump.PAGE_DESC.size)
    assert first[0] == g.data_offset  # -d 31 leaves zero pages out: no shared zero page
    assert last[0] + last[1] == len(made.data)
    for _offset, size, flags, _pf in (first, last):
        assert 0 < size <= PAGE and flags & ~diskdump.DH_CODECS == 0


# field: (its value in makedumpfile's file, a bad value), the sub header's fields from its block
BAD_FIELDS = {
    "signature": (b"KDUMP   ", b"KDUMPX  "),
    "header_version": (6, 0),
    "block_size": (PAGE, 3000),
    "sub_hdr_size": (None, 1 << 30),
    "bitmap_blocks": (None, 3),
    "max_mapnr": (None, None),
    "split": (0, 1),
    "size_vmcoreinfo": (None, 1 << 40),
    "max_mapnr_64": (None, 1 << 40),
}


@pytest.mark.parametrize("field", list(BAD_FIELDS))
def test_header_errors_name_the_field_where_it_is(made: Made, tmp_path: Path, field: str,
                                                  ) -> None:
    """A bad value in each disk_dump_header / kdump_sub_header field of makedumpfile's file:
    kcore verify reports it at the file offset where makedumpfile wrote that field, and the
    kdump: source refuses the file in one line naming the field and its offset."""
    from kcore.sources import open_source
    from kcore.sources.kdump import KdumpFormatError
    from kcore.verify import verify

    was, bad = BAD_FIELDS[field]
    at = (diskdump.FIELD_OFFSETS.get(field)
          if field in diskdump.FIELD_OFFSETS
          else made.head.block_size + diskdump.SUB_FIELD_OFFSETS[field])
    data = bytearray(made.data)
    values = {"signature": made.head.signature, "header_version": made.head.header_version,
              "block_size": made.head.block_size, "sub_hdr_size": made.head.sub_hdr_size,
              "bitmap_blocks": made.head.bitmap_blocks, "max_mapnr": made.head.max_mapnr,
              "split": made.sub.split, "size_vmcoreinfo": made.sub.size_vmcoreinfo,
              "max_mapnr_64": made.sub.max_mapnr}
    if field == "signature":
        assert data[at:at + 8] == was
        data[at:at + 8] = bad
    else:
        width = 8 if field in ("size_vmcoreinfo", "max_mapnr_64") else 4
        fmt = "<Q" if width == 8 else "<I"
        # the offset holds what makedumpfile wrote there (and what its other fields imply)
        assert struct.unpack_from(fmt, data, at)[0] == values[field]
        if was is not None:
            assert values[field] == was
        if field == "max_mapnr":  # version 6 files read max_mapnr_64: clear it to reach this
            struct.pack_into("<Q", data, made.head.block_size + 96, 0)
            bad = made.head.bitmap_blocks * made.head.block_size * 4 + 1
        struct.pack_into(fmt, data, at, bad)
    path = tmp_path / "bad.kdump"
    path.write_bytes(data)
    if field == "signature":  # no kdump signature: verify does not take it for kdump at all
        from kcore.errors import InputError

        with pytest.raises(InputError, match="not a dump kcore knows"):
            verify(str(path))
    else:
        found = verify(str(path)).as_dict()
        assert not found["ok"]
        problem = found["problems"][0]
        assert int(problem["offset"], 16) == at, (field, problem)
        assert field in problem["what"], (field, problem)
    with pytest.raises(KdumpFormatError) as exc:
        open_source(f"kdump:{path}").close()
    message = str(exc.value)
    assert f"{field} at offset {at:#x}" in message and "\n" not in message, message
