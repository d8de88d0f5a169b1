"""The copy engine against real faults: /proc/PID/mem holes, SIGBUS, EINTR, sparse output."""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from kcore import engine
from kcore.errors import FaultError
from tests import pyengine
from tests.engine_memchild import PAGE, MemChild, expected_memory


@pytest.fixture(scope="module")
def child():
    with MemChild() as c:
        yield c


def _layout(tmp_path, npages: int, seed: int, zero_frac: float = 0.2, hole_frac: float = 0.1):
    """A file of npages random pages (some all-zero) and a random set of hole pages."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(npages * PAGE))
    for i in range(npages):
        if rng.random() < zero_frac:
            data[i * PAGE:(i + 1) * PAGE] = bytes(PAGE)
    holes = sorted(i for i in range(npages) if rng.random() < hole_frac)
    path = tmp_path / f"layout-{seed}"
    path.write_bytes(data)
    return path, bytes(data), holes


def test_proc_pid_mem_holes_are_zeros_and_counted(tmp_path, child):
    npages = 700  # crosses 1 MiB blocks
    path, data, holes = _layout(tmp_path, npages, seed=1)
    holes = sorted({0, 255, 256, 257, npages - 1, *holes})  # block edges and both ends
    addr = child.map(path, npages, holes)
    try:
        got, st = engine.read_range(child.fd, addr, npages * PAGE)
        assert got == expected_memory(data, holes)
        assert st.pages_zero_filled == len(holes)
        assert st.bytes_read == (npages - len(holes)) * PAGE
        assert st.first_error_offset == addr and st.first_errno == errno.EIO
        assert (got, st) == pyengine.read_range(child.fd, addr, npages * PAGE)
    finally:
        child.unmap(addr, npages)


def test_proc_pid_mem_unaligned_range(tmp_path, child):
    npages = 40
    path, data, holes = _layout(tmp_path, npages, seed=2, hole_frac=0)
    holes = [3, 4, 9]
    addr = child.map(path, npages, holes)
    try:
        start, length = 2 * PAGE + 100, 8 * PAGE - 200  # ends mid-page 9, a hole
        got, st = engine.read_range(child.fd, addr + start, length)
        assert got == expected_memory(data, holes)[start:start + length]
        assert st.pages_zero_filled == 3
        assert st.first_error_offset == addr + 3 * PAGE
    finally:
        child.unmap(addr, npages)


def test_proc_pid_mem_strict_raises_at_first_hole(tmp_path, child):
    npages = 300
    path, data, _ = _layout(tmp_path, npages, seed=3, hole_frac=0)
    addr = child.map(path, npages, [270, 280])
    try:
        with pytest.raises(FaultError) as exc:
            engine.read_range(child.fd, addr, npages * PAGE, strict=True, path="/proc/N/mem")
        assert exc.value.address == addr + 270 * PAGE
        assert f"{addr + 270 * PAGE:#x}" in str(exc.value)
        # Up to the hole the strict read still works.
        got, st = engine.read_range(child.fd, addr, 270 * PAGE, strict=True)
        assert got == data[:270 * PAGE] and st.pages_zero_filled == 0
    finally:
        child.unmap(addr, npages)


def test_proc_pid_mem_prot_none_pages_read_as_data(tmp_path, child):
    """/proc/PID/mem reads PROT_NONE pages (FOLL_FORCE); process_vm_readv does not, so the
    engine's fast path must hand them to pread. Starting on page 0 (PROT_NONE) the fast
    path is off for the call; starting on page 1 it is on."""
    npages = 400
    path, data, _ = _layout(tmp_path, npages, seed=6, hole_frac=0)
    noaccess, holes = [0, 10, 11, 300], [200]
    addr = child.map(path, npages, holes, noaccess)
    try:
        mem = expected_memory(data, holes)
        for first in (0, 1):
            start, length = addr + first * PAGE, (npages - first) * PAGE
            got, st = engine.read_range(child.fd, start, length)
            assert got == mem[first * PAGE:]
            assert st.pages_zero_filled == 1 and st.first_error_offset == addr + 200 * PAGE
            assert (got, st) == pyengine.read_range(child.fd, start, length)
    finally:
        child.unmap(addr, npages)


def test_proc_pid_mem_offsets_past_2_63_are_einval_zeros(child):
    """Offsets >= 2^63 give EINVAL from pread: unreadable, not an error (docs/kernel-facts.md)."""
    got, st = engine.read_range(child.fd, 1 << 63, 2 * PAGE)
    assert got == bytes(2 * PAGE)
    assert st.pages_zero_filled == 2 and st.first_errno == errno.EINVAL
    assert st.first_error_offset == 1 << 63


def test_data_runs_on_proc_pid_mem(tmp_path, child):
    npages = 600
    path, data, holes = _layout(tmp_path, npages, seed=4, zero_frac=0.5)
    addr = child.map(path, npages, holes)
    try:
        mem = expected_memory(data, holes)
        runs, st = engine.data_runs(child.fd, addr, npages * PAGE)
        want: list[tuple[int, int]] = []
        for i in range(npages):
            if any(mem[i * PAGE:(i + 1) * PAGE]):
                if want and sum(want[-1]) == addr + i * PAGE:
                    want[-1] = (want[-1][0], want[-1][1] + PAGE)
                else:
                    want.append((addr + i * PAGE, PAGE))
        assert runs == want
        zero_pages = npages - sum(n for _, n in want) // PAGE
        assert st.pages_sparse == zero_pages and st.pages_zero_filled == len(holes)
        assert (runs, st) == pyengine.data_runs(child.fd, addr, npages * PAGE)
        # 64 KiB granules: a granule is data if any of its pages is.
        big, _ = engine.data_runs(child.fd, addr, npages * PAGE, granule=16 * PAGE)
        for start, n in big:
            assert start % (16 * PAGE) == addr % (16 * PAGE) or start == addr
            assert any(mem[start - addr:start - addr + n])
        covered = set()
        for start, n in big:
            covered.update(range((start - addr) // PAGE, (start - addr + n) // PAGE))
        assert all(i in covered for i in range(npages) if any(mem[i * PAGE:(i + 1) * PAGE]))
    finally:
        child.unmap(addr, npages)


def _holes_and_data(path) -> tuple[list[tuple[int, int]], int]:
    """The (start, end) data extents of a file found with SEEK_DATA/SEEK_HOLE, and its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        extents, pos = [], 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            pos = end
        return extents, size
    finally:
        os.close(fd)


@pytest.mark.parametrize("eng", [engine, pyengine], ids=["c", "py"])
def test_sparse_copy_of_proc_pid_mem(tmp_path, child, eng):
    npages = 520
    path, data, holes = _layout(tmp_path, npages, seed=5, zero_frac=0.4)
    # Trailing zero pages: the output must still be full length.
    data = data[:-3 * PAGE] + bytes(3 * PAGE)
    path.write_bytes(data)
    addr = child.map(path, npages, holes)
    try:
        mem = expected_memory(data, holes)
        out = tmp_path / "out"
        dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            st = eng.copy_range(child.fd, addr, dst, 0, npages * PAGE, sparse=True)
        finally:
            os.close(dst)
        assert out.read_bytes() == mem
        data_pages = [i for i in range(npages) if any(mem[i * PAGE:(i + 1) * PAGE])]
        assert st.pages_sparse == npages - len(data_pages)
        assert st.bytes_written == len(data_pages) * PAGE
        extents, size = _holes_and_data(out)
        assert size == npages * PAGE
        found = {p for s, e in extents for p in range(s // PAGE, e // PAGE)}
        assert found == set(data_pages)
        assert os.stat(out).st_blocks * 512 >= len(data_pages) * PAGE
        assert os.stat(out).st_blocks * 512 <= (len(data_pages) + 16) * PAGE  # + fs metadata
    finally:
        child.unmap(addr, npages)


def test_sparse_copy_over_stale_data_leaves_zeros(tmp_path):
    data = os.urandom(4 * PAGE) + bytes(4 * PAGE) + os.urandom(PAGE)
    src = tmp_path / "src"
    src.write_bytes(data)
    out = tmp_path / "out"
    out.write_bytes(b"\xff" * 20 * PAGE)
    s, d = os.open(src, os.O_RDONLY), os.open(out, os.O_WRONLY)
    try:
        st = engine.copy_range(s, 0, d, 2 * PAGE, len(data), sparse=True)
    finally:
        os.close(s)
        os.close(d)
    assert out.read_bytes() == b"\xff" * 2 * PAGE + data + b"\xff" * 9 * PAGE
    assert st.pages_sparse == 4


def test_mapped_file_truncated_under_the_mapping_sigbus(tmp_path):
    npages = 16
    data = os.urandom(npages * PAGE)
    path = tmp_path / "mapped"
    path.write_bytes(data)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), npages * PAGE, access=mmap.ACCESS_READ)
        try:
            os.truncate(path, 5 * PAGE + PAGE // 2)  # pages 6.. now raise SIGBUS
            got, st = engine.read_mapped(mm, 0, npages * PAGE)
            want = data[:5 * PAGE + PAGE // 2] + bytes(PAGE // 2) + bytes(10 * PAGE)
            assert got == want
            assert st.pages_zero_filled == 10
            assert st.bytes_read == 6 * PAGE
            assert st.first_error_offset == 6 * PAGE and st.first_errno == errno.EFAULT
            with pytest.raises(FaultError) as exc:
                engine.read_mapped(mm, PAGE, 10 * PAGE, strict=True)
            assert exc.value.address == 6 * PAGE
        finally:
            mm.close()


def test_mapped_guard_is_per_thread(tmp_path):
    """Two threads copy out of truncated mappings at once; each gets its own zeros and counts."""
    results: dict[int, tuple[bytes, int]] = {}
    maps = []
    for t in range(2):
        path = tmp_path / f"m{t}"
        path.write_bytes(os.urandom(256 * PAGE))
        f = open(path, "r+b")  # noqa: SIM115 - closed below
        maps.append((f, mmap.mmap(f.fileno(), 256 * PAGE, access=mmap.ACCESS_READ)))
        os.truncate(path, (100 + 50 * t) * PAGE)

    def work(t: int) -> None:
        total = 0
        for _ in range(20):
            got, st = engine.read_mapped(maps[t][1], 0, 256 * PAGE)
            total += st.pages_zero_filled
        results[t] = (got, total)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t, (f, mm) in enumerate(maps):
        keep = (100 + 50 * t) * PAGE
        assert results[t][0] == (tmp_path / f"m{t}").read_bytes() + bytes(256 * PAGE - keep)
        assert results[t][1] == 20 * (256 - 100 - 50 * t)
        mm.close()
        f.close()


def test_fault_outside_the_guard_still_kills(tmp_path):
    """The guard passes faults that are not its own to the previous handler (default: die)."""
    code = (
        "import ctypes, mmap, os, sys\n"
        "from kcore import engine\n"
        f"p = {str(tmp_path / 'f')!r}\n"
        "open(p, 'wb').write(os.urandom(8192))\n"
        "mm = mmap.mmap(os.open(p, os.O_RDONLY), 8192, access=mmap.ACCESS_READ)\n"
        "os.truncate(p, 0)\n"
        "print(engine.read_mapped(mm, 0, 8192)[1].pages_zero_filled, flush=True)\n"
        "ctypes.string_at(0)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == "2"
    assert proc.returncode == -signal.SIGSEGV
    # With faulthandler installed first, its handler runs (and reports) before the default.
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code],
                          capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == "2"
    assert proc.returncode == -signal.SIGSEGV
    assert "Segmentation fault" in proc.stderr
    # faulthandler enabled after the guard was installed: the guard goes back on top.
    late = code.replace("ctypes.string_at(0)\n", "import faulthandler; faulthandler.enable()\n"
                        "print(engine.read_mapped(mm, 0, 8192)[1].pages_zero_filled, flush=True)\n"
                        "ctypes.string_at(0)\n")
    proc = subprocess.run([sys.executable, "-c", late], capture_output=True, text=True, env=env)
    assert proc.stdout.split() == ["2", "2"]
    assert proc.returncode == -signal.SIGSEGV
    assert proc.stderr.count("Fatal Python error") == 1 and "Bus error" not in proc.stderr


def test_eintr_during_long_copy_to_a_pipe(tmp_path):
    """SIGALRM every millisecond while write() blocks on a full pipe: the copy is still exact.

    Python's C-level handler writes one byte per delivered signal to the wakeup fd, so
    the count proves the signals arrived (in the main thread: the reader blocks them)
    while the C engine was blocked in write(), which then fails with EINTR.
    """
    data = os.urandom(24 << 20)
    src = tmp_path / "src"
    src.write_bytes(data)
    r, w = os.pipe()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    chunks: list[bytes] = []

    def reader() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        while True:
            b = os.read(r, 1 << 16)
            if not b:
                break
            chunks.append(b)
            time.sleep(0.0002)

    old = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    old_wake = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    th = threading.Thread(target=reader)
    th.start()
    s = os.open(src, os.O_RDONLY)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        st = engine.copy_range(s, 0, w, None, len(data))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.set_wakeup_fd(old_wake)
        signal.signal(signal.SIGALRM, old)
        os.close(w)
        os.close(s)
        th.join()
        os.close(r)
    try:
        delivered = len(os.read(wake_r, 1 << 16))
    except BlockingIOError:
        delivered = 0
    os.close(wake_r)
    os.close(wake_w)
    assert b"".join(chunks) == data
    assert st.bytes_written == len(data) and st.bytes_read == len(data)
    assert delivered > 10


def test_progress_and_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 5 * PAGE)
    data = os.urandom(23 * PAGE + 5)
    src = tmp_path / "src"
    src.write_bytes(data)
    out = tmp_path / "out"
    seen: list[int] = []
    s = os.open(src, os.O_RDONLY)
    d = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        engine.copy_range(s, 3, d, 0, len(data) - 3, progress=seen.append)
    finally:
        os.close(s)
        os.close(d)
    assert out.read_bytes() == data[3:]
    assert sum(seen) == len(data) - 3 and len(seen) == 5


@pytest.mark.parametrize(("threads", "to_stream"), [(1, True), (2, True), (2, False)],
                         ids=["one-thread", "threads-stream", "threads-offset"])
def test_interrupt_is_seen_between_chunks(threads, to_stream, monkeypatch):
    """A signal handler's exception (as Ctrl-C's KeyboardInterrupt) stops a 1 TiB copy quickly,
    and no copy thread outlives it."""
    if threads > 1:
        monkeypatch.setattr(engine, "CHUNK", 4 << 20)
        monkeypatch.setattr(engine, "PIECE", 1 << 20)

    class Stop(Exception):
        pass

    def on_alarm(signum, frame):
        raise Stop

    src = os.open("/dev/zero", os.O_RDONLY)
    null = os.open("/dev/null", os.O_WRONLY)
    seen: list[int] = []
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        t = time.monotonic()
        with pytest.raises(Stop):
            engine.copy_range(src, 0, null, None if to_stream else 0, 1 << 40,
                              progress=seen.append, threads=threads)
        elapsed = time.monotonic() - t
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.close(src)
        os.close(null)
    assert elapsed < 10
    assert seen and all(n == engine.CHUNK for n in seen)
    assert not [t for t in threading.enumerate() if t.name.startswith("kcore-copy")]


def test_an_interrupt_while_the_copy_threads_start_ends_them_at_once(monkeypatch):
    """Ctrl-C or SIGTERM landing while started_threads() waits for its threads to run: the
    exception goes out at once and no thread is left waiting (a CI run waited 30 s each)."""
    real_wait = threading.Barrier.wait

    def wait(self, timeout=None):
        if threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt  # as the signal handler's exception would, right there
        return real_wait(self, timeout)

    monkeypatch.setattr(threading.Barrier, "wait", wait)
    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt), engine.started_threads(2):
        pass
    assert time.monotonic() - t < 5
    assert not [t for t in threading.enumerate() if t.name.startswith("kcore-copy")]
