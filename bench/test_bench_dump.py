"""`kcore dump` against dd, cp and makedumpfile on 4 GiB page-cached images (ratios in one run).

Run: python3 -m pytest bench/test_bench_dump.py --benchmark-only  (needs 11 GiB free in /dev/shm)
Each command runs ROUNDS times, interleaved, and the best time counts (the machine is shared).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_module

from tests import helpers

REPO = Path(__file__).resolve().parent.parent


_tests = helpers
_data = load_module("kcore_bench_dumpdata", REPO / "bench" / "dumpdata.py")
FIXTURE_NAMES, fixture_memory, shared_fixture = (_tests.FIXTURE_NAMES, _tests.fixture_memory,
                                                 _tests.shared_fixture)
RAM_TOP, make_image, make_root = _data.RAM_TOP, _data.make_image, _data.make_root

ROUNDS = int(os.environ.get("KCORE_BENCH_ROUNDS", "5"))
SHM = Path(os.environ.get("KCORE_BENCH_DIR", "/dev/shm"))
RESULTS: dict[str, dict] = {}
GB = 1e9
# The fastest SHA-256 here for the "same integrity" baseline: OpenSSL's (SHA-NI, ~2.1 GB/s)
# rather than coreutils' sha256sum (~0.5 GB/s on Debian 12), which would flatter kcore.
HASH_CMD = ["openssl", "dgst", "-sha256"] if shutil.which("openssl") else ["sha256sum"]
HASH_NAME = " ".join(HASH_CMD)


def run_timed(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    """Run cmd (it must succeed); return (wall seconds, result)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, **kw)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, (cmd, r.stderr.decode()[-2000:])
    return wall, r


def kcore_cmd(root: Path, image: Path, *args: str) -> list[str]:
    return ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "kcore", "dump", "--root",
            str(root), "--source", f"raw:{image}", "--quiet", "--json", *args]


def kcore_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def kcore_run(root: Path, image: Path, *args: str) -> dict:
    """Run kcore dump; return its JSON summary plus wall time and peak RSS (KiB, GNU time)."""
    wall, r = run_timed(kcore_cmd(root, image, *args), env=kcore_env())
    summary = json.loads(r.stdout)
    summary["wall"] = wall
    summary["rss_kib"] = int(r.stderr.decode().strip().splitlines()[-1])
    return summary


def remove(*paths: Path) -> None:
    for p in paths:
        for q in (p, Path(f"{p}.sha256"), Path(f"{p}.json")):
            q.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def bench_dir():
    name = FIXTURE_NAMES[0]
    ram = fixture_memory(name)
    if not SHM.is_dir():
        pytest.skip(f"{SHM} is not here")
    st = os.statvfs(SHM)
    if st.f_bavail * st.f_frsize < 11 * (1 << 30):
        pytest.skip(f"{SHM} has less than 11 GiB free")
    d = SHM / f"kcore-bench-{os.getpid()}"
    d.mkdir()
    # An installed package has its bytecode compiled (pip does it); this checkout may not.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "kcore")], check=True)
    make_root(shared_fixture(name) / "root", d / "root")
    yield d, ram
    shutil.rmtree(d, ignore_errors=True)
    report()


def report() -> None:
    if not RESULTS:
        return
    print("\n" + json.dumps(RESULTS, indent=2))


def ratio_line(record, what: str, theirs: float, ours: float, target: float,
               info: str = "") -> bool:
    """Record theirs/ours against a target ratio; return whether it is met."""
    ratio = theirs / ours
    ok = ratio >= target
    record(what, f"{ratio:.2f}x ({ours:.2f} s vs {theirs:.2f} s{info})", f">= {target}x", ok)
    return ok


def test_dense_4gib_to_dev_null_and_tmpfs(benchmark, bench_dir, record):
    d, ram = bench_dir
    image = d / "dense.raw"
    make_image(ram, image, 0.0)
    subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)  # page cache
    out, cp_out = d / "out.raw", d / "cp.raw"
    root = d / "root"
    dd, kn, cp, cp_sum, kf, kf_nd = [], [], [], [], [], []
    try:
        for _ in range(ROUNDS):
            dd.append(run_timed(["dd", f"if={image}", "of=/dev/null", "bs=1M"])[0])
            kn.append(kcore_run(root, image, "--format", "raw", "-o", "/dev/null"))
            remove(cp_out)
            cp.append(run_timed(["cp", str(image), str(cp_out)])[0])
            cp_sum.append(cp[-1] + run_timed([*HASH_CMD, str(cp_out)])[0])
            remove(cp_out, out)
            kf.append(kcore_run(root, image, "--format", "raw", "-o", str(out)))
            remove(out)
            kf_nd.append(kcore_run(root, image, "--format", "raw", "-o", str(out),
                                   "--no-digest"))
            remove(out)
        kn.append(benchmark.pedantic(kcore_run, args=(root, image, "--format", "raw", "-o",
                                                      "/dev/null"), rounds=1))
    finally:
        remove(out, cp_out)
        image.unlink()
    oks = [
        ratio_line(record, "4 GiB dense raw image to /dev/null: `dd bs=1M` time / kcore dump "
                   "time (whole command)", min(dd), min(x["wall"] for x in kn), 0.9),
        ratio_line(record, "same, kcore's own time (after interpreter start-up and imports)",
                   min(dd), min(x["seconds"] for x in kn), 0.9),
        ratio_line(record, "4 GiB dense raw image to a new file on tmpfs: `cp` / kcore dump "
                   "--format raw --no-digest (both copy only)", min(cp),
                   min(x["wall"] for x in kf_nd), 0.9),
        ratio_line(record, f"same, SHA-256 on (the default) / `cp` then `{HASH_NAME}` of the "
                   "copy (the same integrity)", min(cp_sum), min(x["wall"] for x in kf), 0.9),
        ratio_line(record, "same, SHA-256 on / bare `cp` (info: hashing 4.3 GB at ~2.1 GB/s "
                   "on one CPU is a floor of ~2 s)", min(cp), min(x["wall"] for x in kf), 0.9),
        ratio_line(record, "same, --no-digest, kcore's own time (after start-up)", min(cp),
                   min(x["seconds"] for x in kf_nd), 0.9),
    ]
    rss = max(x["rss_kib"] for x in kn + kf + kf_nd)
    record("peak RSS of kcore dump, 4 GiB (GNU time %M)", f"{rss / 1024:.1f} MiB", "<= 100 MiB",
           rss <= 100 * 1024)
    RESULTS["dense_4GiB"] = {"dd": dd, "cp": cp, "cp_sha256sum": cp_sum, "kcore_null": kn,
                             "kcore_file": kf, "kcore_file_nodigest": kf_nd}
    assert rss <= 100 * 1024
    assert oks[0] and oks[2] and oks[3], "see bench/RESULTS.md"


def test_half_zero_4gib_elf(benchmark, bench_dir, record):
    d, ram = bench_dir
    image = d / "z50.raw"
    zero_share = make_image(ram, image, 0.5)
    subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)
    root = d / "root"
    dense_elf = d / "dense.elf"
    kcore_run(root, image, "-o", str(dense_elf), "--no-elide", "--no-digest")
    out, cp_out, md_out = d / "out.elf", d / "cp.raw", d / "md.elf"
    cp, cp_sum, kf, kf_nd, md = [], [], [], [], []
    try:
        for _ in range(ROUNDS):
            remove(cp_out)
            cp.append(run_timed(["cp", str(image), str(cp_out)])[0])
            cp_sum.append(cp[-1] + run_timed([*HASH_CMD, str(cp_out)])[0])
            remove(cp_out, out)
            kf.append(kcore_run(root, image, "-o", str(out)))
            remove(out)
            kf_nd.append(kcore_run(root, image, "-o", str(out), "--no-digest"))
            remove(out, md_out)
            md.append(run_timed(["makedumpfile", "-E", "-d", "1", str(dense_elf),
                                 str(md_out)])[0])
            md_size = md_out.stat().st_size
            remove(md_out)
        remove(out)
        kf.append(benchmark.pedantic(kcore_run, args=(root, image, "-o", str(out)), rounds=1))
    finally:
        remove(out, cp_out, md_out)
        image.unlink()
        dense_elf.unlink()
    ours = min(x["wall"] for x in kf)
    share = f", {zero_share:.0%} zero pages, ELF {kf[0]['bytes'] / GB:.2f} GB"
    # cp copies 4 GiB whatever the bytes: its best over both tests is the fairer baseline
    # (with the dense ELF also in tmpfs here, cp's page allocation often meets reclaim).
    cp_best = min(cp + RESULTS.get("dense_4GiB", {}).get("cp", []))
    cp_sum_best = min(cp_sum + RESULTS.get("dense_4GiB", {}).get("cp_sha256sum", []))
    oks = [
        ratio_line(record, "4 GiB image, 50% zero pages, to a new file on tmpfs: `cp` (best "
                   "4 GiB cp of both tests) / kcore dump --format elf --no-digest (both copy "
                   "only; one pass: scan and copy at once)", cp_best,
                   min(x["wall"] for x in kf_nd), 1.5, share),
        ratio_line(record, "same, --no-digest, kcore's own time (after start-up)", cp_best,
                   min(x["seconds"] for x in kf_nd), 1.5),
        ratio_line(record, f"same, SHA-256 on (the default) / `cp` then `{HASH_NAME}` (best "
                   "of both tests)", cp_sum_best, ours, 1.5),
        ratio_line(record, "same, SHA-256 on / bare `cp` (info: hashing the 2.1 GB output at "
                   "~2.1 GB/s is a floor of ~1 s)", cp_best, ours, 1.5),
        ratio_line(record, "same, SHA-256 on, kcore's own time (after start-up) / bare `cp`",
                   cp_best, min(x["seconds"] for x in kf), 1.5),
        ratio_line(record, "same image: `makedumpfile -E -d 1` of its dense ELF / kcore dump "
                   "(makedumpfile only walks the kernel's mem_map: 512 MiB, output "
                   f"{md_size / GB:.2f} GB)", min(md), ours, 2.0),
        ratio_line(record, "same, --no-digest", min(md), min(x["wall"] for x in kf_nd), 2.0),
    ]
    per_byte = min(md) / (512 << 20) / (ours / RAM_TOP)
    record("same, per byte of memory each tool handled (info)", f"{per_byte:.2f}x", ">= 2x",
           per_byte >= 2)
    rss = max(x["rss_kib"] for x in kf + kf_nd)
    record("peak RSS of kcore dump --format elf, 4 GiB", f"{rss / 1024:.1f} MiB", "<= 100 MiB",
           rss <= 100 * 1024)
    RESULTS["half_zero_4GiB"] = {"cp": cp, "cp_sha256sum": cp_sum, "kcore": kf,
                                 "kcore_nodigest": kf_nd, "makedumpfile": md}
    assert rss <= 100 * 1024
    assert oks[0] and oks[2], "see bench/RESULTS.md"


def test_capture_elf_vs_makedumpfile(benchmark, bench_dir, record):
    """Equal work: the real 512 MiB capture (a real kernel's mem_map) through both tools."""
    d, ram = bench_dir
    root = shared_fixture(FIXTURE_NAMES[0]) / "root"
    dense_elf, out, md_out = d / "cap-dense.elf", d / "cap.elf", d / "cap-md.elf"
    kcore_run(root, ram, "-o", str(dense_elf), "--no-elide", "--no-digest")
    k, k_nd, md = [], [], []
    try:
        for _ in range(ROUNDS):
            remove(out, md_out)
            k.append(kcore_run(root, ram, "-o", str(out)))
            remove(out)
            md.append(run_timed(["makedumpfile", "-E", "-d", "1", str(dense_elf),
                                 str(md_out)])[0])
            remove(md_out)
            remove(out)
            k_nd.append(kcore_run(root, ram, "-o", str(out), "--no-digest"))
            remove(out)
        k.append(benchmark.pedantic(kcore_run, args=(root, ram, "-o", str(out)), rounds=1))
    finally:
        remove(out, md_out)
        dense_elf.unlink()
    # Info: the 2x target is checked like for like on 4 GiB in test_bench_dump_vm.py; on
    # 512 MiB kcore's fixed costs (interpreter start-up ~0.05 s) weigh a quarter.
    ratio_line(record, "real 512 MiB capture (info): `makedumpfile -E -d 1` of its dense ELF / "
               "kcore dump (elf) --no-digest (neither hashes)", min(md),
               min(x["wall"] for x in k_nd), 2.0)
    ratio_line(record, "same, kcore's own time (after start-up)", min(md),
               min(x["seconds"] for x in k_nd), 2.0)
    ratio_line(record, f"same, SHA-256 on (the default; it hashes the {k[0]['bytes'] / GB:.2f} "
               "GB output at ~2.1 GB/s)", min(md), min(x["wall"] for x in k), 2.0)
    RESULTS["capture_512MiB"] = {"kcore": k, "kcore_nodigest": k_nd, "makedumpfile": md}
