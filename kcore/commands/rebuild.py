"""`kcore rebuild`: turn makedumpfile's flattened format (kcore dump -o -) back into a dump file."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from kcore.cli import os_error_line, subcommand
from kcore.errors import InputError, OutputError
from kcore.formats.write import hash_file
from kcore.output import human, open_output
from kcore.wire import flattened


def add_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register `kcore rebuild`."""
    p = subcommand(
        sub, name, help_text,
        description="Write each record of a flattened dump (makedumpfile -F, kcore dump "
        "--format kdump -o -) at its offset: the result is the kdump-compressed file crash, "
        "drgn and makedumpfile open, as `makedumpfile -R OUT < IN` makes it. The output is "
        "created 0600 and lands only when complete.",
        epilog="examples:\n  kcore rebuild mem.flat mem.kdump\n"
               "  sudo kcore dump --format kdump -o - | ssh host kcore rebuild - mem.kdump")
    p.add_argument("input", metavar="IN", help="the flattened dump, or - for standard input")
    p.add_argument("output", metavar="OUT", help="the dump file to write")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary")
    return p


def run(args: argparse.Namespace) -> int:
    """Rebuild IN into OUT; exit 2 for a malformed stream."""
    if args.output == "-":
        raise InputError("OUT must be a file: the records land at offsets")
    if args.input == "-":
        fd, close = sys.stdin.fileno(), False
    else:
        try:
            fd, close = os.open(args.input, os.O_RDONLY | os.O_CLOEXEC), True
        except OSError as exc:
            raise InputError(f"{args.input}: cannot open: {exc.strerror}") from None
    try:
        with open_output(args.output, force=args.force, digest=True) as out:
            if not out.seekable:
                raise InputError(f"{args.output}: not a seekable file")
            def read(n: int) -> bytes:
                try:
                    return os.read(fd, n)
                except OSError as exc:
                    raise InputError(f"{args.input}: cannot read: {exc.strerror}") from None

            try:
                size = flattened.rebuild(read, out.fd)
            except flattened.FlatFormatError as exc:
                raise InputError(f"{args.input}: {exc}") from None
            except OSError as exc:
                exc.filename = None
                raise OutputError(f"{args.output}: cannot write the rebuilt dump: "
                                  f"{os_error_line(exc, 'rebuild').split(': ', 1)[1]}") from None
            out.start_digest()
            if out.hasher is not None:
                hash_file(out.hasher, out.fd, size)
            out.commit(size, {"tool": "kcore rebuild", "input": args.input, "size": size})
    finally:
        if close:
            os.close(fd)
    if not args.quiet:
        print(f"kcore: rebuilt {args.output} ({human(size)}) from {args.input}", file=sys.stderr)
    return 0
