"""`kcore dump -d 31 --format kdump --compress lzo` against `makedumpfile -d 31 -l`, 4 GiB guest.

The guest and QEMU's core are test_bench_dump_vm's (as in test_bench_dumplevel_vm); its own
file so that its figures keep their own section of RESULTS.md.

Run: python3 -m pytest bench/test_bench_dumplevel_kdump_vm.py --benchmark-only -s
"""

from __future__ import annotations

import pytest
from test_bench_dump import ratio_line, run_timed
from test_bench_dump_vm import ROUNDS, remove
from test_bench_dump_vm import guest_core as _guest_core  # noqa: F401 (the fixture)
from test_bench_dumplevel_vm import GB, kcore, subprocess_cat


@pytest.fixture(scope="module")
def core4g(request):
    """test_bench_dump_vm's 4 GiB guest, half filled, and QEMU's core of it."""
    return request.getfixturevalue("_guest_core")


def test_guest_d31_kdump_lzo_vs_makedumpfile(benchmark, core4g, record, note):
    """Interleaved rounds: makedumpfile -d 31 -l; kcore -d 31 --format kdump --compress lzo."""
    from kcore.formats import FORMATS

    if "kdump" not in FORMATS:
        pytest.skip("no kdump format in this kcore")
    d, root, vmcore, _fill, _boot = core4g
    subprocess_cat(vmcore)
    out, md_out = d / "out.kdump", d / "md.kdump"
    md, kf, kf_nd = [], [], []
    args = ("-d", "31", "--format", "kdump", "--compress", "lzo")
    try:
        for _ in range(ROUNDS):
            remove(md_out)
            md.append(run_timed(["makedumpfile", "-d", "31", "-l", str(vmcore), str(md_out)])[0])
            md_size = md_out.stat().st_size
            remove(md_out, out)
            kf.append(kcore(root, vmcore, out, *args))
            size = out.stat().st_size
            remove(out)
            kf_nd.append(kcore(root, vmcore, out, *args, "--no-digest"))
            remove(out)
        kf.append(benchmark.pedantic(kcore, args=(root, vmcore, out, *args), rounds=1))
    finally:
        remove(out, md_out)
    info = f"; kcore {size / GB:.3f} GB, makedumpfile {md_size / GB:.3f} GB"
    oks = [
        ratio_line(record, "4 GiB guest: `makedumpfile -d 31 -l` of QEMU's core / kcore dump "
                   "-d 31 --format kdump --compress lzo (SHA-256 on, whole command)", min(md),
                   min(x["wall"] for x in kf), 3.0, info),
        ratio_line(record, "same, --no-digest", min(md), min(x["wall"] for x in kf_nd), 3.0),
    ]
    rss = max(x["rss_kib"] for x in kf + kf_nd) / 1024
    record("peak RSS of kcore dump -d 31 --format kdump (4 GiB guest, worst round)",
           f"{rss:.0f} MiB", "<= 150 MiB", rss <= 150)
    note(f"kdump lzo, best of {ROUNDS} interleaved rounds: makedumpfile -d 31 -l "
         f"{min(md):.2f}-{max(md):.2f} s, kcore {min(x['wall'] for x in kf):.2f}-"
         f"{max(x['wall'] for x in kf):.2f} s, --no-digest {min(x['wall'] for x in kf_nd):.2f}-"
         f"{max(x['wall'] for x in kf_nd):.2f} s.")
    assert oks[0] or oks[1], "see bench/RESULTS.md"
