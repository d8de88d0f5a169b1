"""The `kcore` command line: argument parsing, shared options and error reporting."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from kcore.errors import KcoreError

# name -> one-line help; each lives in kcore/commands/<name>.py with add_parser() and run().
COMMANDS: dict[str, str] = {
    "ranges": "print the kclist: the memory ranges /proc/kcore would show",
    "header": "write the ELF header /proc/kcore would start with",
    "read": "read bytes at /proc/kcore file offsets",
    "dump": "dump kernel memory to a file (elf, kcore, lime, raw, padded, kdump, avml)",
    "rebuild": "turn a flattened dump (kcore dump --format kdump -o -) into the dump file",
    "bench": "compare kcore's read speed with the real /proc/kcore",
    "check": "say whether a dump would work here, how big it would be, and the command",
    "verify": "check a dump file: structure, digests, ranges, what drgn/crash/Volatility need",
    "drgn": "run drgn's shell (or a script) on the kernel, its memory read through kcore",
    "symbols": "write a Volatility 3 ISF from the BTF and kallsyms a dump keeps",
    "smear": "how far apart in time a dump read the pages a Volatility plugin used",
}

SOURCE_HELP = (
    "where kernel memory is read: raw:PATH, padded:PATH, lime:PATH, elf:PATH, kcore:PATH, "
    "kdump:PATH, avml:PATH, devmem:PATH, pid:PID:START-END@PHYS, a bare PATH (format detected "
    "from its contents), "
    "or auto (the live system: /proc/kcore, then /dev/crash, then /dev/mem; default)"
)


def int_arg(text: str) -> int:
    """Parse a decimal or 0x-prefixed hex integer for argparse."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (decimal or 0x hex)") from None


def subcommand(sub: Any, name: str, help_text: str, description: str,
               epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand's parser, its description and epilog printed as written."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def add_system_args(parser: argparse.ArgumentParser, *, layout: bool = True) -> None:
    """Add --root, --source and (optionally) --layout, shared by every subcommand."""
    parser.add_argument(
        "--root", default="/", metavar="DIR",
        help="system root where proc/ and sys/ files are read (default: /)",
    )
    parser.add_argument("--source", default="auto", metavar="SPEC", help=SOURCE_HELP)
    if layout:
        parser.add_argument(
            "--layout", dest="layout", choices=("modern", "2.6"), default="modern",
            help="header layout: modern (Linux >= 4.19, default) or 2.6 (the seed's)",
        )


class _Version(argparse.Action):
    """--version: the lines of bundle.version_text as they are (argparse's would rewrap them)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from kcore.bundle import version_text

        print(version_text())
        parser.exit()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser with one subparser per available command.

    With only, the other commands get a bare entry (for the help's list) and their modules
    are not imported: start-up pays for the command that runs.
    """
    parser = argparse.ArgumentParser(
        prog="kcore",
        description="The Linux kernel's /proc/kcore rebuilt in userspace, "
        "and fast full-memory dumps that drgn, crash, gdb and Volatility open.",
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the version (and the one file's commit and libraries)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        try:
            module = importlib.import_module(f"kcore.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kcore.commands.{name}":
                raise
            continue
        p = module.add_parser(sub, name, help_text)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the kcore command line; return the process exit status."""
    from kcore.output import guard_std_streams

    guard_std_streams()
    if argv is None:
        from kcore import bundle

        wrong = bundle.machine_mismatch(bundle.record(), bundle.kernel_machine())
        if wrong:
            print(f"kcore: error: {wrong}", file=sys.stderr)
            return 2
    words = sys.argv[1:] if argv is None else list(argv)
    chosen = next((w for w in words if not w.startswith("-")), "")
    parser = build_parser(chosen if chosen in COMMANDS else "")
    args = parser.parse_args(words)
    args.standalone = argv is None  # the kcore process itself, not a call from Python
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except KcoreError as exc:
        print(f"kcore: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kcore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `kcore dump - | head`): not our error to report.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        print(f"kcore: error: {os_error_line(exc, args.command)}", file=sys.stderr)
        return 1


# What to do about an OS error that reached the top without a file named by kcore.
OS_ERROR_ADVICE = {
    errno.EFBIG: "the file is larger than its filesystem or `ulimit -f` allows: write "
                 "elsewhere (not FAT's 4 GiB), or raise the limit",
    errno.ENOSPC: "the filesystem is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free space or write elsewhere",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
    errno.ENOMEM: "out of memory: close other programs or use fewer --threads",
}


def os_error_line(exc: OSError, command: str | None) -> str:
    """One line for an OSError: the file (or the command), the problem and what to do."""
    what = exc.strerror or type(exc).__name__
    where = os.fsdecode(exc.filename) if exc.filename else f"kcore {command or ''}".strip()
    advice = OS_ERROR_ADVICE.get(exc.errno or 0)
    line = f"{where}: {what}" + (f" ({advice})" if advice else "")
    return " ".join(line.split())
