"""Property: the C engine and the Python oracle agree on any layout of holes, zeros and chunks."""

from __future__ import annotations

import os
import random
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kcore import engine
from tests import pyengine
from tests.engine_memchild import PAGE, MemChild, expected_memory

KINDS = st.sampled_from(["data", "zero", "hole", "noaccess"])


@pytest.fixture(scope="module")
def child():
    with MemChild() as c:
        yield c


@st.composite
def layouts(draw):
    """Page kinds, a byte range over them, and the engine's block and chunk sizes."""
    kinds = draw(st.lists(KINDS, min_size=1, max_size=160))
    size = len(kinds) * PAGE
    start = draw(st.integers(0, size - 1))
    length = draw(st.integers(0, size - start))
    block = draw(st.one_of(st.sampled_from([PAGE, 2 * PAGE, 1 << 20]),
                           st.integers(PAGE, 40 * PAGE)))
    chunk = draw(st.one_of(st.sampled_from([PAGE, 64 << 20]), st.integers(PAGE, 200 * PAGE)))
    granule = PAGE * draw(st.sampled_from([1, 2, 4, 16]))
    seed = draw(st.integers(0, 2**32))
    return kinds, start, length, block, chunk, granule, seed


def _write_layout(kinds: list[str], seed: int) -> tuple[str, bytes]:
    rnd = random.Random(seed)
    data = b"".join(bytes(PAGE) if k == "zero" else rnd.randbytes(PAGE) for k in kinds)
    fd, path = tempfile.mkstemp(prefix="kcore-prop-", dir="/dev/shm")
    os.write(fd, data)
    os.close(fd)
    return path, data


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts())
def test_c_engine_equals_oracle_on_proc_pid_mem(child, layout):
    kinds, start, length, block, chunk, granule, seed = layout
    holes = [i for i, k in enumerate(kinds) if k == "hole"]
    noaccess = [i for i, k in enumerate(kinds) if k == "noaccess"]  # data, PROT_NONE
    path, data = _write_layout(kinds, seed)
    try:
        addr = child.map(path, len(kinds), holes, noaccess)
    except BaseException:
        os.unlink(path)
        raise
    saved = engine.BLOCK, engine.CHUNK
    engine.BLOCK, engine.CHUNK = block, chunk
    try:
        truth = expected_memory(data, holes)[start:start + length]
        got = engine.read_range(child.fd, addr + start, length)
        assert got == pyengine.read_range(child.fd, addr + start, length)
        assert got[0] == truth
        runs = engine.data_runs(child.fd, addr + start, length, granule=granule)
        assert runs == pyengine.data_runs(child.fd, addr + start, length, granule=granule)
        for sparse in (False, True):
            outs = []
            for eng in (engine, pyengine):
                with tempfile.TemporaryFile(dir="/dev/shm") as f:
                    stats = eng.copy_range(child.fd, addr + start, f.fileno(), 0, length,
                                           sparse=sparse)
                    f.seek(0)
                    outs.append((f.read(), stats))
            assert outs[0] == outs[1]
            assert outs[0][0] == truth
    finally:
        engine.BLOCK, engine.CHUNK = saved
        child.unmap(addr, len(kinds))
        os.unlink(path)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 20 * PAGE), start=st.integers(0, 24 * PAGE),
       length=st.integers(0, 24 * PAGE), block=st.integers(PAGE, 8 * PAGE))
def test_c_engine_equals_oracle_past_end_of_file(size, start, length, block):
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:
        f.write(os.urandom(size))
        f.flush()
        saved = engine.BLOCK
        engine.BLOCK = block
        try:
            got = engine.read_range(f.fileno(), start, length)
        finally:
            engine.BLOCK = saved
        assert got == pyengine.read_range(f.fileno(), start, length)
        f.seek(0)
        data = f.read()
        assert got[0] == (data[start:start + length]).ljust(length, b"\0")


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts(), phase_pages=st.integers(0, 15), odd=st.booleans(),
       max_runs=st.one_of(st.just(1 << 16), st.integers(0, 6)), dst=st.integers(0, 3 * PAGE),
       sparse=st.booleans(), stale=st.integers(0, 8 * PAGE))
def test_copy_packed_equals_oracle(child, layout, phase_pages, odd, max_runs, dst, sparse,
                                   stale):
    kinds, start, length, block, _chunk, granule, seed = layout
    holes = [i for i, k in enumerate(kinds) if k == "hole"]
    noaccess = [i for i, k in enumerate(kinds) if k == "noaccess"]
    phase = (phase_pages * PAGE + (100 if odd else 0)) % granule
    path, data = _write_layout(kinds, seed)
    addr = child.map(path, len(kinds), holes, noaccess)
    saved = engine.BLOCK
    engine.BLOCK = max(block, granule)
    try:
        truth = expected_memory(data, holes)
        results = []
        for eng in (engine, pyengine):
            with tempfile.TemporaryFile(dir="/dev/shm") as f:
                f.write(b"\xee" * stale)  # stale data under the output: must not show
                f.flush()
                try:
                    got = eng.copy_packed(child.fd, addr + start, f.fileno(), dst, length,
                                          granule=granule, phase=(addr + phase) % granule,
                                          max_runs=max_runs, sparse=sparse)
                except engine.TooManyRuns as exc:
                    got = ("overflow", exc.runs, exc.stats, exc.written)
                f.seek(0)
                if stale and got[0] != "overflow":  # C punches stale data, the oracle rewrites
                    got[1].bytes_written = 0
                elif stale:
                    got[2].bytes_written = 0
                results.append((got, f.read()))
        assert results[0] == results[1]
        got, out = results[0]
        if got[0] != "overflow":
            runs, stats, written = got
            packed = b"".join(truth[a - addr:a - addr + n] for a, n in runs)
            assert out[dst:dst + written] == packed
            assert written == len(packed)
            if not sparse and not stale:
                assert written == stats.bytes_written and stats.pages_sparse == 0
            assert len(out) == max(stale, dst + written if written else 0)
            assert all(n for _a, n in runs)
            kept = bytearray(length)
            for a, n in runs:
                kept[a - addr - start:a - addr - start + n] = truth[a - addr:a - addr + n]
            assert bytes(kept) == truth[start:start + length]  # only zeros were left out
    finally:
        engine.BLOCK = saved
        child.unmap(addr, len(kinds))
        os.unlink(path)
