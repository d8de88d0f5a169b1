"""The copy engine on plain files: contents, counts, sparse output, errors, chunking."""

from __future__ import annotations

import errno
import os

import pytest

from kcore import engine
from kcore.errors import FaultError
from tests import pyengine

PAGE = 4096


@pytest.fixture(params=["c", "py"])
def eng(request):
    """The C engine and its pure-Python oracle: every test here holds for both."""
    return engine if request.param == "c" else pyengine


def _file(path, data: bytes) -> int:
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_read_whole_file(tmp_path, eng):
    data = os.urandom(3 * PAGE + 100)
    fd = _file(tmp_path / "src", data)
    got, st = eng.read_range(fd, 0, len(data))
    assert got == data
    assert st.bytes_read == len(data) and st.pages_zero_filled == 0
    assert st.first_error_offset is None and st.first_errno == 0


def test_read_crossing_end_of_source(tmp_path, eng):
    """Bytes past EOF read as zeros; the page holding EOF and every later page count."""
    data = os.urandom(2 * PAGE + 10)
    fd = _file(tmp_path / "src", data)
    got, st = eng.read_range(fd, PAGE, 4 * PAGE)
    assert got == data[PAGE:] + bytes(4 * PAGE - (len(data) - PAGE))
    assert st.bytes_read == len(data) - PAGE
    assert st.pages_zero_filled == 3  # the partial page at EOF and two beyond it
    assert st.first_error_offset == len(data) and st.first_errno == errno.EIO


def test_strict_past_end_raises_fault_with_offset(tmp_path, eng):
    fd = _file(tmp_path / "src", os.urandom(PAGE + 7))
    with pytest.raises(FaultError) as exc:
        eng.read_range(fd, 0, 3 * PAGE, strict=True, path=tmp_path / "src")
    assert exc.value.address == PAGE + 7
    assert "0x1007" in str(exc.value)


def test_copy_to_dev_full_is_enospc_not_a_fault(tmp_path, eng):
    fd = _file(tmp_path / "src", os.urandom(8 * PAGE))
    out = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as exc:
            eng.copy_range(fd, 0, out, None, 8 * PAGE, dst_path="/dev/full")
        assert exc.value.errno == errno.ENOSPC
        assert not isinstance(exc.value, FaultError)
        assert exc.value.filename == "/dev/full"
    finally:
        os.close(out)


def test_bad_source_fd_is_oserror(eng):
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as exc:
        eng.read_range(r, 0, PAGE)
    assert exc.value.errno == errno.EBADF


def _data_pages(path) -> set[int]:
    """Pages of a file that hold data, by SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    pages, pos = set(), 0
    try:
        while True:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                return pages
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            pages.update(range(start // PAGE, pos // PAGE))
    finally:
        os.close(fd)


@pytest.mark.parametrize("stale", [False, True], ids=["presized", "stale"])
def test_sparse_copy_into_a_presized_file(tmp_path, eng, stale):
    """An output sized first (ftruncate) or holding old bytes: zeros read back, as holes."""
    kinds = [1, 0, 0, 1, 1, 0, 0, 0, 1] * 40 + [0, 0]
    data = b"".join(os.urandom(PAGE) if k else bytes(PAGE) for k in kinds)
    fd = _file(tmp_path / "src", data)
    out = tmp_path / "out"
    d = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if stale:
            os.write(d, b"\xee" * len(data))
        else:
            os.ftruncate(d, len(data))
        os.lseek(d, 1234, os.SEEK_SET)
        st = eng.copy_range(fd, 0, d, 0, len(data), sparse=True)
        assert os.lseek(d, 0, os.SEEK_CUR) == 1234  # the file position is left alone
    finally:
        os.close(d)
    assert out.read_bytes() == data
    assert st.pages_sparse == kinds.count(0)
    if eng is engine or not stale:  # the oracle writes zeros over stale bytes; C punches holes
        assert _data_pages(out) == {i for i, k in enumerate(kinds) if k}


def test_sparse_is_ignored_for_pipes_and_devices(tmp_path, eng):
    data = os.urandom(PAGE) + bytes(3 * PAGE) + os.urandom(10)
    fd = _file(tmp_path / "src", data)
    r, w = os.pipe()
    try:
        st = eng.copy_range(fd, 0, w, None, len(data), sparse=True)
        os.close(w)
        w = -1
        assert os.read(r, 1 << 20) == data
        assert st.pages_sparse == 0 and st.bytes_written == len(data)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_read_spans_matches_pread(tmp_path) -> None:
    """Scattered spans in one call: each span's bytes are what os.pread gives there, in the
    order asked, their end times rise, and pages past the end read as zeros (counted)."""
    data = os.urandom(16 * PAGE + 100)
    src = tmp_path / "src"
    src.write_bytes(data)
    spans = [(9 * PAGE, PAGE), (2 * PAGE, 3 * PAGE), (16 * PAGE, 2 * PAGE), (0, PAGE)]
    with open(src, "rb") as f:
        buf, ends, st = engine.read_spans(f.fileno(), spans)
        want = b"".join(os.pread(f.fileno(), n, off).ljust(n, b"\0") for off, n in spans)
    assert bytes(buf) == want
    assert len(ends) == 5 and ends == sorted(ends) and ends[0] > 0
    assert st.pages_zero_filled == 2 and st.bytes_read == 5 * PAGE + 100
    assert engine.read_spans(0, [])[0] == bytearray()
