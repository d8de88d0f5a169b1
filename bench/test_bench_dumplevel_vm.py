"""`kcore dump -d 31` against `makedumpfile -d 31` on the real 4 GiB guest of test_bench_dump_vm.

The guest (Debian's 6.1 kernel under TCG, half its RAM filled with non-zero bytes in a tmpfs:
page cache) is captured as test_bench_dump_vm does; QEMU's dump-guest-memory core is the
input of both tools. First the page sets: for -d 1, 16, 17, 23 and 31 the frames kcore keeps
equal those `makedumpfile -d N -E` keeps (its rule that writes excluded runs shorter than 256
pages applied to kcore's set, as in tests/test_dumplevel.py), both reading kcore's dense ELF
of the core. Then interleaved timing rounds, peak RSS (GNU time) and the classification's
share of kcore's own time.

Run: python3 -m pytest bench/test_bench_dumplevel_vm.py --benchmark-only -s
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from test_bench_dump import ratio_line, run_timed
from test_bench_dump_vm import MEM_MIB, ROUNDS, remove
from test_bench_dump_vm import guest_core as _guest_core  # noqa: F401 (the fixture)

from tests import pagesets

REPO = Path(__file__).resolve().parent.parent

LEVELS = (1, 16, 17, 23, 31)
GB = 1e9


@pytest.fixture(scope="module")
def core4g(request):
    """test_bench_dump_vm's 4 GiB guest, half filled, and QEMU's core of it."""
    return request.getfixturevalue("_guest_core")


def kcore(root: Path, source: Path, out: Path, *args: str) -> dict:
    """kcore dump of a core; its JSON summary, wall time and peak RSS (KiB)."""
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "kcore", "dump", "--root",
           str(root), "--source", f"elf:{source}", "--quiet", "--json", "--force", "-o",
           str(out), *args]
    wall, r = run_timed(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)))
    summary = json.loads(r.stdout) if r.stdout.strip() else {}
    summary["wall"] = wall
    summary["rss_kib"] = int(r.stderr.decode().strip().splitlines()[-1])
    return summary


def test_guest_page_sets_equal_makedumpfile(benchmark, core4g, record, note):
    """-d 1, 16, 17, 23, 31: kcore's frames and makedumpfile -E's, frame by frame."""
    d, root, vmcore, _fill, _boot = core4g
    dense = d / "dense.elf"
    mine, theirs = d / "k.elf", d / "m.elf"
    kcore(root, vmcore, dense, "--no-elide", "--no-digest")
    try:
        npfn = max(pa + m for pa, _f, m in pagesets.loads(dense)) // pagesets.PAGE
        results = {}
        for level in LEVELS:
            kcore(root, dense, mine, "-d", str(level), "--no-digest")
            pagesets.makedumpfile(["-E", "-d", str(level)], dense, theirs, timeout=1200)
            held = pagesets.elf_held(mine, npfn)
            want = pagesets.e_closure(held, pagesets.loads(dense))
            got = pagesets.elf_held(theirs, npfn)
            results[level] = (pagesets.differences(want, got), pagesets.pages(held),
                              pagesets.pages(got))
            remove(mine, theirs)
        benchmark.pedantic(lambda: None, rounds=1)
    finally:
        remove(mine, theirs, dense)
    for level, ((count, first), kept, md) in results.items():
        record(f"4 GiB guest, -d {level}: page frames differing from makedumpfile -E -d "
               f"{level} (its 256-page rule applied)", f"{count} (kcore keeps {kept} frames, "
               f"makedumpfile writes {md}){' first ' + str(first[:5]) if count else ''}", "0",
               count == 0)
    assert all(c == 0 for (c, _f), _k, _m in results.values())


def test_guest_d31_elf_vs_makedumpfile(benchmark, core4g, record, note):
    """Interleaved rounds on QEMU's core: makedumpfile -E -d 31; kcore -d 31 (digest on, off)."""
    d, root, vmcore, fill, boot = core4g
    subprocess_cat(vmcore)
    out, md_out, md_kdump = d / "out.elf", d / "md.elf", d / "md.kdump"
    md, kf, kf_nd = [], [], []
    try:
        for _ in range(ROUNDS):
            remove(md_out)
            md.append(run_timed(["makedumpfile", "-E", "-d", "31", str(vmcore),
                                 str(md_out)])[0])
            md_size = md_out.stat().st_size
            remove(md_out, out)
            kf.append(kcore(root, vmcore, out, "-d", "31"))
            size = out.stat().st_size
            remove(out)
            kf_nd.append(kcore(root, vmcore, out, "-d", "31", "--no-digest"))
            remove(out)
        kf.append(benchmark.pedantic(kcore, args=(root, vmcore, out, "-d", "31"), rounds=1))
        remove(md_kdump)
        run_timed(["makedumpfile", "-d", "31", str(vmcore), str(md_kdump)])
        kdump_size = md_kdump.stat().st_size
        # QEMU's core has no kernel-text PT_LOAD, so makedumpfile's outputs hold the image
        # once (in its RAM frames): so does kcore's with --no-text
        remove(out)
        kcore(root, vmcore, out, "-d", "31", "--no-text", "--no-digest")
        size_nt = out.stat().st_size
    finally:
        remove(out, md_out, md_kdump)
    best = min(kf, key=lambda x: x["wall"])
    level = best["dump_level"]
    shares = sorted(x["dump_level"]["classify_seconds"] / x["seconds"] for x in kf + kf_nd)
    share = shares[len(shares) // 2]  # the median round (a loaded machine stretches either)
    rss = max(x["rss_kib"] for x in kf + kf_nd) / 1024
    info = (f"; guest {MEM_MIB} MiB, kcore elf {size / GB:.3f} GB, makedumpfile -E "
            f"{md_size / GB:.3f} GB")
    oks = [
        ratio_line(record, "4 GiB guest: `makedumpfile -E -d 31` of QEMU's core / kcore dump "
                   "-d 31 --format elf (SHA-256 on, whole command)", min(md),
                   min(x["wall"] for x in kf), 3.0, info),
        ratio_line(record, "same, --no-digest", min(md), min(x["wall"] for x in kf_nd), 3.0),
        ratio_line(record, "same, kcore's own time (after start-up), --no-digest", min(md),
                   min(x["seconds"] for x in kf_nd), 3.0),
    ]
    record("classifying the mem_map / the -d 31 dump's own time (median round; best "
           f"{shares[0]:.1%}, worst {shares[-1]:.1%})",
           f"{share:.1%} ({best['dump_level']['classify_seconds']:.3f} s of "
           f"{best['seconds']:.2f} s)", "<= 10%", share <= 0.10)
    record("peak RSS of kcore dump -d 31 (4 GiB guest, worst round)", f"{rss:.0f} MiB",
           "<= 150 MiB", rss <= 150)
    record("kcore -d 31 --no-text elf size / makedumpfile -E -d 31 size (QEMU's core: the "
           "kernel image once, in its RAM frames)", f"{size_nt / md_size:.3f} ({size_nt / GB:.3f}"
           f" GB vs {md_size / GB:.3f} GB; with the text PT_LOAD {size / GB:.3f} GB)", "<= 1.1",
           size_nt / md_size <= 1.1)
    record("kcore -d 31 --no-text elf size / makedumpfile -d 31 (kdump, uncompressed) size",
           f"{size_nt / kdump_size:.3f} ({kdump_size / GB:.3f} GB)", "<= 1.1",
           size_nt / kdump_size <= 1.1)
    note(f"-d 31 on the {MEM_MIB} MiB guest (a tmpfs holding {fill} MiB, booted in {boot:.0f} s):"
         f" kcore kept {level['pages_kept']} of {level['pages_in_ram']} RAM pages; left out "
         + ", ".join(f"{k} {v}" for k, v in level["pages_excluded"].items())
         + f". Best of {ROUNDS} interleaved rounds: makedumpfile -E {min(md):.2f}-{max(md):.2f}"
         f" s, kcore {min(x['wall'] for x in kf):.2f}-{max(x['wall'] for x in kf):.2f} s, "
         f"--no-digest {min(x['wall'] for x in kf_nd):.2f}-{max(x['wall'] for x in kf_nd):.2f}"
         f" s; classification {level['classify_seconds']:.3f} s; peak RSS {rss:.0f} MiB.")
    assert oks[0] or oks[1], "see bench/RESULTS.md"


def subprocess_cat(path: Path) -> None:
    """Read a file once so both tools find it in the page cache."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass
