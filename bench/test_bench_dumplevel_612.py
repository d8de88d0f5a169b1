"""-d from 6.12 on: kcore's page sets against makedumpfile 1.7.8's, the kernel deciding (#24).

makedumpfile 1.7.2 (Debian 12's) predates 6.12's page types, so from 6.12 on the oracle is
1.7.8 (bench/peers.py). A tests/vm guest of each kernel in KCORE_BENCH_612_KERNELS (default
bookworm's 6.12 amd64 package; KCORE_VM_KERNEL picks the kernel, as for the vm tests) boots
with 1 GiB, bench/guestload.py fills 60% of it (page cache, user data, slab), and QEMU's core
is read by both tools at -d 31 and -d 1 (kdump, uncompressed): their 2nd bitmaps (the pages
each keeps) are compared. Where they differ, drgn with the kernel's debug vmlinux (Debian's
-dbg package) reads the free lists, the per-CPU lists and each page's flags
(bench/pagejudge.py), and the row says which tool the kernel agrees with; a seeded sample of
the pages both leave out at -d 31 is judged too (equal sets can be wrong together: on 7.2 both
left slab pages out until kcore read 7.x's page.compound_info).
Run: python3 -m pytest bench/test_bench_dumplevel_612.py --benchmark-only -s  (~45 s a kernel at
load 5; 7.x: KCORE_BENCH_612_KERNELS=linux-image-7.2.13+deb14-amd64, Debian unstable's)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import BENCH
from guestload import capture, load
from pagejudge import judge
from peers import makedumpfile_path

from tests import pagesets
from tests.helpers import debug_vmlinux
from tests.vm import qemu_vm

REPO = BENCH.parent
KERNELS = os.environ.get("KCORE_BENCH_612_KERNELS",
                         "linux-image-6.12.118+deb12-amd64").split(",")
WORK = Path(os.environ.get("KCORE_BENCH_612_DIR", str(qemu_vm.CACHE / "runs")))
# what -d 31 leaves out, by the kernel's truth (bench/pagejudge.py's names)
# (not-ram: outside System RAM, which /proc/kcore leaves out and QEMU's core holds)
EXCLUDED_AT = {"31": {"free", "zero", "anon", "cache", "not-ram"}, "1": {"zero", "not-ram"}}
# Pages both tools leave out at -d 31, judged too (equal sets can still both be wrong: a page
# type neither knows); a seeded sample of them.
SAMPLE = int(os.environ.get("KCORE_BENCH_612_SAMPLE", "2000"))


def _bitmaps(core: Path, root: Path, level: str, d: Path) -> tuple[bytearray, bytearray]:
    """(kcore's, makedumpfile 1.7.8's) kept pages at level, from their kdump bitmaps."""
    mine, theirs = d / f"kcore-d{level}.kdump", d / f"md-d{level}.kdump"
    for p in (mine, theirs, Path(f"{mine}.json")):
        p.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-m", "kcore", "dump", "--root", str(root), "--source",
                        f"elf:{core}", "--format", "kdump", "--compress", "none", "-d", level,
                        "--quiet", "--no-digest", "-o", str(mine)], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(makedumpfile_path()), "-d", level, str(core), str(theirs)],
                       capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    out = pagesets.kdump_held(mine), pagesets.kdump_held(theirs)
    mine.unlink()
    theirs.unlink()
    return out


def _both_out(a: bytearray, b: bytearray, n: int) -> list[int]:
    """A seeded sample of n pfns set in neither a nor b."""
    b = b.ljust(len(a), b"\0")
    out = [i * 8 + bit for i, (p, q) in enumerate(zip(a, b, strict=False))
           for bit in range(8) if not (p | q) >> bit & 1]
    return sorted(random.Random(24).sample(out, min(n, len(out))))


def _only(a: bytearray, b: bytearray) -> list[int]:
    """pfns set in a and not in b."""
    b = b.ljust(len(a), b"\0")
    x = int.from_bytes(bytes(p & ~q & 0xFF for p, q in zip(a, b, strict=False)), "little")
    out = []
    while x:
        low = x & -x
        out.append(low.bit_length() - 1)
        x ^= low
    return out


@pytest.mark.parametrize("kernel", KERNELS)
def test_dumplevel_page_sets_against_makedumpfile_178(kernel, monkeypatch, benchmark, record,
                                                      note):
    """Page sets at -d 31 and -d 1, kcore vs makedumpfile 1.7.8, differences judged by drgn."""
    reason = qemu_vm.unavailable_reason()
    if reason:
        pytest.skip(f"QEMU cannot run here: {reason}")
    if makedumpfile_path() is None:
        pytest.skip("makedumpfile 1.7.8 is not built (python3 bench/peers.py makedumpfile)")
    vmlinux = debug_vmlinux(kernel + "-dbg")
    monkeypatch.setenv("KCORE_VM_KERNEL", kernel)
    qemu_vm.ensure_built()
    d = WORK / f"kcore-bench-612-{os.getpid()}"
    d.mkdir(parents=True)
    try:
        vm = qemu_vm.boot(qemu_vm.VmConfig("d612", mem_mib=1024, kaslr=True))
        try:
            filled = load(vm, 0.6, timeout=3600)
            core = capture(vm, d)
        finally:
            vm.close()
        release = kernel.removeprefix("linux-image-")
        booted = (d / "root/proc/sys/kernel/osrelease").read_text().strip()
        assert booted == release, f"the guest ran {booted}, not {kernel}"
        summary: dict = {"kernel": release, "fill": filled}
        for level in ("31", "1"):
            mine, theirs = _bitmaps(core, d / "root", level, d)
            kcore_only, md_only = _only(mine, theirs), _only(theirs, mine)
            verdict = (judge(core, vmlinux, kcore_only + md_only, d / "root/proc/iomem")
                       if kcore_only or md_only else {})
            # a page only kcore keeps is right to keep unless the kernel says -d drops it; a
            # zero page is not (the 2nd bitmap keeps zero pages: both tools keep every RAM
            # page at -d 1, and makedumpfile writes the zero ones as its one zero page)
            kcore_wrong = sum(verdict[p] in EXCLUDED_AT[level] - {"zero"} for p in kcore_only)
            md_wrong = sum(verdict[p] in EXCLUDED_AT[level] for p in md_only)
            summary[level] = {
                "kcore_pages": pagesets.pages(mine), "makedumpfile_pages": pagesets.pages(theirs),
                "kcore_only": dict(Counter(verdict[p] for p in kcore_only)),
                "makedumpfile_only": dict(Counter(verdict[p] for p in md_only)),
                "first_kcore_only": [hex(p) for p in kcore_only[:8]],
                "first_makedumpfile_only": [hex(p) for p in md_only[:8]]}
            record(f"{release} -d {level}: pages kcore keeps and makedumpfile 1.7.8 leaves out "
                   "/ the reverse (kernel's verdict on each: drgn)",
                   f"{len(kcore_only)} {dict(Counter(verdict[p] for p in kcore_only))} / "
                   f"{len(md_only)} {dict(Counter(verdict[p] for p in md_only))} "
                   f"(of {pagesets.pages(theirs)} kept)",
                   "0 / 0, or the kernel sides with kcore",
                   kcore_wrong == 0 and md_wrong == len(md_only))
            if level == "31":
                both = _both_out(mine, theirs, SAMPLE)
                seen = judge(core, vmlinux, both, d / "root/proc/iomem") if both else {}
                kinds = Counter(seen.values())
                summary[level]["both_out_sample"] = dict(kinds)
                record(f"{release} -d 31: a sample of {len(both)} pages both tools leave out "
                       "(kernel's verdict on each: drgn)", str(dict(kinds)),
                       "all free, zero, anon, cache or not-ram",
                       set(kinds) <= EXCLUDED_AT[level])
        note(f"{release}: {json.dumps(summary)}")
        note("not-ram: page frames outside System RAM (pfn 0, 0x9f-0xff, the last 128 KiB below "
             "the PCI hole) that QEMU's core holds and makedumpfile keeps at every level; "
             "/proc/kcore, and so kcore, leave them out (kclist: System RAM only).")
        benchmark.pedantic(lambda: None, rounds=1)
    finally:
        shutil.rmtree(d, ignore_errors=True)
