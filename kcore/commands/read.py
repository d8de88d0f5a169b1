"""`kcore read`: the bytes at /proc/kcore file offsets, from a system root and a memory source."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from kcore.cli import add_system_args, int_arg
from kcore.errors import InputError, OutputError

CHUNK = 1 << 20  # bytes read and written per step


def add_parser(sub: argparse._SubParsersAction, name: str,
               help_text: str) -> argparse.ArgumentParser:
    """Register the subcommand."""
    p = sub.add_parser(
        name, help=help_text, description=help_text + ".",
        epilog="Offsets are kcore file offsets, as `kcore ranges` prints them (decimal or 0x "
        "hex); bytes past the end of the file are not written.\n\n"
        "example: kcore read --root /mnt/snap --source raw:ram.bin --offset 0x7fff81004000 "
        "--length 0x200000 -o text.bin",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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


def open_output(path: str, force: bool) -> int:
    """Create the output file 0600 without following symlinks; refuse to overwrite unless forced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_TRUNC if force else os.O_EXCL
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        raise OutputError(f"{path}: exists (use --force to overwrite)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{path}: is a symbolic link (refusing to follow it)") from None
        raise OutputError(f"{path}: cannot create: {exc.strerror}") from None


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
    kf = open_kcore(args.root, args.source, args.flavour)
    try:
        if args.output == "-":
            sys.stdout.flush()
            out, name = sys.stdout.fileno(), "standard output"
        else:
            out, name = open_output(args.output, args.force), args.output
        try:
            buf = memoryview(bytearray(min(CHUNK, max(args.length, 1))))
            pos, end = args.offset, args.offset + args.length
            while pos < end:
                n = kf.preadinto(buf[:min(len(buf), end - pos)], pos)
                if n == 0:
                    break
                _write_all(out, buf[:n], name)
                pos += n
        finally:
            if args.output != "-":
                os.close(out)
    finally:
        kf.close()
    if pos < end:
        print(f"kcore: note: the file ends at {kf.size():#x}; wrote {pos - args.offset:#x} bytes",
              file=sys.stderr)
    return 0
