"""`kcore check`: a preflight that changes nothing: will a dump work here, how big, and how."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kcore.cli import add_system_args, subcommand
from kcore.output import human

DESCRIPTION = """\
Say, without changing anything, whether a dump of this system would work, and how.

Each live source (/proc/kcore, /dev/crash, /dev/mem) is opened read-only and one page of RAM is
read through it; for each that fails, why: not root, kernel lockdown (integrity forbids
/dev/mem, confidentiality also /proc/kcore), a /proc/kcore masked by a container, STRICT_DEVMEM.
Then the facts a dump depends on (release, architecture, paging, KASLR, RAM, Secure Boot,
kptr_restrict), the size each format would take, the free space where it would go, and the
command to run. The verdict is what `kcore dump` itself finds (the same discovery).

exit status: 0 a dump would work; 2 it would not (one line says what to do)."""


def add_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register `kcore check` and its options."""
    p = subcommand(sub, name, help_text, description=DESCRIPTION)
    add_system_args(p, layout=False)
    p.add_argument("--output-dir", metavar="DIR",
                   help="where the dump would go (free space; default: the current directory)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    return p


def run(args: argparse.Namespace) -> int:
    """Probe, print the report, return 0 when a dump would work and 2 when not."""
    from kcore.preflight import check

    rep = check(args.root, args.output_dir, args.source)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        _print_human(rep)
    if not rep.verdict:
        print(f"kcore: a dump would not work: {rep.advice}", file=sys.stderr)
        return 2
    return 0


def _print_human(rep: Any) -> None:
    ram = human(rep.ram_bytes) if rep.ram_bytes else "unknown"
    lines = [
        f"kernel      {rep.release or 'unknown'} ({rep.arch or 'unknown arch'}), "
        f"{rep.paging}, KASLR {rep.kaslr}",
        f"RAM         {ram}",
        f"user        {'root' if rep.euid == 0 else f'uid {rep.euid} (not root)'}",
        f"lockdown    {rep.lockdown}",
        f"secure boot {rep.secure_boot}",
        f"kallsyms    {rep.kallsyms} (kptr_restrict {rep.kptr_restrict})",
        f"devmem      STRICT_DEVMEM {rep.strict_devmem}",
        f"/proc/kcore masked: {rep.kcore_masked}",
    ]
    if rep.source == "auto":
        lines.append("sources:")
        for p in rep.sources:
            lines.append(f"  {'ok  ' if p.works else 'no  '} {p.path}: {p.reason}")
    else:
        lines.append(f"source      {rep.source}")
    if rep.verdict:
        lines.append(f"verdict     a dump would work (source {rep.chosen})")
        if rep.sizes:
            lines.append("sizes       (elf and elf -d 31, the kernel's own pages: estimated "
                         "from a sample of memory; the others at most, zero runs included)")
        for fmt, s in rep.sizes.items():
            extra = f", {human(s['space'])} on disk at most" if s["space"] != s["size"] else ""
            if "sampled_bytes" in s:
                extra = f" (~, {human(s['sampled_bytes'])} sampled)"
            lines.append(f"  {fmt:<9} {human(s['size'])}{extra}")
        free = human(rep.free_bytes) if rep.free_bytes is not None else "unknown"
        lines.append(f"free        {free} in {rep.output_dir}")
        lines.append(f"run         {rep.command}")
    else:
        lines.append(f"verdict     a dump would fail: {rep.problem}")
    print("\n".join(lines))
