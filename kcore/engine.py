"""The copy engine's Python face: fault-tolerant, chunked reads and copies done in C."""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kcore import _native
from kcore._native import PathArg, ffi, lib

if TYPE_CHECKING:
    from concurrent.futures import Future

    from _typeshed import WriteableBuffer

BLOCK = 1 << 20  # one pread/pwrite block (docs/kernel-facts.md section 7: 1 MiB is the sweet spot)
CHUNK = 64 << 20  # bytes per C call: Ctrl-C and progress are seen between calls
PIECE = 4 << 20  # bytes per read when threads feed an in-order writer (fits the caches)
IN_ORDER_BUFFERS = 32 << 20  # at most this much buffered for an in-order writer (>= 1 MiB a slot)
MAX_THREADS = 4  # page-cache copies stop scaling before this: memory bandwidth

__all__ = [
    "BLOCK",
    "CHUNK",
    "CopyStats",
    "TooManyRuns",
    "copy_packed",
    "copy_range",
    "copy_through",
    "data_runs",
    "default_threads",
    "discards",
    "read_mapped",
    "read_range",
    "readinto_mapped",
    "readinto_range",
    "run_ordered",
    "started_threads",
]

Progress = Callable[[int], object]


@dataclass
class CopyStats:
    """What a read or copy did: bytes read, pages zero-filled or left sparse, first failure."""

    bytes_read: int = 0
    pages_zero_filled: int = 0
    pages_sparse: int = 0
    first_error_offset: int | None = None
    first_errno: int = 0
    bytes_written: int = 0

    def merge(self, other: CopyStats) -> CopyStats:
        """Add other's counts to self (keeping the earliest failure); return self."""
        self.bytes_read += other.bytes_read
        self.pages_zero_filled += other.pages_zero_filled
        self.pages_sparse += other.pages_sparse
        self.bytes_written += other.bytes_written
        if other.first_error_offset is not None and (
            self.first_error_offset is None or other.first_error_offset < self.first_error_offset
        ):
            self.first_error_offset = other.first_error_offset
            self.first_errno = other.first_errno
        return self

    def __iadd__(self, other: CopyStats) -> CopyStats:
        return self.merge(other)

    def _add_c(self, st: Any) -> None:  # st: a cffi struct kc_stats
        self.bytes_read += st.bytes_read
        self.bytes_written += st.bytes_written
        self.pages_zero_filled += st.pages_zero_filled
        self.pages_sparse += st.pages_sparse
        if st.first_errno and self.first_error_offset is None:
            self.first_error_offset = st.first_error_offset
            self.first_errno = st.first_errno


def _block_buffer(size: int) -> tuple[Any, Any]:
    """A page-aligned C buffer of size bytes (aligned copies are faster in the kernel)."""
    raw = ffi.new("char[]", size + 4096)
    addr = int(ffi.cast("uintptr_t", raw))
    return raw, ffi.cast("char *", (addr + 4095) & ~4095)


def _chunks(offset: int, length: int, align: int,
            chunk: int | None = None) -> Iterator[tuple[int, int]]:
    """(position, length) pieces of [offset, offset+length), each ending on an align boundary."""
    chunk = CHUNK if chunk is None else chunk
    chunk = max(chunk - chunk % align, align)
    pos, end = offset, offset + length
    while pos < end:
        stop = min(end, (pos + chunk) // align * align)
        if stop <= pos:
            stop = min(end, pos + chunk)
        yield pos, stop - pos
        pos = stop


def _check_args(offset: int, length: int, page_size: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length: {offset:#x}, {length:#x}")
    if page_size < 512 or page_size & (page_size - 1):
        raise ValueError(f"page size must be a power of two >= 512, not {page_size}")


def discards(fd: int) -> bool:
    """Whether fd is /dev/null (writes at any offset, in any order, are all the same)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    # /dev/null is char device 1:3 (Documentation/admin-guide/devices.txt)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def default_threads() -> int:
    """Copy threads worth running: the CPUs this process may use, at most MAX_THREADS."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_THREADS))


_POOLS: dict[int, Any] = {}  # thread count -> the executor started_threads() holds open
_POOL_PREFIX = "kcore-copy"


@contextmanager
def started_threads(threads: int) -> Iterator[None]:
    """Start the copy threads of the run_ordered(threads) calls in this block, all of them, now.

    A live dump enters it before -d classifies memory: a thread started later would take
    pages for its kernel stack and task_struct that the classification saw free and left out,
    and crash reads both for every task. The threads end with the block.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    if threads in _POOLS:
        yield
        return
    ex = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=_POOL_PREFIX)
    # the executor starts a thread per submit while none is idle: hold each until all run
    barrier = threading.Barrier(threads + 1)
    try:
        for _ in range(threads):
            ex.submit(barrier.wait, 30)
        barrier.wait(30)
        _POOLS[threads] = ex
        yield
    finally:
        # a signal's exception while they start: the threads still held go at once (else
        # each waited out its 30 s, and Ctrl-C or SIGTERM took that long to end the dump)
        barrier.abort()
        _POOLS.pop(threads, None)
        ex.shutdown(wait=True)


def _executor(threads: int) -> tuple[Any, bool]:
    """(executor, owned): the started one of that size, else a new one the caller shuts down."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    ex = _POOLS.get(threads)
    if ex is not None and not threading.current_thread().name.startswith(_POOL_PREFIX):
        return ex, False
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=_POOL_PREFIX), True


def run_ordered(jobs: Iterable[tuple[int, int]], work: Callable[[int, int, int], Any],
                done: Callable[[int, int, int, Any], None], threads: int, depth: int) -> None:
    """Run work(pos, n, slot) on threads, at most depth at once; done(...) in job order.

    slot (0..depth-1) names a job's private buffers: job i + depth reuses job i's slot only
    after done() has seen job i. The first exception (in job order) cancels what has not
    started, waits for what has, and propagates; so does Ctrl-C in the calling thread.
    """
    from concurrent.futures import wait  # only threaded calls import it

    pending: deque[tuple[int, int, int, Future[Any]]] = deque()
    free = list(range(depth - 1, -1, -1))
    ex, owned = _executor(threads)
    try:
        for pos, n in jobs:
            if not free:
                p, k, slot, fut = pending.popleft()
                done(p, k, slot, fut.result())
                free.append(slot)
            slot = free.pop()
            pending.append((pos, n, slot, ex.submit(work, pos, n, slot)))
        while pending:
            p, k, slot, fut = pending.popleft()
            done(p, k, slot, fut.result())
    finally:
        # Running jobs end before this returns, even through a second Ctrl-C: the caller may
        # close the fds they use as soon as it does. (Their futures are waited for: a
        # Thread.join() cut short by KeyboardInterrupt may then report the thread finished.)
        again: BaseException | None = None
        for *_rest, fut in pending:
            fut.cancel()
        while True:
            try:
                wait([fut for *_rest, fut in pending])
                if owned:
                    ex.shutdown(wait=True)
                break
            except KeyboardInterrupt as exc:
                again = exc
        if again is not None:
            raise again


def readinto_range(
    fd: int, offset: int, buf: WriteableBuffer, *, strict: bool = False, page_size: int = 4096,
    path: PathArg = None,
) -> CopyStats:
    """Fill the writable buffer buf from fd at offset; unreadable pages become zeros."""
    view = memoryview(buf).cast("B")
    _check_args(offset, len(view), page_size)
    flags = _native.STRICT if strict else 0
    stats = CopyStats()
    st = _native.new_stats()
    with ffi.from_buffer(view, require_writable=True) as base:
        for pos, n in _chunks(offset, len(view), page_size):
            rc = lib.kc_read_fd(fd, pos, base + (pos - offset), n, BLOCK, page_size, flags, st)
            stats._add_c(st)
            _native.check(rc, st, path=path)
    return stats


def read_spans(
    fd: int, spans: list[tuple[int, int]], *, page_size: int = 4096, path: PathArg = None,
) -> tuple[bytearray, list[int], CopyStats]:
    """Read scattered (offset, length) spans of fd in one C call: their bytes back to back;
    when the first read began and each span's read ended (CLOCK_MONOTONIC ns, the clock of
    time.monotonic_ns()); stats. Unreadable pages read as zeros (counted)."""
    for off, n in spans:
        _check_args(off, n, page_size)
    flat = ffi.new("uint64_t[]", [v for span in spans for v in span] or [0])
    times = ffi.new("uint64_t[]", len(spans) + 1)
    buf = bytearray(sum(n for _o, n in spans))
    st = _native.new_stats()
    with ffi.from_buffer(buf, require_writable=True) as base:
        rc = lib.kc_read_spans(fd, flat, len(spans), base, BLOCK, page_size, 0, times, st)
    stats = CopyStats()
    stats._add_c(st)
    _native.check(rc, st, path=path)
    return buf, list(times), stats


def read_range(
    fd: int, offset: int, length: int, *, strict: bool = False, page_size: int = 4096,
    path: PathArg = None,
) -> tuple[bytes, CopyStats]:
    """Read length bytes of fd at offset; unreadable pages read as zeros (counted)."""
    buf = bytearray(length)
    stats = readinto_range(fd, offset, buf, strict=strict, page_size=page_size, path=path)
    return bytes(buf), stats


def copy_range(
    src_fd: int, src_offset: int, dst_fd: int, dst_offset: int | None, length: int, *,
    sparse: bool = False, strict: bool = False, page_size: int = 4096,
    progress: Progress | None = None, path: PathArg = None, dst_path: PathArg = None,
    threads: int = 1, slot_fd: Callable[[int], int] | None = None, times: Any = None,
) -> CopyStats:
    """Copy length bytes of src_fd at src_offset to dst_fd at dst_offset (None: write() in order).

    With sparse, all-zero pages become holes (the output still reaches dst_offset + length).
    progress(n) is called after each chunk with the bytes it covered. threads > 1 reads (and
    pwrites) chunks on that many threads; the output is the same, written in order for None.
    slot_fd(k), if given, is the source fd for job slot k of a threaded call (a source whose
    one fd two threads must not read at once: MemorySource.slot_fd). times (a
    kcore.pagetimes.Timeline), if given, notes when each chunk was read.
    """
    _check_args(src_offset, length, page_size)
    if dst_offset is not None and dst_offset < 0:
        raise ValueError(f"negative output offset {dst_offset:#x}")
    flags = (_native.STRICT if strict else 0) | (_native.SPARSE if sparse else 0)
    if threads > 1 and length > 2 * PIECE:
        fds = slot_fd if slot_fd is not None else (lambda _slot: src_fd)
        if dst_offset is None and discards(dst_fd):
            dst_offset = 0  # /dev/null: no order to keep, every thread writes its own chunks
        if dst_offset is None:
            return _copy_in_order(fds, src_offset, dst_fd, length, flags, page_size,
                                  progress, path, dst_path, threads, times)
        return _copy_parallel(fds, src_offset, dst_fd, dst_offset, length, flags,
                              page_size, progress, path, dst_path, threads, times)
    stats = CopyStats()
    st = _native.new_stats()
    keep_alive, buf = _block_buffer(BLOCK)
    for pos, n in _chunks(src_offset, length, page_size):
        out = -1 if dst_offset is None else dst_offset + (pos - src_offset)
        t0 = times.now() if times is not None else 0
        rc = lib.kc_copy_fd(src_fd, pos, dst_fd, out, n, buf, BLOCK, page_size, flags, st)
        if times is not None:
            times.add(pos, n, t0, times.now())
        stats._add_c(st)
        _native.check(rc, st, path=path, dst_path=dst_path)
        if progress is not None:
            progress(n)
    return stats


def _copy_parallel(src_fds: Callable[[int], int], src_offset: int, dst_fd: int,
                   dst_offset: int, length: int, flags: int, page_size: int,
                   progress: Progress | None, path: PathArg, dst_path: PathArg,
                   threads: int, times: Any = None) -> CopyStats:
    """copy_range to an offset on threads: each chunk goes through its own 1 MiB buffer."""
    end = dst_offset + length
    if flags & _native.SPARSE:
        # Size the file first: a chunk ending in a hole would otherwise extend the file
        # itself, and could cut it back under a later chunk written meanwhile.
        st_out = os.fstat(dst_fd)
        if stat.S_ISREG(st_out.st_mode) and st_out.st_size < end:
            try:
                os.ftruncate(dst_fd, end)
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror} (sizing the output to {end:#x})",
                              dst_path) from None
    depth = threads + 1
    bufs = [_block_buffer(BLOCK) for _ in range(depth)]
    sts = [_native.new_stats() for _ in range(depth)]
    stats = CopyStats()

    def work(pos: int, n: int, slot: int) -> int:
        t0 = times.now() if times is not None else 0
        rc: int = lib.kc_copy_fd(src_fds(slot), pos, dst_fd, dst_offset + (pos - src_offset), n,
                            bufs[slot][1], BLOCK, page_size, flags, sts[slot])
        if times is not None:
            times.add(pos, n, t0, times.now())
        return rc

    def done(pos: int, n: int, slot: int, rc: int) -> None:
        stats._add_c(sts[slot])
        _native.check(rc, sts[slot], path=path, dst_path=dst_path)
        if progress is not None:
            progress(n)

    run_ordered(_chunks(src_offset, length, page_size), work, done, threads, depth)
    return stats


def _copy_in_order(src_fds: Callable[[int], int], src_offset: int, dst_fd: int, length: int,
                   flags: int, page_size: int, progress: Progress | None, path: PathArg,
                   dst_path: PathArg, threads: int, times: Any = None) -> CopyStats:
    """copy_range to a stream on threads: they read PIECE-sized buffers, written in order."""
    depth = 2 * threads
    piece = min(PIECE, max(BLOCK, IN_ORDER_BUFFERS // depth // BLOCK * BLOCK))
    bufs = [_block_buffer(piece) for _ in range(depth)]
    sts = [_native.new_stats() for _ in range(depth)]
    stats = CopyStats()
    written = 0
    pending = 0
    read_flags = flags & _native.STRICT

    def work(pos: int, n: int, slot: int) -> int:
        t0 = times.now() if times is not None else 0
        rc: int = lib.kc_read_fd(src_fds(slot), pos, bufs[slot][1], n, BLOCK, page_size,
                            read_flags, sts[slot])
        if times is not None:
            times.add(pos, n, t0, times.now())
        return rc

    def done(pos: int, n: int, slot: int, rc: int) -> None:
        nonlocal written, pending
        stats._add_c(sts[slot])
        _native.check(rc, sts[slot], path=path)
        view = memoryview(ffi.buffer(bufs[slot][1], n))
        while view:
            try:
                k = os.write(dst_fd, view)
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror} (writing at offset {written:#x})",
                              dst_path) from None
            view = view[k:]
            written += k
        stats.bytes_written += n
        pending += n
        if progress is not None and pending >= CHUNK:
            progress(pending)
            pending = 0

    run_ordered(_chunks(src_offset, length, page_size, piece), work, done, threads, depth)
    if progress is not None and pending:
        progress(pending)
    return stats


def copy_through(
    src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, buf: WriteableBuffer, *,
    sparse: bool = False,
    strict: bool = False, page_size: int = 4096, path: PathArg = None, dst_path: PathArg = None,
) -> CopyStats:
    """Copy len(buf) bytes like copy_range, in one C call through buf, which holds them after."""
    view = memoryview(buf).cast("B")
    _check_args(src_offset, len(view), page_size)
    if dst_offset < 0:
        raise ValueError(f"negative output offset {dst_offset:#x}")
    flags = (_native.STRICT if strict else 0) | (_native.SPARSE if sparse else 0)
    st = _native.new_stats()
    with ffi.from_buffer(view, require_writable=True) as base:
        rc = lib.kc_copy_fd(src_fd, src_offset, dst_fd, dst_offset, len(view), base,
                            max(len(view), page_size), page_size, flags, st)
    stats = CopyStats()
    stats._add_c(st)
    _native.check(rc, st, path=path, dst_path=dst_path)
    return stats


class TooManyRuns(Exception):
    """copy_packed needed more runs than allowed; what it wrote is given, to redo coarser."""

    def __init__(self, runs: list[tuple[int, int]], stats: CopyStats, written: int) -> None:
        super().__init__(f"more than {len(runs)} non-zero runs")
        self.runs, self.stats, self.written = runs, stats, written


def copy_packed(
    src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int, *,
    granule: int = 4096, phase: int = 0, max_runs: int = 1 << 16, sparse: bool = False,
    strict: bool = False, page_size: int = 4096, path: PathArg = None, dst_path: PathArg = None,
) -> tuple[list[tuple[int, int]], CopyStats, int]:
    """Copy only the non-zero granules of a source range, packed from dst_offset, in one pass.

    Granule boundaries are the source offsets congruent to phase modulo granule; unreadable
    pages count as zeros. Returns (merged (source offset, length) runs kept, stats, bytes
    written). With sparse, zero pages inside the kept runs become holes (pages_sparse). One
    C call: call it per chunk to see Ctrl-C. More than max_runs runs raise TooManyRuns (redo
    the range with a coarser granule: it keeps a superset and overwrites what was written).
    """
    _check_args(src_offset, length, page_size)
    if dst_offset < 0:
        raise ValueError(f"negative output offset {dst_offset:#x}")
    if granule < page_size or granule % page_size or not 0 <= phase < granule or max_runs < 0:
        raise ValueError(f"bad granule {granule:#x}, phase {phase:#x} or max_runs {max_runs}")
    flags = (_native.STRICT if strict else 0) | (_native.SPARSE if sparse else 0)
    buf_len = max(BLOCK - BLOCK % granule, granule)
    keep_alive, buf = _block_buffer(buf_len)
    out = ffi.new("uint64_t[]", 2 * max(max_runs, 1))
    nruns = ffi.new("size_t *")
    written = ffi.new("uint64_t *")
    st = _native.new_stats()
    rc = lib.kc_copy_packed(src_fd, src_offset, dst_fd, dst_offset, length, granule, phase,
                            page_size, buf, buf_len, flags, out, max_runs, nruns, written, st)
    stats = CopyStats()
    stats._add_c(st)
    runs = [(out[2 * i], out[2 * i + 1]) for i in range(nruns[0])]
    if rc == -errno.ENOSPC and st.fail_where == lib.KC_FAIL_NONE:
        raise TooManyRuns(runs, stats, written[0])
    _native.check(rc, st, path=path, dst_path=dst_path)
    return runs, stats, written[0]


def data_runs(
    fd: int, offset: int, length: int, *, granule: int = 4096, page_size: int = 4096,
    strict: bool = False, path: PathArg = None, progress: Progress | None = None,
    threads: int = 1, slot_fd: Callable[[int], int] | None = None,
) -> tuple[list[tuple[int, int]], CopyStats]:
    """The merged (offset, length) runs of [offset, offset+length) that are not all zeros.

    Granules are aligned on source offsets; unreadable pages count as zeros. progress(n) is
    called after each chunk; threads > 1 scans chunks on that many threads (slot_fd: as in
    copy_range).
    """
    _check_args(offset, length, page_size)
    if granule < page_size or granule % page_size:
        raise ValueError(f"granule {granule:#x} is not a multiple of the page size")
    flags = _native.STRICT if strict else 0
    chunk = max(CHUNK - CHUNK % granule, granule)
    buf_len = max(BLOCK - BLOCK % granule, granule)
    max_runs = chunk // granule // 2 + 2
    threads = max(1, threads) if length > chunk else 1
    depth = threads + 1 if threads > 1 else 1
    bufs = [_block_buffer(buf_len) for _ in range(depth)]
    outs = [ffi.new("uint64_t[]", 2 * max_runs) for _ in range(depth)]
    nruns = [ffi.new("size_t *") for _ in range(depth)]
    sts = [_native.new_stats() for _ in range(depth)]
    stats = CopyStats()
    runs: list[tuple[int, int]] = []

    def work(pos: int, n: int, slot: int) -> int:
        src = slot_fd(slot) if slot_fd is not None and threads > 1 else fd
        rc: int = lib.kc_data_runs(src, pos, n, granule, page_size, bufs[slot][1], buf_len,
                                   flags, outs[slot], max_runs, nruns[slot], sts[slot])
        return rc

    def done(pos: int, n: int, slot: int, rc: int) -> None:
        stats._add_c(sts[slot])
        _native.check(rc, sts[slot], path=path)
        out = outs[slot]
        for i in range(nruns[slot][0]):
            start, size = out[2 * i], out[2 * i + 1]
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + size)
            else:
                runs.append((start, size))
        if progress is not None:
            progress(n)

    jobs = _chunks(offset, length, granule, chunk)
    if threads == 1:
        for pos, n in jobs:
            done(pos, n, 0, work(pos, n, 0))
    else:
        run_ordered(jobs, work, done, threads, depth)
    return runs, stats


def readinto_mapped(
    mapping: mmap.mmap, offset: int, buf: WriteableBuffer, *, strict: bool = False,
    page_size: int = 4096,
    path: PathArg = None,
) -> CopyStats:
    """Fill buf from mapping[offset:], surviving SIGBUS/SIGSEGV: faulting pages become zeros."""
    view = memoryview(buf).cast("B")
    _check_args(offset, len(view), page_size)
    if offset + len(view) > len(mapping):
        raise ValueError(
            f"range {offset:#x}+{len(view):#x} is past the mapping's end {len(mapping):#x}"
        )
    flags = _native.STRICT if strict else 0
    stats = CopyStats()
    st = _native.new_stats()
    with ffi.from_buffer(mapping) as src, ffi.from_buffer(view, require_writable=True) as dst:
        for pos, n in _chunks(offset, len(view), page_size):
            rel = pos - offset
            rc = lib.kc_copy_mem(src + pos, dst + rel, n, pos, page_size, flags, st)
            stats._add_c(st)
            _native.check(rc, st, path=path)
    return stats


def read_mapped(
    mapping: mmap.mmap, offset: int, length: int, *, strict: bool = False,
    page_size: int = 4096, path: PathArg = None,
) -> tuple[bytes, CopyStats]:
    """Read length bytes of mapping at offset; pages that fault read as zeros (counted)."""
    buf = bytearray(length)
    stats = readinto_mapped(mapping, offset, buf, strict=strict, page_size=page_size, path=path)
    return bytes(buf), stats
