"""What keeping the kernel's symbols costs a dump, and building an ISF from them (issue 22).

On the 4 GiB guest of test_bench_dump_vm (Debian's 6.1, half its RAM filled; its captured
root holds /sys/kernel/btf/vmlinux and /proc/kallsyms as root reads them): `kcore dump
--format elf` with the symbols kept (the default) and with --no-symbols, rounds interleaved.
Targets: the symbols add at most 15 MB to the dump, the dump's time grows at most 5%, and
`kcore.isf.build` (pakunoda's BTF parser and ISF generator on the kept files) takes at most 10 s.

Run: python3 -m pytest bench/test_bench_symbols.py --benchmark-only  (~12 GiB free in /dev/shm)
"""

from __future__ import annotations

import time

import pytest
from test_bench_dump_vm import ROUNDS, guest_core, kcore_run, remove  # noqa: F401

from kcore import isf, symbols

MB = 1e6


def test_symbols_cost_on_the_4gib_guest(benchmark, guest_core, record, note):  # noqa: F811
    """Size and time the kept symbols add to an elf dump; the ISF's build time."""
    pytest.importorskip("pakunoda", reason="pakunoda builds the ISF (kcore[symbols])")
    d, root, vmcore, _fill, _boot = guest_core
    assert (root / "sys/kernel/btf/vmlinux").exists(), "the capture lacks the kernel's BTF"
    out = d / "sym.elf"
    kept, bare = [], []
    try:
        for _ in range(ROUNDS):
            remove(out)
            kept.append(kcore_run(root, vmcore, out))
            size_kept = out.stat().st_size
            found = symbols.read_dump(str(out))
            remove(out)
            bare.append(kcore_run(root, vmcore, out, "--no-symbols"))
            size_bare = out.stat().st_size
            remove(out)
        assert found is not None
        files = found[0]
        times = []
        for _ in range(3):
            t = time.perf_counter()
            table = isf.build(files)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        blob = isf.encode(table)
        encode = time.perf_counter() - t
        benchmark.pedantic(isf.build, args=(files,), rounds=1)
    finally:
        remove(out)
    added = size_kept - size_bare
    grow = min(x["wall"] for x in kept) / min(x["wall"] for x in bare)
    raw = sum(files.summary()["files"].values())
    record("symbols kept in a 4 GiB guest's elf dump: bytes added (BTF, kallsyms, modules...)",
           f"{added / MB:.2f} MB ({raw / MB:.1f} MB of files, zlib level 1)", "<= 15 MB",
           added <= 15 * MB)
    record("same, dump time with symbols / --no-symbols (whole command, SHA-256 on)",
           f"{grow:.3f}x", "<= 1.05x", grow <= 1.05)
    record("ISF from the kept BTF and kallsyms (kcore.isf.build, pakunoda)",
           f"{min(times):.2f} s (+{encode:.2f} s gzip of {len(blob) / MB:.1f} MB)", "<= 10 s",
           min(times) <= 10)
    note(f"Symbols bench: best of {ROUNDS} interleaved rounds, with symbols "
         f"{min(x['wall'] for x in kept):.2f}-{max(x['wall'] for x in kept):.2f} s, without "
         f"{min(x['wall'] for x in bare):.2f}-{max(x['wall'] for x in bare):.2f} s; ISF "
         f"{len(table['user_types'])} types, {len(table['symbols'])} symbols, build "
         f"{', '.join(f'{t:.2f}' for t in times)} s.")
    assert added <= 15 * MB and min(times) <= 10
