"""kdump, flattened and AVML files as sources: corrupt or truncated ones give one line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kcore import codecs
from kcore.wire import avml, diskdump
from tests.commands.test_dump import dump, source_spec
from tests.helpers import FIXTURE_NAMES, run_kcore, scratch_dir, shared_fixture

NOKASLR, _KASLR = FIXTURE_NAMES


@pytest.fixture(scope="module")
def made(request):
    """An lzo kdump file, its flattened stream and an AVML image of the nokaslr fixture."""
    if not (codecs.available("lzo") and codecs.available("snappy")):
        pytest.skip("liblzo2 or libsnappy is missing")
    folder = scratch_dir(request, "hostile")
    dump(NOKASLR, folder / "mem.kdump", "--format", "kdump", "--compress", "lzo")
    dump(NOKASLR, folder / "mem.avml", "--format", "avml")
    root = shared_fixture(NOKASLR) / "root"
    with open(folder / "mem.flat", "wb") as f:
        r = run_kcore("dump", "--root", str(root), "--source", source_spec(NOKASLR),
                      "--format", "kdump", "--compress", "lzo", "-o", "-", stdout=f,
                      stderr=-1, capture_output=False)
    assert r.returncode == 0, r.stderr.decode()
    return folder


def fails(spec: str, tmp_path: Path) -> str:
    """Dump from spec; assert exit 2, one line naming a hex offset, no output; the line."""
    root = shared_fixture(NOKASLR) / "root"
    out = tmp_path / "out.elf"
    r = run_kcore("dump", "--root", str(root), "--source", spec, "-o", str(out))
    err = r.stderr.decode().strip()
    assert r.returncode == 2, err
    assert "\n" not in err and "Traceback" not in err and "offset 0x" in err, err
    assert not out.exists()
    return err


def first_compressed_page(path: Path) -> tuple[int, int, int]:
    """(descriptor offset, data offset, size) of the first compressed page of a kdump file."""
    data = path.read_bytes()
    h = diskdump.DiskDumpHeader.unpack(data)
    geo = diskdump.Geometry(h.block_size, h.sub_hdr_size, h.bitmap_blocks, 0)
    at = geo.desc_offset
    while True:
        off, size, flags, _ = diskdump.PAGE_DESC.unpack_from(data, at)
        if flags & diskdump.DH_LZO:
            return at, off, size
        at += diskdump.PAGE_DESC.size


def test_a_summary_json_and_manifest_give_the_codec_and_ratio(tmp_path):
    root = shared_fixture(NOKASLR) / "root"
    out = tmp_path / "mem.kdump"
    r = run_kcore("dump", "--root", str(root), "--source", source_spec(NOKASLR), "--format",
                  "kdump", "--compress", "zlib", "--json", "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    c = json.loads(r.stdout)["compression"]
    size = out.stat().st_size
    assert c["codec"] == "zlib" and c["output_bytes"] == size
    real = json.loads((shared_fixture(NOKASLR) / "expected/kcore.json").read_text())
    ram = sum(p["p_memsz"] for p in real["phdrs"] if p.get("kind") == "KCORE_RAM")
    assert c["input_bytes"] == ram  # the capture's RAM pages (its real kcore's RAM segments)
    assert c["ratio"] == round(c["input_bytes"] / size, 3) and c["ratio"] > 2
    assert json.loads(Path(f"{out}.json").read_text())["compression"] == c
    assert out.read_bytes()[:8] == b"KDUMP   "


def test_an_unknown_codec_exits_2_listing_the_available_ones(tmp_path):
    root = shared_fixture(NOKASLR) / "root"
    r = run_kcore("dump", "--root", str(root), "--source", source_spec(NOKASLR), "--format",
                  "kdump", "--compress", "lz4", "-o", str(tmp_path / "x"))
    assert r.returncode == 2
    assert "unknown codec 'lz4': choose one of zstd, lzo" in r.stderr.decode()


def test_truncated_kdump_files_name_the_offset(made, tmp_path):
    data = (made / "mem.kdump").read_bytes()
    for cut, words in ((0x100, "truncated disk_dump_header at offset 0x0"),
                       (0x3000, "offset"),
                       (len(data) * 4 // 5, "data past the end of the file for PFN")):
        bad = tmp_path / f"cut-{cut:#x}.kdump"
        bad.write_bytes(data[:cut])
        assert words in fails(f"kdump:{bad}", tmp_path)


def test_a_corrupt_page_names_its_data_and_descriptor_offsets(made, tmp_path):
    data = bytearray((made / "mem.kdump").read_bytes())
    desc_at, off, size = first_compressed_page(made / "mem.kdump")
    data[off:off + size] = b"\xff" * size
    bad = tmp_path / "corrupt.kdump"
    bad.write_bytes(data)
    err = fails(str(bad), tmp_path)  # detected by its signature
    assert "corrupt page data, size or flags for PFN" in err
    assert f"at offset {off:#x}" in err and f"descriptor at offset {desc_at:#x}" in err


def test_a_truncated_flattened_stream_names_the_offset(made, tmp_path):
    data = (made / "mem.flat").read_bytes()
    bad = tmp_path / "cut.flat"
    bad.write_bytes(data[:len(data) // 2])
    assert "truncated record data at offset 0x" in fails(str(bad), tmp_path)
    r = run_kcore("rebuild", str(bad), str(tmp_path / "rebuilt.kdump"))
    assert r.returncode == 2 and "truncated record data at offset 0x" in r.stderr.decode()
    assert not (tmp_path / "rebuilt.kdump").exists()


def test_avml_with_a_bad_crc_or_cut_short_names_the_offset(made, tmp_path):
    data = bytearray((made / "mem.avml").read_bytes())
    first_chunk = avml.HEADER.size + len(avml.STREAM_IDENTIFIER)
    bad = tmp_path / "crc.avml"
    data[first_chunk + 4] ^= 0xFF  # the first chunk's masked CRC-32C
    bad.write_bytes(data)
    assert f"CRC mismatch in the snappy stream at offset {first_chunk:#x}" in fails(
        f"avml:{bad}", tmp_path)
    data[first_chunk + 4] ^= 0xFF
    cut = tmp_path / "cut.avml"
    cut.write_bytes(data[:len(data) - 100])
    assert "truncated" in fails(str(cut), tmp_path)


def test_lime_refuses_avml_and_names_the_avml_source(made, tmp_path):
    err = fails(f"lime:{made / 'mem.avml'}", tmp_path)
    assert f"read it as avml:{made / 'mem.avml'}" in err


def test_unpacking_goes_to_kcore_tmpdir(made, tmp_path, monkeypatch):
    """KCORE_TMPDIR names where a compressed source is unpacked (nothing left behind)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("KCORE_TMPDIR", str(scratch))
    root = shared_fixture(NOKASLR) / "root"
    r = run_kcore("dump", "--root", str(root), "--source", f"kdump:{made / 'mem.kdump'}",
                  "--format", "lime", "-o", str(tmp_path / "mem.lime"))
    assert r.returncode == 0, r.stderr.decode()
    assert list(scratch.iterdir()) == []
    shutil.rmtree(scratch)


@pytest.mark.parametrize("failing", [0, 1, 5])
def test_a_batch_failing_mid_dump_stops_it_with_one_line(failing, tmp_path, monkeypatch,
                                                          capsys):
    """A batch whose compression fails (here the 1st, 2nd or 6th) ends the threaded dump with
    its error while the batches around it run: exit 1, one line, nothing left behind."""
    import errno
    import faulthandler
    import sys

    from kcore.cli import main

    real = codecs.compress_pages
    calls = []

    def compress_pages(*args):
        calls.append(1)
        if len(calls) == failing + 1:
            raise OSError(errno.EIO, "injected")
        return real(*args)

    monkeypatch.setattr(codecs, "compress_pages", compress_pages)
    root = shared_fixture(NOKASLR) / "root"
    out = tmp_path / "mem.kdump"
    # a hang fails the run at once, not at CI's clock
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)
    try:
        rc = main(["dump", "--root", str(root), "--source", source_spec(NOKASLR), "--format",
                   "kdump", "--compress", "none", "--threads", "2", "-q", "-o", str(out)])
    finally:
        faulthandler.cancel_dump_traceback_later()
    err = capsys.readouterr().err
    assert rc == 1 and "injected" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
