"""The engine's threaded paths (threads > 1) against real faults and the pure-Python oracle.

Chunks are made a few pages long so that a small mapping spans many of them and the
threads really do finish out of order.
"""

from __future__ import annotations

import errno
import os
import random
import threading

import pytest

from kcore import engine
from kcore.errors import FaultError
from tests import pyengine
from tests.engine_memchild import PAGE, MemChild, expected_memory


@pytest.fixture(scope="module")
def child():
    with MemChild() as c:
        yield c


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 7 * PAGE)
    monkeypatch.setattr(engine, "PIECE", 5 * PAGE)


def _mapped(tmp_path, child, npages: int, seed: int, zero_frac: float = 0.3,
            hole_frac: float = 0.05):
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(npages * PAGE))
    for i in range(npages):
        if rng.random() < zero_frac:
            data[i * PAGE:(i + 1) * PAGE] = bytes(PAGE)
    data[-2 * PAGE:] = bytes(2 * PAGE)  # a zero tail: sparse output must still be full length
    holes = sorted({3, *(i for i in range(npages) if rng.random() < hole_frac)})
    path = tmp_path / f"mem-{seed}"
    path.write_bytes(data)
    return child.map(path, npages, holes), bytes(data), holes


def _data_extents(path) -> set[int]:
    """The pages of a file that SEEK_DATA/SEEK_HOLE call data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, pages = os.fstat(fd).st_size, 0, set()
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            pages.update(range(start // PAGE, end // PAGE))
            pos = end
        return pages
    finally:
        os.close(fd)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_threaded_copy_to_a_file_equals_memory_and_oracle(tmp_path, child, sparse):
    npages = 300
    addr, data, holes = _mapped(tmp_path, child, npages, seed=11)
    mem = expected_memory(data, holes)
    try:
        out = tmp_path / "out"
        dst = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
        seen: list[int] = []
        try:
            st = engine.copy_range(child.fd, addr, dst, PAGE, npages * PAGE, sparse=sparse,
                                   threads=3, progress=seen.append)
        finally:
            os.close(dst)
        assert out.read_bytes() == bytes(PAGE) + mem
        assert sum(seen) == npages * PAGE and len(seen) > 20
        oracle_dst = os.open(tmp_path / "oracle", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            ref = pyengine.copy_range(child.fd, addr, oracle_dst, PAGE, npages * PAGE,
                                       sparse=sparse)
        finally:
            os.close(oracle_dst)
        assert st == ref
        assert st.pages_zero_filled == len(holes)
        assert st.first_error_offset == addr + holes[0] * PAGE
        if sparse:
            data_pages = {i + 1 for i in range(npages) if any(mem[i * PAGE:(i + 1) * PAGE])}
            assert _data_extents(out) == data_pages
            assert st.pages_sparse == npages - len(data_pages)
    finally:
        child.unmap(addr, npages)


def test_threaded_copy_to_a_pipe_is_in_order(tmp_path, child):
    npages = 260
    addr, data, holes = _mapped(tmp_path, child, npages, seed=12)
    try:
        r, w = os.pipe()
        got = bytearray()

        def drain() -> None:
            while chunk := os.read(r, 1 << 16):
                got.extend(chunk)

        t = threading.Thread(target=drain)
        t.start()
        try:
            st = engine.copy_range(child.fd, addr, w, None, npages * PAGE, threads=2)
        finally:
            os.close(w)
            t.join()
            os.close(r)
        assert bytes(got) == expected_memory(data, holes)
        assert st.pages_zero_filled == len(holes) and st.bytes_written == npages * PAGE
        assert st.first_error_offset == addr + holes[0] * PAGE
    finally:
        child.unmap(addr, npages)


@pytest.mark.parametrize("to_stream", [False, True], ids=["offset", "stream"])
def test_threaded_strict_names_the_first_hole(tmp_path, child, to_stream):
    npages = 200
    path = tmp_path / "strict"
    path.write_bytes(os.urandom(npages * PAGE))
    addr = child.map(path, npages, [150, 40, 41])
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)  # write(): in order
    try:
        with pytest.raises(FaultError) as exc:
            engine.copy_range(child.fd, addr, out, None if to_stream else 0, npages * PAGE,
                              strict=True, threads=4, path="/proc/N/mem")
        assert exc.value.address == addr + 40 * PAGE
    finally:
        os.close(out)
        child.unmap(addr, npages)


def test_threaded_data_runs_equal_the_oracle(tmp_path, child):
    npages = 400
    addr, data, holes = _mapped(tmp_path, child, npages, seed=13, zero_frac=0.6)
    try:
        for granule in (PAGE, 4 * PAGE):
            seen: list[int] = []
            runs, st = engine.data_runs(child.fd, addr, npages * PAGE, granule=granule,
                                        threads=2, progress=seen.append)
            ref_runs, ref = pyengine.data_runs(child.fd, addr, npages * PAGE, granule=granule)
            assert runs == ref_runs and st == ref
            assert sum(seen) == npages * PAGE
    finally:
        child.unmap(addr, npages)


@pytest.mark.parametrize("to_stream", [False, True], ids=["offset", "stream"])
def test_threaded_copy_to_dev_full_is_enospc(tmp_path, to_stream):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * PAGE))
    s = os.open(src, os.O_RDONLY)
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as exc:
            engine.copy_range(s, 0, full, None if to_stream else 0, 64 * PAGE, threads=2,
                              dst_path="/dev/full")
        assert exc.value.errno == errno.ENOSPC and exc.value.filename == "/dev/full"
        assert not isinstance(exc.value, FaultError)
    finally:
        os.close(s)
        os.close(full)


def test_run_ordered_waits_for_running_jobs_through_a_second_interrupt():
    """Ctrl-C twice: the jobs already running still end before the exception leaves (their
    caller closes the fds they use right after)."""
    import signal
    import time

    class Stop(Exception):
        pass

    started, ended = [], []

    def work(pos: int, n: int, slot: int) -> int:
        started.append(pos)
        time.sleep(0.4)
        ended.append(pos)
        return 0

    def on_alarm(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)  # every 0.1 s until cancelled
        with pytest.raises(KeyboardInterrupt):
            engine.run_ordered(((k, 1) for k in range(100)), work, lambda *a: None, 2, 3)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert started and sorted(started) == sorted(ended)
    assert len(started) < 100


def test_threaded_copy_to_dev_null_counts_as_the_oracle(tmp_path, child):
    """To /dev/null (no order to keep: the threads write at offsets) the counts stay exact."""
    npages = 240
    addr, _data, holes = _mapped(tmp_path, child, npages, seed=14)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        assert engine.discards(null)
        st = engine.copy_range(child.fd, addr, null, None, npages * PAGE, threads=3)
        assert st == pyengine.copy_range(child.fd, addr, null, None, npages * PAGE)
        assert st.pages_zero_filled == len(holes) and st.bytes_written == npages * PAGE
    finally:
        os.close(null)
        child.unmap(addr, npages)
