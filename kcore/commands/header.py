"""`kcore header`: write the first data_offset bytes /proc/kcore would give."""

from __future__ import annotations

import argparse
import os

from kcore.cli import add_system_args, subcommand
from kcore.commands.ranges import discover_header
from kcore.errors import OutputError
from kcore.output import stdout_fd, write_small


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
               help_text: str) -> argparse.ArgumentParser:
    """Register `kcore header` and its options."""
    p = subcommand(
        sub, name, help_text,
        description="Write the ELF header region (ELF header, program headers, notes, zero "
        "padding up to data_offset) exactly as /proc/kcore would give it. The NT_TASKSTRUCT "
        "note holds zeros unless the source is a real kcore.",
        epilog="example: kcore header --root fixture/root --source elf:vmcore.elf -o head.bin",
    )
    add_system_args(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="output file (created 0600), or - for standard output")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    """Discover the system and write its kcore header."""
    if args.output != "-" and not args.force and os.path.lexists(args.output):
        raise OutputError(f"{args.output}: exists; use --force to replace it")
    header = discover_header(args)
    if args.output == "-":
        fd = stdout_fd()
        view = memoryview(header.data)
        while view:
            view = view[os.write(fd, view):]
    else:
        write_small(args.output, header.data, args.force)
    return 0
