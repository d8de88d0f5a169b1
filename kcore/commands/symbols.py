"""`kcore symbols`: a Volatility 3 ISF from the BTF and kallsyms a dump keeps (or this system's)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from kcore.cli import add_system_args, subcommand
from kcore.errors import InputError
from kcore.output import human, write_small


def add_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register `kcore symbols`."""
    p = subcommand(
        sub, name, help_text,
        description="Write a Volatility 3 symbol table (ISF) of the kernel a dump holds, "
        "from the files kcore kept with it at dump time (its BTF and kallsyms: in an elf or "
        "kdump file, else in DUMP.symbols): types with their field offsets, enums, and "
        "symbols at their link-time addresses (Volatility finds KASLR's shift). No debug "
        "package, no dwarf2json. Without DUMP, the system at --root (its memory from "
        "--source gives VMCOREINFO's KERNELOFFSET). Needs pakunoda: pip install "
        "'kcore[symbols]'.",
        epilog="examples:\n"
        "  kcore symbols mem.elf -o isf/ && vol -s isf -f mem.elf linux.pslist\n"
        "  sudo kcore symbols -o isf/                        this machine's kernel\n"
        "  kcore symbols mem.lime --files -o out/            also the kept files, as a root")
    p.add_argument("dump", nargs="?", metavar="DUMP",
                   help="a dump kcore wrote (without: the system at --root)")
    p.add_argument("-o", "--output-dir", required=True, metavar="DIR",
                   help="where the ISF (RELEASE-ID.json.gz) goes; made if missing")
    p.add_argument("--files", action="store_true",
                   help="also write the kept files (proc/kallsyms, sys/kernel/btf/...) under "
                        "DIR/root, a root for --root")
    p.add_argument("--force", action="store_true", help="replace files that exist")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary")
    add_system_args(p, layout=False)
    return p


def load(args: argparse.Namespace) -> tuple[Any, str]:
    """The symbol files of DUMP, or of the system at --root; and where they came from."""
    from kcore import symbols

    if args.dump is not None:
        found = symbols.read_dump(args.dump)
        if found is None:
            raise InputError(f"{args.dump}: no symbol files kept in it or in "
                             f"{args.dump}{symbols.SIDECAR} (dumped with --no-symbols, by "
                             f"another tool, or by kcore before 0.x): give the system with "
                             f"--root instead")
        return found
    from kcore.discover import discover
    from kcore.errors import KcoreError

    try:
        system = discover(args.root, args.source)
    except KcoreError as exc:  # kallsyms and BTF still say enough on x86-64 (kcore.isf)
        if not args.quiet:
            print(f"kcore: warning: no VMCOREINFO ({exc}): KERNELOFFSET taken from "
                  f"kallsyms' _text", file=sys.stderr)
        return symbols.gather(args.root, None), args.root
    try:
        return symbols.gather(args.root, system), args.root
    finally:
        system.close()


def run(args: argparse.Namespace) -> int:
    """Build the ISF; write it (and with --files the kept files); print a summary."""
    from kcore import isf

    t0 = time.perf_counter()
    files, where = load(args)
    table = isf.build(files)
    data = isf.encode(table)
    out_dir = Path(args.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot make the folder: {exc.strerror}") from None
    target = out_dir / isf.file_name(files)
    write_small(str(target), data, args.force)
    written = [str(target)]
    if args.files:
        for rel, blob in sorted(files.files.items()):
            path = out_dir / "root" / rel
            os.makedirs(path.parent, exist_ok=True)
            write_small(str(path), blob, args.force)
            written.append(str(path))
    seconds = time.perf_counter() - t0
    warnings = []
    if "init_task" not in table.get("symbols", {}):
        warnings.append("kallsyms has no init_task (only text symbols: a kernel built without "
                        "CONFIG_KALLSYMS_ALL, as Debian 12's arm64 6.1): the ISF has types but "
                        "no data symbols, and Volatility's linux.pslist, linux.lsmod and most "
                        "plugins need them")
    result = {"isf": str(target), "bytes": len(data), "from": where,
              "release": isf.release_of(files), "user_types": len(table.get("user_types", {})),
              "enums": len(table.get("enums", {})), "symbols": len(table.get("symbols", {})),
              "kernel_offset": table["metadata"]["producer"]["kcore"]["kernel_offset"],
              "files": written[1:], "seconds": round(seconds, 3), "warnings": warnings}
    if not args.quiet and not args.json:
        for w in warnings:
            print(f"kcore: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    elif not args.quiet:
        print(f"kcore: wrote {target} ({human(len(data))}: {result['user_types']} types, "
              f"{result['enums']} enums, {result['symbols']} symbols of "
              f"{result['release']}, KERNELOFFSET {result['kernel_offset']}) from {where} in "
              f"{seconds:.1f} s\n  vol -s {out_dir} -f DUMP linux.pslist", file=sys.stderr)
    return 0
