"""kcore.wire.flattened against makedumpfile's flattened format: `makedumpfile -F` wrote the
stream, `makedumpfile -R` rebuilt the file; kcore's reader must rebuild the same bytes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kcore.wire import flattened
from tests.wire.test_diskdump import makedumpfile_files


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """makedumpfile's kdump file and flattened stream of the same memory."""
    return makedumpfile_files(tmp_path_factory.mktemp("makedumpfile"))


def test_header_and_records_are_makedumpfiles(made: dict[str, Path]) -> None:
    """The 4 KiB header, the record headers and the end record are makedumpfile's bytes."""
    data = made["flat"].read_bytes()
    assert flattened.is_flattened(data[:flattened.HEADER_SIZE])
    assert not flattened.is_flattened(made["kdump"].read_bytes()[:flattened.HEADER_SIZE])
    assert data[:flattened.HEADER_SIZE] == flattened.file_header()
    assert data[-flattened.RECORD.size:] == flattened.end_record()
    offset, size = flattened.RECORD.unpack_from(data, flattened.HEADER_SIZE)
    assert flattened.record(offset, size) == data[flattened.HEADER_SIZE:][:flattened.RECORD.size]
    assert offset == 0 and size > 0  # the disk_dump_header comes first


def test_rebuild_equals_makedumpfile_R(made: dict[str, Path], tmp_path: Path) -> None:
    """rebuild() of makedumpfile's stream, read as from a pipe, is the file makedumpfile -R
    makes of it, byte for byte."""
    theirs = tmp_path / "theirs.kdump"
    with open(made["flat"], "rb") as stream:
        r = subprocess.run(["makedumpfile", "-R", str(theirs)], stdin=stream,
                           capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    mine = tmp_path / "mine.kdump"
    seen: list[int] = []
    with open(made["flat"], "rb") as src, open(mine, "wb") as dst:
        size = flattened.rebuild(lambda n: os.read(src.fileno(), min(n, 65536)), dst.fileno(),
                                 seen.append)
    assert mine.read_bytes() == theirs.read_bytes()
    assert size == theirs.stat().st_size and 0 < sum(seen) <= size


def test_truncated_or_foreign_streams_say_where(made: dict[str, Path], tmp_path: Path) -> None:
    """A stream cut inside a record, and a file that is no stream, are FlatFormatErrors naming
    the offset."""
    data = made["flat"].read_bytes()
    cut = flattened.HEADER_SIZE + flattened.RECORD.size + 100
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for stream, message in ((data[:cut], "truncated record data at offset 0x1010"),
                                (made["kdump"].read_bytes(), "no \"makedumpfile\" signature")):
            pos = [0]

            def read(n: int, stream: bytes = stream, pos: list[int] = pos) -> bytes:
                chunk = stream[pos[0]:pos[0] + n]
                pos[0] += len(chunk)
                return chunk

            with pytest.raises(flattened.FlatFormatError, match=message):
                flattened.rebuild(read, out)
    finally:
        os.close(out)
