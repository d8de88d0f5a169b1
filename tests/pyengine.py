"""The copy engine in pure Python: the tests' oracle and the benchmarks' baseline, never a fallback.

Same semantics as kcore.engine, written the plain way the design states it: pread in
blocks; where a block fails, the rest of that block is read page by page, and every
page that cannot be read is zero-filled and counted.
"""

from __future__ import annotations

import errno
import os
import stat

from kcore.engine import BLOCK, CopyStats, Progress
from kcore.errors import FaultError

FAULT_ERRNOS = frozenset({errno.EIO, errno.EPERM, errno.EFAULT, errno.ENXIO, errno.EINVAL})


def _pread_some(fd: int, n: int, off: int) -> tuple[bytes, int]:
    """Read up to n bytes at off; return (data, errno of the failure at off+len(data) or 0)."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        try:
            data = os.pread(fd, n - got, off + got)  # EINTR is retried by Python (PEP 475)
        except OSError as exc:
            if exc.errno not in FAULT_ERRNOS:
                msg = f"{exc.strerror} (reading at offset {off + got:#x})"
                raise OSError(exc.errno, msg) from None
            return b"".join(parts), exc.errno
        if not data:
            return b"".join(parts), errno.EIO  # EOF inside the range
        parts.append(data)
        got += len(data)
    return b"".join(parts), 0


def _read_block(fd: int, off: int, n: int, page_size: int, strict: bool, stats: CopyStats,
                path: object) -> bytearray:
    out = bytearray()
    data, err = _pread_some(fd, n, off)
    out += data
    stats.bytes_read += len(data)
    pos, end = off + len(data), off + n
    while pos < end:  # only after a failure: the rest of the block, page by page
        pe = min(end, (pos // page_size + 1) * page_size)
        data, err = _pread_some(fd, pe - pos, pos)
        out += data
        stats.bytes_read += len(data)
        if err:
            bad = pos + len(data)
            if stats.first_error_offset is None:
                stats.first_error_offset, stats.first_errno = bad, err
            if strict:
                name = os.fsdecode(path) if path is not None else "the source"
                raise FaultError(
                    f"cannot read {name} at offset {bad:#x}: {os.strerror(err)}", address=bad
                )
            out += bytes(pe - bad)
            stats.pages_zero_filled += 1
        pos = pe
    return out


def _blocks(offset: int, length: int, align: int, block: int):
    pos, end = offset, offset + length
    while pos < end:
        stop = end if end - pos <= block else (pos + block) // align * align
        if stop <= pos:
            stop = pos + block
        yield pos, stop - pos
        pos = stop


def readinto_range(fd: int, offset: int, buf, *, strict: bool = False, page_size: int = 4096,
                   path: object = None) -> CopyStats:
    """Fill buf from fd at offset (oracle of kcore.engine.readinto_range)."""
    view = memoryview(buf).cast("B")
    stats = CopyStats()
    for pos, n in _blocks(offset, len(view), page_size, BLOCK):
        view[pos - offset:pos - offset + n] = _read_block(fd, pos, n, page_size, strict, stats,
                                                          path)
    return stats


def read_range(fd: int, offset: int, length: int, *, strict: bool = False,
               page_size: int = 4096, path: object = None) -> tuple[bytes, CopyStats]:
    """Read length bytes of fd at offset (oracle of kcore.engine.read_range)."""
    buf = bytearray(length)
    stats = readinto_range(fd, offset, buf, strict=strict, page_size=page_size, path=path)
    return bytes(buf), stats


def _write_all(fd: int, data, off: int | None, stats: CopyStats, dst_path: object) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            if off is None:
                n = os.write(fd, view[done:])
            else:
                n = os.pwrite(fd, view[done:], off + done)
        except OSError as exc:
            where = stats.bytes_written if off is None else off + done
            raise OSError(exc.errno, f"{exc.strerror} (writing at offset {where:#x})",
                          dst_path) from None
        done += n
        stats.bytes_written += n


def _is_hole(fd: int, off: int, n: int) -> bool:
    """Whether [off, off+n) of fd holds no data (SEEK_DATA), keeping the file position."""
    cur = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        return os.lseek(fd, off, os.SEEK_DATA) >= off + n
    except OSError as exc:
        return exc.errno == errno.ENXIO
    finally:
        os.lseek(fd, cur, os.SEEK_SET)


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int | None, length: int,
               *, sparse: bool = False, strict: bool = False, page_size: int = 4096,
               progress: Progress | None = None, path: object = None,
               dst_path: object = None) -> CopyStats:
    """Copy a range between fds (oracle of kcore.engine.copy_range)."""
    stats = CopyStats()
    old_size = 0
    if sparse and dst_offset is not None:
        st = os.fstat(dst_fd)
        if stat.S_ISREG(st.st_mode):
            old_size = st.st_size
        else:
            sparse = False
    elif dst_offset is None:
        sparse = False
    tail_hole = False
    for pos, n in _blocks(src_offset, length, page_size, BLOCK):
        data = _read_block(src_fd, pos, n, page_size, strict, stats, path)
        out = None if dst_offset is None else dst_offset + (pos - src_offset)
        if not sparse:
            _write_all(dst_fd, data, out, stats, dst_path)
        else:
            p = pos
            while p < pos + n:
                pe = min(pos + n, (p // page_size + 1) * page_size)
                page = data[p - pos:pe - pos]
                tail_hole = not any(page)
                if tail_hole:
                    stats.pages_sparse += 1
                    at = out + (p - pos)
                    if at < old_size and not _is_hole(dst_fd, at, min(len(page), old_size - at)):
                        _write_all(dst_fd, page, at, stats, dst_path)  # zeros over stale data
                else:
                    _write_all(dst_fd, page, out + (p - pos), stats, dst_path)
                p = pe
        if progress is not None:
            progress(n)
    if sparse and tail_hole and os.fstat(dst_fd).st_size < dst_offset + length:
        os.ftruncate(dst_fd, dst_offset + length)
    return stats


def data_runs(fd: int, offset: int, length: int, *, granule: int = 4096, page_size: int = 4096,
              strict: bool = False, path: object = None
              ) -> tuple[list[tuple[int, int]], CopyStats]:
    """The merged non-zero runs (oracle of kcore.engine.data_runs)."""
    stats = CopyStats()
    runs: list[tuple[int, int]] = []
    buf_len = max(BLOCK - BLOCK % granule, granule)
    for pos, n in _blocks(offset, length, granule, buf_len):
        data = _read_block(fd, pos, n, page_size, strict, stats, path)
        g = pos
        while g < pos + n:
            ge = min(pos + n, (g // granule + 1) * granule)
            if any(data[g - pos:ge - pos]):
                if runs and sum(runs[-1]) == g:
                    runs[-1] = (runs[-1][0], runs[-1][1] + ge - g)
                else:
                    runs.append((g, ge - g))
            else:
                stats.pages_sparse += -(-(ge - g // page_size * page_size) // page_size)
            g = ge
    return runs, stats



def _write_sparse(fd: int, data, src: int, at: int, old_size: int, page_size: int,
                  stats: CopyStats, dst_path: object) -> bool:
    """Write data (from source offset src) at at, zero pages as holes; True if it ends in one."""
    p, n = 0, len(data)
    tail_hole = False
    while p < n:
        pe = min(n, (src + p) // page_size * page_size + page_size - src)
        page = data[p:pe]
        tail_hole = not any(page)
        if tail_hole:
            stats.pages_sparse += 1
            end = min(at + pe, old_size)
            if at + p < end and not _is_hole(fd, at + p, end - (at + p)):
                _write_all(fd, page[:end - (at + p)], at + p, stats, dst_path)
        else:
            _write_all(fd, page, at + p, stats, dst_path)
        p = pe
    return tail_hole


def copy_packed(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int, *,
                granule: int = 4096, phase: int = 0, max_runs: int = 1 << 16,
                sparse: bool = False, strict: bool = False, page_size: int = 4096,
                path: object = None, dst_path: object = None
                ) -> tuple[list[tuple[int, int]], CopyStats, int]:
    """Non-zero granules packed from dst_offset (oracle of kcore.engine.copy_packed)."""
    from kcore import engine

    stats = CopyStats()
    runs: list[tuple[int, int]] = []
    written = 0
    tail_hole = False
    block = max(engine.BLOCK - engine.BLOCK % granule, granule)
    old_size = 0
    if sparse:
        st = os.fstat(dst_fd)
        sparse = stat.S_ISREG(st.st_mode)
        old_size = st.st_size

    def to_end(a: int) -> int:
        return granule - (a - phase) % granule

    def flush(data, pos: int, lo: int, hi: int) -> None:
        nonlocal written, tail_hole
        if hi <= lo:
            return
        piece = data[lo - pos:hi - pos]
        if sparse:
            tail_hole = _write_sparse(dst_fd, piece, lo, dst_offset + written, old_size,
                                      page_size, stats, dst_path)
        else:
            _write_all(dst_fd, piece, dst_offset + written, stats, dst_path)
        written += hi - lo

    pos, end = src_offset, src_offset + length
    while pos < end:
        n = min(end - pos, to_end(pos) + block - granule)
        data = _read_block(src_fd, pos, n, page_size, strict, stats, path)
        g = lo = hi = pos
        while g < pos + n:
            ge = min(pos + n, g + to_end(g))
            if any(data[g - pos:ge - pos]):
                if runs and sum(runs[-1]) == g:
                    runs[-1] = (runs[-1][0], runs[-1][1] + ge - g)
                elif len(runs) == max_runs:
                    flush(data, pos, lo, hi)
                    raise engine.TooManyRuns(runs, stats, written)
                else:
                    runs.append((g, ge - g))
                hi = ge
            else:
                flush(data, pos, lo, hi)
                lo = hi = ge
            g = ge
        flush(data, pos, lo, hi)
        pos += n
    if sparse and tail_hole and written and dst_offset + written > old_size:
        if os.fstat(dst_fd).st_size < dst_offset + written:
            os.ftruncate(dst_fd, dst_offset + written)
    return runs, stats, written
