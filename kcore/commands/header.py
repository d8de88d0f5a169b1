"""`kcore header`: write the first data_offset bytes /proc/kcore would give."""

from __future__ import annotations

import argparse
import os
import sys

from kcore.cli import add_system_args
from kcore.discover import discover
from kcore.elfcore import build_header
from kcore.errors import OutputError


def add_parser(
    sub: argparse._SubParsersAction, name: str, help_text: str
) -> argparse.ArgumentParser:
    """Register the subcommand."""
    p = sub.add_parser(
        name, help=help_text,
        description="Write the ELF header region (ELF header, program headers, notes, zero "
        "padding up to data_offset) exactly as /proc/kcore would give it. The NT_TASKSTRUCT "
        "note holds zeros unless the source is a real kcore.",
        epilog="example: kcore header --root fixture/root --source elf:vmcore.elf -o head.bin",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_system_args(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="output file (created 0600), or - for standard output")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    return p


def write_new_file(path: str, data: bytes, force: bool) -> None:
    """Write a small file created 0600, never through a symlink, replacing only with force."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    if force:
        try:
            if os.path.islink(path):
                os.unlink(path)
        except OSError as exc:
            raise OutputError(f"{path}: {exc.strerror}") from None
        flags |= os.O_TRUNC
    else:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise OutputError(f"{path}: exists; use --force to replace it") from None
    except OSError as exc:
        raise OutputError(f"{path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise OutputError(f"{path}: {exc.strerror}") from None
    os.close(fd)


def run(args: argparse.Namespace) -> int:
    """Discover the system and write its kcore header."""
    system = discover(args.root, args.source, flavour=args.layout)
    try:
        header = build_header(system, args.layout)
    finally:
        system.close()
    if args.output == "-":
        sys.stdout.buffer.write(header.data)
        sys.stdout.buffer.flush()
    else:
        write_new_file(args.output, header.data, args.force)
    return 0
