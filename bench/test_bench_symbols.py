"""What keeping the kernel's symbols costs a dump, and building an ISF from them (issue 22).

On the 4 GiB guest of test_bench_dump_vm (Debian's 6.1, half its RAM filled; its captured
root holds /sys/kernel/btf/vmlinux and /proc/kallsyms as root reads them): `kcore dump
--format elf` with the symbols kept (the default) and with --no-symbols, rounds interleaved.
Targets: the symbols add at most 15 MB to the dump, the dump's time grows at most 5%, and
`kcore.isf.build` (pakunoda's BTF parser and ISF generator on the kept files) takes at most 10 s.

Per kernel (test_symbols_per_kernel): the bytes the symbols add to an elf dump (its KCORE
notes) and the ISF's build time, for Debian's 6.1 and 6.12 amd64 guests gathering their live
root (modules' BTF included) and an arm64 6.12 guest's capture gathered on the host.

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
        own = []  # the symbols' own work in a dump: gather the files, compress them to notes
        for _ in range(3):
            t = time.perf_counter()
            symbols.elf_notes(symbols.gather(root))
            own.append(time.perf_counter() - t)
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
    share = min(own) / min(x["wall"] for x in bare)
    record("same, the symbols' own work (gather + zlib, in process) / the --no-symbols dump",
           f"{min(own):.2f} s / {min(x['wall'] for x in bare):.2f} s = {share:.1%}", "<= 5%",
           share <= 0.05)
    record("ISF from the kept BTF and kallsyms (kcore.isf.build, pakunoda)",
           f"{min(times):.2f} s (+{encode:.2f} s gzip of {len(blob) / MB:.1f} MB)", "<= 10 s",
           min(times) <= 10)
    note(f"Symbols bench: best of {ROUNDS} interleaved rounds, with symbols "
         f"{min(x['wall'] for x in kept):.2f}-{max(x['wall'] for x in kept):.2f} s, without "
         f"{min(x['wall'] for x in bare):.2f}-{max(x['wall'] for x in bare):.2f} s; ISF "
         f"{len(table['user_types'])} types, {len(table['symbols'])} symbols, build "
         f"{', '.join(f'{t:.2f}' for t in times)} s.")
    assert added <= 15 * MB and min(times) <= 10


# Run in an amd64 guest (its live root): the KCORE notes an elf dump would carry, as a sidecar.
_GATHER = r"""
import sys
from kcore import symbols
files = symbols.gather("/")
open(sys.argv[1], "wb").write(symbols.sidecar(files, 62))
print(len(symbols.elf_notes(files)))
"""


@pytest.mark.parametrize("guest", ["kaslr", "kaslr-6.12", "arm64-6.12"])
def test_symbols_per_kernel(guest, benchmark, record, note):
    """The bytes the symbols add to an elf dump (the KCORE notes) and the ISF's build time,
    per kernel: an amd64 guest gathers its live root; an arm64 guest's capture, the host."""
    pytest.importorskip("pakunoda", reason="pakunoda builds the ISF (kcore[symbols])")
    from tests.vm import qemu_vm
    from tests.vm.guests import ARM64_CONFIGS, Pool

    arch = "arm64" if guest in ARM64_CONFIGS else None
    reason = qemu_vm.unavailable_reason(*([arch] if arch else []))
    if reason:
        pytest.skip(f"QEMU cannot run {guest} here: {reason}")
    qemu_vm.ensure_built()
    pool = Pool()
    try:
        g = pool.get(guest)
        release = g.vm.kernel.release
        if arch:
            files = symbols.gather(g.root)
            added = len(symbols.elf_notes(files))
        else:
            side = g.vm.share / "bench.symbols"
            added = int(g.vm.python(_GATHER, str(side)).check().stdout)
            found = symbols.read_dump(str(side))
            assert found is not None
            files = found[0]
            side.unlink()
    finally:
        pool.close()
    raw = files.summary()["files"]
    assert "sys/kernel/btf/vmlinux" in raw, raw
    times = []
    for _ in range(3):
        t = time.perf_counter()
        table = isf.build(files)
        times.append(time.perf_counter() - t)
    benchmark.pedantic(isf.build, args=(files,), rounds=1)
    modules_btf = sum(1 for p in raw if p.startswith("sys/kernel/btf/") and
                      p != "sys/kernel/btf/vmlinux")
    record(f"symbols kept, {release} ({guest}): bytes added to an elf dump",
           f"{added / MB:.2f} MB ({sum(raw.values()) / MB:.1f} MB of files, "
           f"{modules_btf} modules' BTF)", "<= 15 MB", added <= 15 * MB)
    record(f"ISF build, {release} ({guest})", f"{min(times):.2f} s", "<= 10 s",
           min(times) <= 10)
    note(f"{guest}: ISF {len(table['user_types'])} types, {len(table['symbols'])} symbols, "
         f"build {', '.join(f'{t:.2f}' for t in times)} s; kallsyms "
         f"{raw.get('proc/kallsyms', 0) / MB:.1f} MB, vmlinux BTF "
         f"{raw['sys/kernel/btf/vmlinux'] / MB:.1f} MB.")
    assert added <= 15 * MB and min(times) <= 10
