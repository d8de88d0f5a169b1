"""`kcore smear DUMP PLUGIN`: how far apart in time a dump read the pages a plugin used."""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import kcore
from kcore.cli import subcommand
from kcore.errors import InputError

DESCRIPTION = """\
Run a Volatility 3 plugin on a dump through kcore's layer, note every physical page it reads
(not the stackers' whole-memory scans), and give the earliest and latest time the dump read
those pages, from DUMP.times (`kcore dump --times`): the window the plugin's view of memory
spans (Pagani, Fedorov and Balzarotti's measure of smear). With --order critical the pages
the plugin follows should all come from the critical set, read within milliseconds.

  kcore smear mem.lime linux.pslist -s ISF_DIR
  kcore smear mem.elf linux.proc.Maps -s ISF_DIR --json

Exit: 0 the plugin ran; 1 it failed (its last error line is given); 2 bad input (no
DUMP.times, no Volatility)."""


def add_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register `kcore smear` and its options."""
    p = subcommand(sub, name, help_text, description=DESCRIPTION)
    p.add_argument("dump", metavar="DUMP", help="a dump written with kcore dump --times")
    p.add_argument("plugin", metavar="PLUGIN", help="a Volatility 3 plugin (linux.pslist...)")
    p.add_argument("-s", "--symbols", metavar="DIR",
                   help="Volatility's symbol folder (an ISF of the dump's kernel)")
    p.add_argument("--vol-args", default="", metavar="ARGS",
                   help="more options for Volatility, before the plugin's name (one string)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON on stdout")
    p.add_argument("--cache-path", metavar="DIR",
                   help="Volatility's symbol cache (default: a new one, rebuilt each run)")
    p.add_argument("--show-output", action="store_true",
                   help="print the plugin's own output on stderr")
    return p


def measure(dump: str, plugin: str, vol_args: list[str],
            cache: str | None = None) -> dict[str, Any]:
    """Run the plugin under kcore's layer; the window of the pages it read, and its result."""
    from kcore.integrations.volatility import SMEAR_ENV, page_times, plugin_dir
    from kcore.pagetimes import CRITICAL

    times = page_times(dump)
    if times is None:
        raise InputError(f"{dump}.times: missing (dump with kcore dump --times)")
    with tempfile.TemporaryDirectory(prefix="kcore-smear-") as tmp:
        pages_file = os.path.join(tmp, "pages")
        # Volatility's process loads the plugin folder's layer from this same kcore
        here = os.path.dirname(os.path.dirname(os.path.abspath(kcore.__file__)))
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=path, **{SMEAR_ENV: pages_file})
        vol = shutil.which("vol")
        cmd = [vol] if vol else [sys.executable, "-c", "import volatility3.cli as c; c.main()"]
        cmd += ["--cache-path", cache or os.path.join(tmp, "c"), "-q", "-p", plugin_dir(),
                "-f", dump, *vol_args, plugin]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        try:
            with open(pages_file, encoding="ascii") as f:
                pages = [int(line, 16) for line in f if line.strip()]
        except FileNotFoundError:
            pages = []
    crit = {(r0[0], r0[1]) for r0 in times.records if r0[2] & CRITICAL}
    starts = sorted(crit)
    seen = []
    unknown = 0
    in_critical = 0
    later: list[int] = []
    for pa in pages:
        t = times.when(pa)
        if t is None:
            unknown += 1
            continue
        seen.append(t)
        i = bisect.bisect_right(starts, (pa, 1 << 40)) - 1
        if i >= 0 and pa < starts[i][0] + starts[i][1] * times.page_size:
            in_critical += 1
        elif crit:
            later.append(pa)
    dump_window = times.summary()["dump"]
    out: dict[str, Any] = {
        "dump": dump, "plugin": plugin, "exit_status": r.returncode,
        "rows": sum(1 for line in r.stdout.splitlines() if line.strip()),
        "pages": len(pages), "pages_without_time": unknown, "pages_critical": in_critical,
        "not_critical": [hex(p) for p in later[:32]],  # with --order critical: read later
        "error": r.stderr.strip().splitlines()[-1] if r.returncode and r.stderr.strip()
        else None,
        "stdout": r.stdout,
    }
    if seen:
        lo, hi = min(t[0] for t in seen), max(t[1] for t in seen)
        out.update(first_ns=lo, last_ns=hi, window_seconds=round((hi - lo) / 1e9, 6))
        whole = (dump_window or {}).get("seconds")
        out["window_share"] = round((hi - lo) / 1e9 / whole, 6) if whole else None
    return out


def run(args: argparse.Namespace) -> int:
    """Measure one plugin's smear; print it; the plugin's exit status."""
    from kcore.pagetimes import SUFFIX

    if not os.path.isfile(args.dump):
        raise InputError(f"{args.dump}: not a file")
    if not os.path.isfile(args.dump + SUFFIX):
        raise InputError(f"{args.dump}{SUFFIX}: missing (dump with kcore dump --times)")
    try:
        import volatility3  # noqa: F401
    except ImportError:
        raise InputError("kcore smear runs Volatility 3: pip install 'kcore[volatility]'") \
            from None
    vol_args = (["-s", args.symbols] if args.symbols else []) + shlex.split(args.vol_args)
    res = measure(args.dump, args.plugin, vol_args, args.cache_path)
    if args.show_output:
        print(res["stdout"], file=sys.stderr)
    res.pop("stdout")
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        lines = [f"kcore: {args.plugin} on {args.dump}: exit {res['exit_status']}, "
                 f"{res['rows']} lines of output, {res['pages']} pages read "
                 f"({res['pages_critical']} of them read first)"]
        if "window_seconds" in res:
            share = res.get("window_share")
            lines.append(f"  the dump read them from {res['first_ns'] / 1e9:.6f} s to "
                         f"{res['last_ns'] / 1e9:.6f} s: a window of "
                         f"{res['window_seconds']:.6f} s"
                         + (f" ({100 * share:.3f}% of the dump's)" if share is not None else ""))
        if res["error"]:
            lines.append(f"  the plugin failed: {res['error']}")
        print("\n".join(lines), file=sys.stderr)
    return 0 if res["exit_status"] == 0 else 1
