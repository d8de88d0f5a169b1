"""`kcore verify DUMP`: structure, digests, ranges and what drgn, crash and Volatility need."""

from __future__ import annotations

import argparse
import json
import struct
import sys
from typing import Any

from kcore.cli import subcommand
from kcore.output import human

DESCRIPTION = """\
Check a memory dump end to end, whoever wrote it: kcore's elf, kcore, lime, raw and padded
files, LiME and AVML images, QEMU and kdump ELF cores, makedumpfile's flattened files.

  structure   headers, program headers, notes and range headers, every bound checked
  digests     the SHA-256 against DUMP.sha256 and the manifest DUMP.json; kcore's manifests
              also hold a SHA-256 per 64 MiB chunk, which says where a damaged file breaks
  ranges      the file's ranges against the manifest's; the share of zero pages (and of
              unreadable ones, from the manifest)
  consumers   Volatility's ELF layer maps only PT_LOADs with p_filesz == p_memsz; drgn needs
              a VMCOREINFO note and refuses flattened files; crash needs KERNELOFFSET and
              phys_base for a KASLR kernel

exit status: 0 intact; 1 damaged (where it breaks is said); 2 not a dump file."""


def add_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register `kcore verify` and its options."""
    p = subcommand(sub, name, help_text, description=DESCRIPTION)
    p.add_argument("dump", metavar="DUMP", help="the dump file (DUMP.sha256 and DUMP.json "
                   "beside it are used when present)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON on stdout")
    return p


def run(args: argparse.Namespace) -> int:
    """Verify one dump; print the findings; 0 intact, 1 damaged."""
    from kcore.verify import verify

    try:
        res = verify(args.dump)
    except MemoryError:
        print(f"kcore: error: {args.dump}: out of memory while verifying it", file=sys.stderr)
        return 1
    except (struct.error, ValueError, OverflowError, UnicodeDecodeError):
        # A hostile file that got past the checks: still one line, never a traceback.
        print(f"kcore: error: {args.dump}: malformed in a way verify does not name (a "
              "structure past its checks; please report it with the file)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
    else:
        _print_human(res)
    if not res.ok:
        p = res.problems[0]
        where = f" at offset {p['offset']}" if p["offset"] else ""
        more = f" (and {len(res.problems) - 1} more)" if len(res.problems) > 1 else ""
        print(f"kcore: {args.dump} is damaged{where}: {p['what']}{more}", file=sys.stderr)
        return 1
    return 0


def _print_human(r: Any) -> None:
    lines = [f"{r.path}: {r.format} ({r.detail}), {human(r.size)}"]
    lines.append(f"  structure   {r.structure}")
    if r.sha256:
        said = ", ".join(f"{v} {k}" for k, v in r.digest.items())
        lines.append(f"  sha256      {r.sha256} ({said})")
    elif r.digest:
        lines.append(f"  sha256      {r.digest.get('sha256')}")
    if r.chunks:
        bad = len(r.chunks["differ"])
        lines.append(f"  chunks      {r.chunks['count']} of 64 MiB, "
                     f"{'all match' if not bad else f'{bad} differ'} the manifest")
    vi = r.vmcoreinfo
    if vi.get("present"):
        lines.append(f"  vmcoreinfo  present: OSRELEASE {vi.get('osrelease')}, KERNELOFFSET "
                     f"{vi.get('kerneloffset')}, phys_base {vi.get('phys_base')}")
    else:
        lines.append(f"  vmcoreinfo  absent{' (' + vi['why'] + ')' if vi.get('why') else ''}")
    if r.ranges:
        mem = r.ranges.get("memory_bytes")
        lines.append(f"  ranges      {r.ranges.get('count')}"
                     + (f", {human(mem)} of memory" if mem is not None else "")
                     + (f"; {r.ranges['manifest']} the manifest's" if "manifest" in r.ranges
                        else ""))
    if r.pages:
        pg = r.pages
        unread = pg["unreadable"] if pg["unreadable"] is not None else "unknown"
        lines.append(f"  pages       {pg['memory']}: {100 * (pg['zero_share'] or 0):.1f}% zero, "
                     f"{unread} unreadable (from the manifest)")
    if r.smear.get("overlap_pages"):
        sm = r.smear
        lines.append(f"  smear       {sm['pages']} of the {sm['overlap_pages']} pages the text "
                     f"load repeats from RAM differ (a live kernel read twice; RAM's copy is "
                     f"the memory)" + (f", first at {', '.join(sm['first'][:4])}"
                                       if sm["first"] else ""))
    sym = r.symbols
    if sym.get("present"):
        btf = "BTF" if "sys/kernel/btf/vmlinux" in sym["files"] else "no BTF"
        lines.append(f"  symbols     {len(sym['files'])} files in {sym['where']} ({btf}), release "
                     f"{sym['release']}: {'match' if sym['match'] else 'DO NOT match'} the "
                     f"dump ({sym['symbols_checked']} VMCOREINFO symbols, KERNELOFFSET "
                     f"{sym['kerneloffset']})")
    elif sym:
        lines.append("  symbols     none kept (kcore symbols and vol need them: dump without "
                     "--no-symbols)")
    t = r.times
    if t.get("dump"):
        crit = t.get("critical")
        lines.append(f"  read times  the dump's reads spanned {t['dump']['seconds']:.3f} s"
                     + (f", the critical set's ({crit['pages']} pages) {crit['seconds']:.6f} s "
                        f"({100 * (t.get('critical_share') or 0):.3f}%)" if crit else ""))
    for name, c in r.consumers.items():
        lines.append(f"  {name:<11} {'ok' if c['ok'] else 'NO'}: {c['why']}")
    for w in r.warnings:
        lines.append(f"  warning     {w}")
    for p in r.problems:
        where = f"at {p['offset']}: " if p["offset"] else ""
        lines.append(f"  PROBLEM     {where}{p['what']}")
    lines.append("verdict: " + ("intact" if r.ok else "DAMAGED"))
    print("\n".join(lines))
