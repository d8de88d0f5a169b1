"""`kcore dump` against dd, cp and makedumpfile on 4 GiB page-cached images (ratios in one run).

Run: python3 -m pytest bench/test_bench_dump.py -s   (needs ~10 GiB free in /dev/shm)
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import FIXTURE_NAMES, REPO, fixture_memory, shared_fixture  # noqa: E402
from dumpdata import RAM_TOP, make_image, make_root  # noqa: E402

ROUNDS = int(os.environ.get("KCORE_BENCH_ROUNDS", "3"))
SHM = Path(os.environ.get("KCORE_BENCH_DIR", "/dev/shm"))
RESULTS: dict[str, dict] = {}
GB = 1e9


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
    make_root(shared_fixture(name) / "root", d / "root")
    yield d, ram
    shutil.rmtree(d, ignore_errors=True)
    report()


def report() -> None:
    if not RESULTS:
        return
    out = Path(__file__).resolve().parent / "results-dump.json"
    out.write_text(json.dumps(RESULTS, indent=2) + "\n")
    print("\n" + json.dumps(RESULTS, indent=2))


def test_dense_to_devnull_and_tmpfs(bench_dir):
    d, ram = bench_dir
    image = d / "dense.raw"
    make_image(ram, image, 0.0)
    subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)  # page cache
    out, cp_out = d / "out.raw", d / "cp.raw"
    dd, kn, cp, kf, kf_nd = [], [], [], [], []
    for _ in range(ROUNDS):
        dd.append(run_timed(["dd", f"if={image}", "of=/dev/null", "bs=1M"])[0])
        kn.append(kcore_run(d / "root", image, "--format", "raw", "-o", "/dev/null"))
        remove(cp_out)
        cp.append(run_timed(["cp", str(image), str(cp_out)])[0])
        remove(cp_out, out)
        kf.append(kcore_run(d / "root", image, "--format", "raw", "-o", str(out)))
        remove(out)
        kf_nd.append(kcore_run(d / "root", image, "--format", "raw", "-o", str(out),
                               "--no-digest"))
        remove(out)
    image.unlink()
    size = RAM_TOP
    best = min
    r = {
        "image_bytes": size,
        "dd_devnull_s": best(dd),
        "kcore_devnull_wall_s": best(x["wall"] for x in kn),
        "kcore_devnull_inprocess_s": best(x["seconds"] for x in kn),
        "cp_tmpfs_s": best(cp),
        "kcore_tmpfs_wall_s": best(x["wall"] for x in kf),
        "kcore_tmpfs_inprocess_s": best(x["seconds"] for x in kf),
        "kcore_tmpfs_nodigest_wall_s": best(x["wall"] for x in kf_nd),
        "peak_rss_kib": max(x["rss_kib"] for x in kn + kf + kf_nd),
    }
    r["ratio_devnull_wall"] = r["dd_devnull_s"] / r["kcore_devnull_wall_s"]
    r["ratio_devnull_inprocess"] = r["dd_devnull_s"] / r["kcore_devnull_inprocess_s"]
    r["ratio_tmpfs_wall"] = r["cp_tmpfs_s"] / r["kcore_tmpfs_wall_s"]
    r["ratio_tmpfs_nodigest_wall"] = r["cp_tmpfs_s"] / r["kcore_tmpfs_nodigest_wall_s"]
    RESULTS["dense_4GiB"] = r
    print(json.dumps(r, indent=2))
    assert r["peak_rss_kib"] <= 100 * 1024
    assert r["ratio_devnull_inprocess"] >= 0.9
    assert r["ratio_tmpfs_wall"] >= 0.9


def test_half_zero_elf(bench_dir):
    d, ram = bench_dir
    image = d / "z50.raw"
    zero_share = make_image(ram, image, 0.5)
    subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)
    dense_elf = d / "dense.elf"
    kcore_run(d / "root", image, "-o", str(dense_elf), "--no-elide", "--no-digest")
    out, cp_out, md_out = d / "out.elf", d / "cp.raw", d / "md.elf"
    cp, kf, kf_nd, md = [], [], [], []
    for _ in range(ROUNDS):
        remove(cp_out)
        cp.append(run_timed(["cp", str(image), str(cp_out)])[0])
        remove(cp_out, out)
        kf.append(kcore_run(d / "root", image, "-o", str(out)))
        remove(out)
        kf_nd.append(kcore_run(d / "root", image, "-o", str(out), "--no-digest"))
        remove(out, md_out)
        md.append(run_timed(["makedumpfile", "-E", "-d", "1", str(dense_elf), str(md_out)])[0])
        md_size = md_out.stat().st_size
        remove(md_out)
    image.unlink()
    dense_elf.unlink()
    r = {
        "image_bytes": RAM_TOP,
        "zero_page_share": round(zero_share, 3),
        "elf_bytes": kf[0]["bytes"],
        "makedumpfile_out_bytes": md_size,
        "cp_tmpfs_s": min(cp),
        "kcore_elf_wall_s": min(x["wall"] for x in kf),
        "kcore_elf_inprocess_s": min(x["seconds"] for x in kf),
        "kcore_elf_nodigest_wall_s": min(x["wall"] for x in kf_nd),
        "makedumpfile_E_d1_s": min(md),
        "peak_rss_kib": max(x["rss_kib"] for x in kf + kf_nd),
    }
    r["ratio_vs_cp"] = r["cp_tmpfs_s"] / r["kcore_elf_wall_s"]
    r["ratio_vs_cp_nodigest"] = r["cp_tmpfs_s"] / r["kcore_elf_nodigest_wall_s"]
    r["ratio_vs_makedumpfile"] = r["makedumpfile_E_d1_s"] / r["kcore_elf_wall_s"]
    # makedumpfile only walks the pages the kernel's mem_map describes (the capture's 512 MiB),
    # so it does 1/8 of the work here; per byte of memory handled:
    r["ratio_vs_makedumpfile_per_byte"] = r["ratio_vs_makedumpfile"] * RAM_TOP / (512 << 20)
    RESULTS["half_zero_4GiB_elf"] = r
    print(json.dumps(r, indent=2))
    assert r["peak_rss_kib"] <= 100 * 1024
    assert r["ratio_vs_cp"] >= 1.5


def test_capture_elf_vs_makedumpfile(bench_dir, tmp_path):
    """Equal work: the real 512 MiB capture (a real kernel's mem_map) through both tools."""
    d, ram = bench_dir
    root = shared_fixture(FIXTURE_NAMES[0]) / "root"
    dense_elf, out, md_out = d / "cap-dense.elf", d / "cap.elf", d / "cap-md.elf"
    kcore_run(root, ram, "-o", str(dense_elf), "--no-elide", "--no-digest")
    k, md = [], []
    for _ in range(ROUNDS):
        remove(out, md_out)
        k.append(kcore_run(root, ram, "-o", str(out)))
        remove(out)
        md.append(run_timed(["makedumpfile", "-E", "-d", "1", str(dense_elf), str(md_out)])[0])
        remove(md_out)
    dense_elf.unlink()
    r = {
        "memory_bytes": 512 << 20,
        "kcore_elf_wall_s": min(x["wall"] for x in k),
        "kcore_elf_inprocess_s": min(x["seconds"] for x in k),
        "makedumpfile_E_d1_s": min(md),
    }
    r["ratio_vs_makedumpfile"] = r["makedumpfile_E_d1_s"] / r["kcore_elf_wall_s"]
    RESULTS["capture_512MiB_elf"] = r
    print(json.dumps(r, indent=2))
    assert r["ratio_vs_makedumpfile"] >= 2
