"""`kcore ranges`: print the kclist, the PT_LOADs /proc/kcore would show."""

from __future__ import annotations

import argparse
import json
import sys

from kcore.cli import add_system_args, subcommand
from kcore.discover import discover
from kcore.elfcore import KcoreHeader, build_header, phdr_paddr


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    """Register the subcommand."""
    p = subcommand(
        sub, name, help_text, description=help_text + ".",
        epilog="Addresses are printed in hex; --json gives them as \"0x...\" strings "
        "(64-bit values do not survive JSON numbers in most parsers).\n\n"
        "example: kcore ranges --root /mnt/snapshot --source raw:/var/lib/vm/ram.bin --json",
    )
    add_system_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def discover_header(args: argparse.Namespace) -> KcoreHeader:
    """Discover the system --root/--source/--layout name and build its kcore header."""
    system = discover(args.root, args.source, layout=args.layout)
    try:
        return build_header(system, args.layout)
    finally:
        system.close()


def run(args: argparse.Namespace) -> int:
    """Discover the system and print its kclist."""
    header = discover_header(args)
    rows = [
        {
            "type": e.type.name, "kind": e.kind, "vaddr": f"{e.vaddr:#x}",
            "paddr": f"{phdr_paddr(e, args.layout):#x}", "size": f"{e.size:#x}",
            "offset": f"{off:#x}",
        }
        for e, off in header.loads
    ]
    if args.json:
        json.dump({"layout": args.layout, "data_offset": f"{header.data_offset:#x}",
                   "file_size": f"{header.file_size:#x}", "ranges": rows}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"{'kind':<30} {'vaddr':>18} {'paddr':>18} {'size':>15} {'offset':>16}")
    for r in rows:
        print(f"{r['kind']:<30} {r['vaddr']:>18} {r['paddr']:>18} {r['size']:>15} "
              f"{r['offset']:>16}")
    print(f"data_offset {header.data_offset:#x}, file size {header.file_size:#x}")
    return 0
