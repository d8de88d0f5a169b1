"""`kcore bench`: kcore's read speed against dd on the real /proc/kcore, as ratios."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from kcore import engine
from kcore.cli import int_arg, subcommand
from kcore.errors import InputError, KcoreError
from kcore.sources.base import Extent
from kcore.sources.kcore import KcoreSource

MIB = 1 << 20


@dataclass
class Run:
    """One way of reading every RAM segment once, and how long it took."""

    name: str
    what: str
    bytes: int
    seconds: float

    @property
    def mib_per_s(self) -> float:
        """Throughput in MiB/s."""
        return self.bytes / MIB / self.seconds if self.seconds > 0 else float("inf")


DESCRIPTION = """\
Read every RAM segment of a real /proc/kcore several ways and compare: GNU dd with 1 MiB and
with 4 KiB blocks (what AVML does), kcore's copy engine to /dev/null (on one thread, and on
--threads threads with an open file each), and `kcore dump --source kcore:KCORE` to /dev/null.
Prints each speed and kcore's speedups over dd (a ratio above 1 means kcore was faster), best
of --rounds interleaved rounds. Needs root."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
               help_text: str) -> argparse.ArgumentParser:
    """Register `kcore bench` and its options."""
    p = subcommand(
        sub, name, help_text,
        description=DESCRIPTION,
        epilog="example: sudo kcore bench --against /proc/kcore --json",
    )
    p.add_argument("--root", default="/", metavar="DIR",
                   help="system root where proc/ and sys/ files are read (default: /)")
    p.add_argument("--against", default="/proc/kcore", metavar="KCORE",
                   help="the real kcore to read (default /proc/kcore)")
    p.add_argument("--limit", type=int_arg, default=0, metavar="BYTES",
                   help="read at most BYTES of RAM per method (default: all of it)")
    p.add_argument("--rounds", type=int, default=3, metavar="N",
                   help="rounds, each running every method once in turn; the best time of "
                   "each method counts (default 3)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="threads for the threaded engine run (default 0: one per CPU, at most "
                        f"{engine.MAX_THREADS}; 1 leaves that run out)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def ram_extents(kcore: str, limit: int) -> list[Extent]:
    """The real kcore's RAM segments (cut to `limit` bytes in total when limit > 0)."""
    with KcoreSource.open(kcore) as src:
        extents = list(src.extents)
    if not extents:
        raise InputError(f"{kcore}: no RAM segments (p_paddr) to read")
    if limit <= 0:
        return extents
    out, left = [], limit
    for e in extents:
        if left <= 0:
            break
        out.append(Extent(e.paddr, min(e.length, left), e.offset))
        left -= out[-1].length
    return out


def gnu_dd() -> str:
    """GNU dd (skip_bytes/count_bytes are GNU extensions), or raise."""
    dd = shutil.which("dd")
    if dd is None:
        raise KcoreError("dd is not installed (GNU coreutils)")
    probe = subprocess.run([dd, "--version"], capture_output=True, text=True)
    if "coreutils" not in probe.stdout:
        raise KcoreError(f"{dd} is not GNU dd (iflag=skip_bytes,count_bytes are needed)")
    return dd


def run_dd(dd: str, kcore: str, extents: list[Extent], block: str) -> Run:
    """dd each segment to /dev/null with block size `block`."""
    t0 = time.perf_counter()
    for e in extents:
        subprocess.run([dd, f"if={kcore}", "of=/dev/null", f"bs={block}",
                        "iflag=skip_bytes,count_bytes", f"skip={e.offset}", f"count={e.length}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Run(f"dd-{block}", f"dd bs={block} iflag=skip_bytes,count_bytes of=/dev/null",
               sum(e.length for e in extents), time.perf_counter() - t0)


def run_engine(kcore: str, extents: list[Extent]) -> Run:
    """kcore's copy engine: each segment from the kcore to /dev/null."""
    src = os.open(kcore, os.O_RDONLY)
    dst = os.open(os.devnull, os.O_WRONLY)
    try:
        t0 = time.perf_counter()
        for e in extents:
            engine.copy_range(src, e.offset, dst, None, e.length)
        seconds = time.perf_counter() - t0
    finally:
        os.close(src)
        os.close(dst)
    return Run("kcore-engine", "engine.copy_range to /dev/null", sum(e.length for e in extents),
               seconds)


def run_engine_threads(kcore: str, extents: list[Extent], threads: int) -> Run:
    """The engine on `threads` threads, each job slot reading through an open file of its own.

    6.1's read_kcore() has one bounce page per open file: threads must not share one
    (KcoreSource.slot_fd).
    """
    dst = os.open(os.devnull, os.O_WRONLY)
    try:
        with KcoreSource.open(kcore) as src:
            t0 = time.perf_counter()
            for e in extents:
                engine.copy_range(src.fd, e.offset, dst, e.offset, e.length, threads=threads,
                                  slot_fd=src.slot_fd)
            seconds = time.perf_counter() - t0
    finally:
        os.close(dst)
    return Run("kcore-engine-threads", f"engine.copy_range(threads={threads}) to /dev/null",
               sum(e.length for e in extents), seconds)


def run_dump(kcore: str, root: str, total: int) -> Run:
    """`kcore dump --source kcore:KCORE` (elf, RAM only) written to /dev/null."""
    cmd = [sys.executable, "-m", "kcore", "dump", "--root", root, "--source", f"kcore:{kcore}",
           "--no-text", "--no-digest", "--quiet", "-o", "-"]
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        r = subprocess.run(cmd, stdout=null, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise KcoreError(f"kcore dump failed: {r.stderr.decode(errors='replace').strip()}")
    return Run("kcore-dump", " ".join(cmd[1:]) + " >/dev/null", total, seconds)


def run_startup(kcore: str, root: str) -> Run:
    """`kcore ranges --source kcore:KCORE`: what a kcore command costs before it copies."""
    cmd = [sys.executable, "-m", "kcore", "ranges", "--root", root, "--source", f"kcore:{kcore}",
           "--json"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise KcoreError(f"kcore ranges failed: {r.stderr.decode(errors='replace').strip()}")
    return Run("kcore-startup", " ".join(cmd[1:]) + " (interpreter, imports, discovery; "
               "included in kcore-dump)", 0, seconds)


def measure(kcore: str, root: str, limit: int = 0, rounds: int = 1,
            threads: int = 1) -> dict[str, Any]:
    """Read the RAM segments every way; return the best runs and kcore's speedups over dd."""
    if rounds < 1:
        raise InputError(f"--rounds {rounds}: at least 1")
    if not 1 <= threads <= 16:
        raise InputError(f"--threads {threads}: from 1 to 16 (0: one per CPU)")
    extents = ram_extents(kcore, limit)
    dd = gnu_dd()
    total = sum(e.length for e in extents)
    methods: list[Callable[[], Run]] = [lambda: run_dd(dd, kcore, extents, "1M"),
                                        lambda: run_dd(dd, kcore, extents, "4k"),
                                        lambda: run_engine(kcore, extents)]
    if threads > 1:
        methods.append(lambda: run_engine_threads(kcore, extents, threads))
    if limit <= 0:  # the dump reads all RAM; comparable only when the others did too
        methods += [lambda: run_dump(kcore, root, total), lambda: run_startup(kcore, root)]
    best: dict[str, Run] = {}
    for _ in range(rounds):  # interleaved, so every method sees the machine's noise alike
        for method in methods:
            r = method()
            if r.name not in best or r.seconds < best[r.name].seconds:
                best[r.name] = r
    runs = list(best.values())
    by = best
    seconds = {name: r.seconds for name, r in by.items()}
    if "kcore-dump" in seconds and seconds["kcore-dump"] > seconds["kcore-startup"]:
        # the dump's copying alone: its wall time less what any kcore command costs to start
        seconds["kcore-dump-copy"] = seconds["kcore-dump"] - seconds["kcore-startup"]
    ratios = {f"{ours}/{base}": round(seconds[base] / seconds[ours], 3)
              for ours in ("kcore-engine", "kcore-engine-threads", "kcore-dump", "kcore-dump-copy")
              if ours in seconds
              for base in ("dd-1M", "dd-4k")}
    return {
        "against": kcore, "segments": len(extents), "bytes": total, "rounds": rounds,
        "runs": [{**asdict(r), "seconds": round(r.seconds, 4), "MiB_per_s": round(r.mib_per_s, 1)}
                 for r in runs],
        "speedup": ratios,
    }


def run(args: argparse.Namespace) -> int:
    """Benchmark and print the result."""
    result = measure(args.against, args.root, args.limit, args.rounds,
                     args.threads or engine.default_threads())
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"{result['against']}: {result['segments']} RAM segments, "
          f"{result['bytes'] / MIB:.1f} MiB per method, best of {result['rounds']} rounds")
    for r in result["runs"]:
        print(f"  {r['name']:<20} {r['seconds']:9.3f} s {r['MiB_per_s']:10.1f} MiB/s  {r['what']}")
    for name, ratio in result["speedup"].items():
        print(f"  speedup {name:<24} {ratio:7.2f}x")
    return 0
