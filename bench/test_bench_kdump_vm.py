"""Compressed dumps of the real 4 GiB half-filled guest (test_bench_dump_vm's QEMU core).

- `kcore dump --format kdump --compress lzo` vs `makedumpfile -l -d 1`, `--compress zlib` vs
  `makedumpfile -c -d 1` (Debian's makedumpfile has lzo and zlib): time and output size;
- `--compress zstd` vs the user's alternative, `kcore dump --format elf` then `zstd -T0 -1`;
- `--format avml` vs `--format lime` (the snappy work behind the copy, on the threads);
- peak RSS (GNU time's %M) of each kcore run.

Interleaved rounds, the page-cached core as input, ratios in one run (bench/RESULTS.md).
Run: python3 -m pytest bench/test_bench_kdump_vm.py --benchmark-only  (~12 GiB in /dev/shm)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_bench_dump import ratio_line, run_timed
from test_bench_dump_vm import guest_core, remove  # noqa: F401 - the shared guest fixture

REPO = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("KCORE_BENCH_ROUNDS", "3"))
GB = 1e9
RSS_LIMIT_KIB = 150 << 10


def kcore(root: Path, vmcore: Path, out: Path, *args: str) -> dict:
    """kcore dump of the core (no digest: makedumpfile makes none); summary, wall, peak RSS."""
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "kcore", "dump", "--root",
           str(root), "--source", f"elf:{vmcore}", "--quiet", "--json", "--no-digest",
           "-o", str(out), *args]
    wall, r = run_timed(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)))
    summary = json.loads(r.stdout)
    summary["wall"] = wall
    summary["rss_kib"] = int(r.stderr.decode().strip().splitlines()[-1])
    summary["size"] = out.stat().st_size
    return summary


def makedumpfile(flag: str, vmcore: Path, out: Path) -> tuple[float, int]:
    """makedumpfile FLAG -d 1 (kdump-compressed); (wall seconds, output size)."""
    remove(out)
    wall, _r = run_timed(["makedumpfile", flag, "-d", "1", str(vmcore), str(out)])
    return wall, out.stat().st_size


def elf_then_zstd(root: Path, vmcore: Path, out: Path) -> tuple[float, int, int]:
    """The user's alternative: an ELF dump, then zstd -T0 -1 of it; (wall, size, peak RSS)."""
    s = kcore(root, vmcore, out, "--format", "elf")
    wall, _r = run_timed(["zstd", "-q", "-T0", "-1", "-f", "--rm", str(out),
                          "-o", f"{out}.zst"])
    size = Path(f"{out}.zst").stat().st_size
    Path(f"{out}.zst").unlink()
    return s["wall"] + wall, size, s["rss_kib"]


def test_guest_4gib_compressed_dumps(benchmark, guest_core, record, note):  # noqa: F811
    d, root, vmcore, fill, _boot = guest_core
    subprocess.run(["cat", str(vmcore)], stdout=subprocess.DEVNULL, check=True)
    out, md_out = d / "k.out", d / "md.out"
    runs: dict[str, list] = {k: [] for k in ("md_l", "md_c", "lzo", "zlib", "zstd", "elfzstd",
                                             "avml", "lime")}
    try:
        for _ in range(ROUNDS):
            runs["md_l"].append(makedumpfile("-l", vmcore, md_out))
            runs["md_c"].append(makedumpfile("-c", vmcore, md_out))
            remove(md_out)
            for codec in ("lzo", "zlib", "zstd"):
                remove(out)
                runs[codec].append(kcore(root, vmcore, out, "--format", "kdump",
                                         "--compress", codec))
            remove(out)
            runs["elfzstd"].append(elf_then_zstd(root, vmcore, out))
            for fmt in ("avml", "lime"):
                remove(out)
                runs[fmt].append(kcore(root, vmcore, out, "--format", fmt))
            remove(out)
        runs["zstd"].append(benchmark.pedantic(
            kcore, args=(root, vmcore, out, "--format", "kdump"), rounds=1))
    finally:
        remove(out, md_out)

    def best(key: str) -> float:
        return min(x["wall"] for x in runs[key])

    md_l, md_l_size = min(runs["md_l"])
    md_c, md_c_size = min(runs["md_c"])
    ez, ez_size, ez_rss = min(runs["elfzstd"])
    oks = [
        ratio_line(record, "4 GiB guest core, half filled: `makedumpfile -l -d 1` / kcore dump "
                   "--format kdump --compress lzo (whole command)", md_l, best("lzo"), 3.0,
                   f"; sizes {runs['lzo'][0]['size'] / GB:.3f} GB vs {md_l_size / GB:.3f} GB"),
        ratio_line(record, "same, `makedumpfile -c -d 1` / --compress zlib", md_c, best("zlib"),
                   3.0, f"; sizes {runs['zlib'][0]['size'] / GB:.3f} GB vs "
                        f"{md_c_size / GB:.3f} GB"),
        ratio_line(record, "same, kcore --format elf + `zstd -T0 -1` / --format kdump (zstd)",
                   ez, best("zstd"), 1.5, f"; sizes {runs['zstd'][0]['size'] / GB:.3f} GB vs "
                                          f"{ez_size / GB:.3f} GB"),
        ratio_line(record, "same, --format lime / --format avml (avml may take 1.5x lime)",
                   best("lime") * 1.5, best("avml"), 1.0,
                   f"; avml {best('avml'):.2f} s, lime {best('lime'):.2f} s"),
    ]
    sizes_ok = (runs["lzo"][0]["size"] <= 1.05 * md_l_size
                and runs["zlib"][0]["size"] <= 1.05 * md_c_size
                and runs["zstd"][0]["size"] <= ez_size)
    rss = {k: max(x["rss_kib"] for x in runs[k]) for k in ("lzo", "zlib", "zstd", "avml")}
    record("peak RSS of kcore dump --format kdump/avml, 4 GiB input (MiB)",
           ", ".join(f"{k} {v / 1024:.0f}" for k, v in rss.items()), "<= 150 MiB",
           max(rss.values()) <= RSS_LIMIT_KIB)
    note(f"Load average at the end: {open('/proc/loadavg').read().split()[:3]}; guest fill "
         f"{fill} MiB; best of {ROUNDS} interleaved rounds; elf+zstd peak RSS "
         f"{ez_rss / 1024:.0f} MiB.")
    print(json.dumps(runs, indent=1, default=str))
    assert sizes_ok, "output sizes: see the record"
    assert all(oks) and max(rss.values()) <= RSS_LIMIT_KIB, "see bench/RESULTS.md"
