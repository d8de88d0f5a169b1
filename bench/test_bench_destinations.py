"""`kcore dump -o URL` of a 4 GiB dense image to nginx (WebDAV) and Azurite on loopback, against
`kcore dump -o - | curl -T - URL` to the same server (ratios in one run, interleaved rounds);
peak RSS (VmHWM) and bytes written to local storage (/proc/self/io write_bytes) of kcore.

Run: python3 -m pytest bench/test_bench_destinations.py --benchmark-only
(4 GiB in KCORE_BENCH_DIR, default /dev/shm; the servers' objects, 4 GiB at a time, in
KCORE_BENCH_DISK, default /var/tmp)
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_module

from kcore.destinations import DEFAULT_PART
from tests import helpers
from tests.destinations import servers

REPO = Path(__file__).resolve().parent.parent
_data = load_module("kcore_bench_dumpdata", REPO / "bench" / "dumpdata.py")
ROUNDS = int(os.environ.get("KCORE_BENCH_ROUNDS", "3"))
SHM = Path(os.environ.get("KCORE_BENCH_DIR", "/dev/shm"))
DISK = Path(os.environ.get("KCORE_BENCH_DISK", "/var/tmp"))
RSS_LIMIT = 200 << 20
GIB = 1 << 30


@pytest.fixture(scope="module")
def image_4gib():
    """A dense 4 GiB raw image (the capture's RAM, then data) and its root."""
    name = helpers.FIXTURE_NAMES[0]
    ram = helpers.fixture_memory(name)
    for where, need in ((SHM, 5), (DISK, 10)):
        st = os.statvfs(where)
        if st.f_bavail * st.f_frsize < need * GIB:
            pytest.skip(f"{where} has less than {need} GiB free")
    d = SHM / f"kcore-bench-dest-{os.getpid()}"
    d.mkdir()
    try:
        _data.make_root(helpers.shared_fixture(name) / "root", d / "root")
        image = d / "dense.raw"
        _data.make_image(ram, image, 0.0)
        subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)
        yield d / "root", image
    finally:
        shutil.rmtree(d, ignore_errors=True)


def kcore_args(root: Path, image: Path) -> list[str]:
    return ["dump", "--root", str(root), "--source", f"raw:{image}", "-q", "--force"]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")


def ours(root: Path, image: Path, url: str, *extra: str) -> tuple[float, dict[str, int]]:
    """kcore dump -o URL (SHA-256 on unless extra says --no-digest): wall, measures."""
    t = time.perf_counter()
    r = subprocess.run(servers.measured_cmd(*kcore_args(root, image), "-o", url, *extra),
                       env=env(), capture_output=True)
    wall = time.perf_counter() - t
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return wall, servers.measured(r.stderr)


def theirs(root: Path, image: Path, url: str, *curl: str) -> float:
    """kcore dump -o - | curl -T - URL: wall."""
    kcore = " ".join([sys.executable, "-m", "kcore", *kcore_args(root, image), "-o", "-"])
    cmd = f"set -o pipefail; {kcore} | curl -sSf -T - {' '.join(curl)} '{url}' >/dev/null"
    t = time.perf_counter()
    r = subprocess.run(["bash", "-c", cmd], env=env(), capture_output=True)
    wall = time.perf_counter() - t
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return wall


def clean(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            p.unlink()


def compare(record, note, server: str, run_ours, run_theirs, wipe, unhashed=None) -> None:
    """ours (and, given, ours with --no-digest) against theirs, in interleaved rounds."""
    runs = {"": run_ours} if unhashed is None else {"": run_ours, " --no-digest": unhashed}
    walls: dict[str, list[float]] = {k: [] for k in runs}
    rss, written, refs = [], [], []
    load = [open("/proc/loadavg").read().split()[0]]
    for _ in range(ROUNDS):
        for label, run in runs.items():
            wipe()
            w, m = run()
            walls[label].append(w)
            rss.append(m["VmHWM"])
            written.append(m["write_bytes"])
        wipe()
        refs.append(run_theirs())
    wipe()
    load.append(open("/proc/loadavg").read().split()[0])
    for label, ws in walls.items():
        through = min(refs) / min(ws)  # theirs' time over ours': the throughput ratio
        record(f"4 GiB dense elf to {server} on loopback: throughput of `kcore dump -o URL"
               f"{label}` / `kcore dump -o - | curl -T - URL`",
               f"{through:.2f}x ({4 * GIB / min(ws) / 1e9:.2f} vs "
               f"{4 * GIB / min(refs) / 1e9:.2f} GB/s)", ">= 0.9x", through >= 0.9)
    record(f"same ({server}): kcore's peak RSS, bytes written to local storage",
           f"{max(rss) / (1 << 20):.0f} MiB, {max(written)} B", "<= 200 MiB, 0 B",
           max(rss) <= RSS_LIMIT and max(written) == 0)
    mine = "; ".join(f"kcore{label} walls {[round(w, 2) for w in ws]}"
                     for label, ws in walls.items())
    note(f"{server}: load average {load[0]} at the start, {load[1]} at the end; best of "
         f"{ROUNDS} interleaved rounds; {mine}; curl walls {[round(w, 2) for w in refs]}.")


def test_nginx_4gib(benchmark, image_4gib, record, note):
    root, image = image_4gib
    folder = Path(DISK) / f"kcore-bench-nginx-{os.getpid()}"
    ng = servers.Nginx(folder)
    try:
        url = ng.url("/mem.elf")
        benchmark.pedantic(lambda: None, rounds=1)
        # --no-digest too: the reference hashes nothing, and on 2 CPUs shared with the
        # server the SHA-256 (~3 CPU-s for 4 GiB) is what the default pays for its digest
        compare(record, note, "nginx (WebDAV PUT)", lambda: ours(root, image, url),
                lambda: theirs(root, image, url), lambda: clean(ng.www),
                unhashed=lambda: ours(root, image, url, "--no-digest"))
    finally:
        ng.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_azurite_4gib(benchmark, image_4gib, record, note):
    root, image = image_4gib
    folder = Path(DISK) / f"kcore-bench-azurite-{os.getpid()}"
    az = servers.Azurite(folder)
    try:
        url = az.sas_url("dumps", "mem.elf")
        # Put Blob needs the length and no chunked body (curl -T - sends both unless told):
        # the dump's length, known here.
        kcore = " ".join([sys.executable, "-m", "kcore", *kcore_args(root, image), "-o", "-"])
        size = int(subprocess.run(["bash", "-c", f"{kcore} | wc -c"], env=env(), check=True,
                                  capture_output=True).stdout)
        benchmark.pedantic(lambda: None, rounds=1)

        def wipe() -> None:  # a new Azurite: it frees deleted blobs' space only later
            az.close()
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            az.start()
            az.sas_url("dumps", "mem.elf")

        compare(record, note, "Azurite (Blob blocks)", lambda: ours(root, image, url),
                lambda: theirs(root, image, url, "-H", "'x-ms-blob-type: BlockBlob'", "-H",
                               "'Transfer-Encoding:'", "-H", f"'Content-Length: {size}'"),
                wipe)
    finally:
        az.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_azurite_blocks_vs_one_put(benchmark, image_4gib, record, note):
    """Azurite's own pace, kcore aside: 1 GiB of the image as one Put Blob, and as Put Block
    of kcore's default size (32 MiB) one after another (then Put Block List), both by curl on
    one connection."""
    _, image = image_4gib
    folder = Path(DISK) / f"kcore-bench-azurite-curl-{os.getpid()}"
    az = servers.Azurite(folder)
    size, block = GIB, DEFAULT_PART
    blocks = SHM / f"kcore-bench-blocks-{os.getpid()}"
    blocks.mkdir()
    try:
        with open(image, "rb") as f:
            for i in range(size // block):
                (blocks / str(i)).write_bytes(f.read(block))
        benchmark.pedantic(lambda: None, rounds=1)

        def wipe() -> str:
            az.close()
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            az.start()
            return az.sas_url("dumps", "blob")

        def one_put(url: str) -> None:
            subprocess.run(["curl", "-sSf", "-T", "-", "-H", "x-ms-blob-type: BlockBlob",
                            "-H", "Transfer-Encoding:", "-H", f"Content-Length: {size}",
                            "-o", "/dev/null", url], check=True,
                           stdin=subprocess.Popen(["head", "-c", str(size), str(image)],
                                                  stdout=subprocess.PIPE).stdout)

        def block_puts(url: str) -> None:
            args, ids = ["curl", "-sSf"], []
            for i in range(size // block):
                ids.append(base64.b64encode(b"blk%06d" % i).decode())  # 12 characters, no =
                args += ["--next"] * bool(i) + ["-X", "PUT", "--data-binary",
                                                f"@{blocks / str(i)}", "-H", "Content-Type:",
                                                "-o", "/dev/null",
                                                f"{url}&comp=block&blockid={ids[-1]}"]
            subprocess.run(args, check=True)
            body = "<BlockList>" + "".join(f"<Latest>{b}</Latest>" for b in ids) + "</BlockList>"
            subprocess.run(["curl", "-sSf", "-X", "PUT", "--data-binary", body, "-o",
                            "/dev/null", f"{url}&comp=blocklist"], check=True)

        walls: list[list[float]] = [[], []]
        for _ in range(ROUNDS):
            for i, fn in enumerate((one_put, block_puts)):
                url = wipe()
                t = time.perf_counter()
                fn(url)
                walls[i].append(time.perf_counter() - t)
        ratio = min(walls[0]) / min(walls[1])
        record(f"Azurite itself, by curl: 1 GiB as {block >> 20} MiB Put Blocks in sequence "
               f"/ as one Put Blob (throughput)", f"{ratio:.2f}x ({min(walls[1]):.1f} vs "
               f"{min(walls[0]):.1f} s)", "(a measure: Azurite's cost per block)", True)
        note(f"Azurite curl: load average {open('/proc/loadavg').read().split()[:3]}; "
             f"Put Blob walls {[round(w, 2) for w in walls[0]]}, Put Block walls "
             f"{[round(w, 2) for w in walls[1]]} (a new Azurite before each).")
    finally:
        az.close()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(blocks, ignore_errors=True)
