"""`kcore ranges` start-up: the whole command on a capture, against the bare interpreter.

Run with `python3 -m pytest bench/test_bench_startup.py`. Both sides are fresh processes,
interleaved round by round, timed by their CPU time (the machine is shared: each side's
best round counts). The
ratio is how many bare `python3 -c pass` starts one `kcore ranges` costs; the redesign of
issue #10 (registries, wire modules) must not raise it. KCORE_BENCH_OLD=DIR also times the
checkout in DIR (a built tree of an older commit) in the same rounds.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from tests import helpers

REPO = Path(__file__).resolve().parent.parent
NAME = helpers.FIXTURE_NAMES[0]


def _run(argv: list[str], tree: Path | None = None) -> float:
    """The CPU time (user + system) of one run: steadier than wall time on a busy machine."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, cwd=tree or REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_ranges_startup_vs_bare_interpreter(record) -> None:
    """`kcore ranges --json` on the nokaslr capture vs `python3 -c pass`."""
    root = helpers.shared_fixture(NAME) / "root"
    spec = f"raw:{helpers.fixture_memory(NAME)}"
    ranges = [sys.executable, "-m", "kcore", "ranges", "--root", str(root), "--source", spec,
              "--json"]
    old = os.environ.get("KCORE_BENCH_OLD")
    # Bytecode as an installed package has it (pip compiles on install): without it each run
    # would time compiling the sources (PYTHONDONTWRITEBYTECODE keeps them from being cached).
    for tree in (REPO, *([Path(old)] if old else [])):
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "kcore")],
                       check=True, stdout=subprocess.DEVNULL)
    t_bare = t_new = t_old = float("inf")
    for _ in range(9):
        t_bare = min(t_bare, _run([sys.executable, "-c", "pass"]))
        t_new = min(t_new, _run(ranges, REPO))
        if old:
            t_old = min(t_old, _run(ranges, Path(old)))
    load = open("/proc/loadavg").read().split()[0]
    record("kcore ranges start-up / bare python3 start-up (CPU time; lower is better)",
           f"{t_new / t_bare:.1f}x ({t_new * 1e3:.0f} vs {t_bare * 1e3:.0f} ms, load {load})",
           "-", True)
    if old:
        record("kcore ranges start-up: this tree / KCORE_BENCH_OLD tree (CPU time)",
               f"{t_new / t_old:.2f}x ({t_new * 1e3:.0f} vs {t_old * 1e3:.0f} ms, load {load})",
               "<= 1.05x", t_new <= t_old * 1.05)
