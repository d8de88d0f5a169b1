"""`kcore read`: the bytes at /proc/kcore file offsets, from a system root and a memory source."""

from __future__ import annotations

import argparse
import os
import sys

from kcore.cli import add_system_args, int_arg, subcommand
from kcore.errors import InputError, OutputError
from kcore.output import open_output

CHUNK = 1 << 20  # bytes read and written per step


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
               help_text: str) -> argparse.ArgumentParser:
    """Register the subcommand."""
    p = subcommand(
        sub, name, help_text, description=help_text + ".",
        epilog="Offsets are kcore file offsets, as `kcore ranges` prints them (decimal or 0x "
        "hex); bytes past the end of the file are not written.\n\n"
        "example: kcore read --root /mnt/snap --source raw:ram.bin --offset 0x7fff81004000 "
        "--length 0x200000 -o text.bin",
    )
    add_system_args(p)
    p.add_argument("--offset", type=int_arg, required=True, metavar="N",
                   help="kcore file offset to start at")
    p.add_argument("--length", type=int_arg, required=True, metavar="N",
                   help="number of bytes to read")
    p.add_argument("-o", "--output", metavar="FILE", default="-",
                   help="write here (created with mode 0600; default: standard output)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    return p


def _write_all(fd: int, data: memoryview, path: str) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror}") from None
        data = data[n:]


def run(args: argparse.Namespace) -> int:
    """Open the rebuilt kcore and copy [offset, offset + length) to the output."""
    from kcore.kcorefile import open_kcore

    if args.offset < 0 or args.length < 0:
        raise InputError("--offset and --length must not be negative")
    # A file is written like a dump: 0600, unnamed or under a temporary name until complete,
    # never through a symlink, replaced only with --force.
    out = open_output(args.output, force=args.force, digest=False, sidecars=False,
                      tty_ok=True)
    name = "standard output" if args.output == "-" else args.output
    kf = open_kcore(args.root, args.source, args.layout)
    try:
        with out:
            buf = memoryview(bytearray(min(CHUNK, max(args.length, 1))))
            pos, end = args.offset, args.offset + args.length
            while pos < end:
                n = kf.preadinto(buf[:min(len(buf), end - pos)], pos)
                if n == 0:
                    break
                _write_all(out.fd, buf[:n], name)
                pos += n
            out.commit(pos - args.offset)
    finally:
        kf.close()
    if pos < end:
        print(f"kcore: note: the file ends at {kf.size():#x}; wrote {pos - args.offset:#x} bytes",
              file=sys.stderr)
    return 0
