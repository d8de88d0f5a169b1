"""`kcore drgn`: drgn's shell (or a script) on a kernel whose memory is read through kcore."""

from __future__ import annotations

import argparse
import logging
import os
import pkgutil
import runpy
import sys
import traceback

from kcore.cli import add_system_args, subcommand
from kcore.errors import InputError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
               help_text: str) -> argparse.ArgumentParser:
    """Register the subcommand."""
    p = subcommand(
        sub, name, help_text, description=help_text + ". Memory is read through kcore from "
        "--source (no dump is written); --root describes the kernel. The Program is live "
        "for /proc/kcore, /dev/mem and pid: sources.",
        epilog="examples:\n"
        "  sudo kcore drgn                                   # this machine, like drgn -k\n"
        "  kcore drgn --root snap/root --source raw:ram.bin -s vmlinux-6.1.0-56-amd64\n"
        "  kcore drgn --root guest/root --source pid:4242:7f0000000000-7f0020000000@0 "
        "-- script.py ARG\n"
        "  kcore drgn --root snap/root --source mem.lime -- -e 'print(prog[\"jiffies\"])'\n"
        "  kcore drgn mem.elf -- -e 'print(prog.symbol(\"init_task\"))'  # a dump kcore wrote\n\n"
        "DUMP (an ELF core or kdump file, told by its first bytes) is opened by drgn itself, "
        "with the kallsyms kcore kept in it as a symbol finder: symbols and memory without "
        "debug info; types still need it (-s). "
        "After --: drgn's own [-e CODE] [SCRIPT [ARG...]]; without them, drgn's interactive "
        "shell (or the code on standard input when it is not a terminal). drgn is an "
        "optional extra: pip install 'kcore[drgn]'.",
    )
    add_system_args(p, layout=False)
    p.add_argument("-s", "--symbols", action="append", default=[], metavar="PATH",
                   help="a vmlinux or module file with debug info to load (repeatable)")
    p.add_argument("--no-default-symbols", action="store_true",
                   help="only load the --symbols files, not drgn's usual places")
    p.add_argument("-q", "--quiet", action="store_true", help="no banner, no warnings")
    p.add_argument("drgn_args", nargs=argparse.REMAINDER,
                   metavar="[DUMP] -- [-e CODE] [SCRIPT ARG...]",
                   help="a dump kcore wrote (elf or kdump; else --root/--source give the "
                        "kernel), then what drgn runs: -e CODE, or a script and its arguments")
    return p


def _split(words: list[str]) -> tuple[str | None, list[str]]:
    """drgn's [-e CODE] [SCRIPT [ARG...]] after `--`: (code or None, script and args)."""
    if words and words[0] == "--":
        words = words[1:]
    if words and words[0] == "-e":
        if len(words) < 2:
            raise InputError("drgn -e needs the code to run")
        return words[1], words[2:]
    if words and words[0].startswith("-"):
        raise InputError(f"unknown drgn option {words[0]!r} after --: use -e CODE or a script")
    return None, words


def _dump_arg(words: list[str]) -> tuple[str | None, list[str]]:
    """A dump file given first (ELF or kdump, by its magic), and the words after it."""
    if not words or words[0] in ("--", "-e"):
        return None, words
    try:
        with open(words[0], "rb") as f:
            head = f.read(8)
    except OSError:
        return None, words
    if head.startswith(b"\x7fELF") or head == b"KDUMP   ":
        return words[0], words[1:]
    return None, words


def run(args: argparse.Namespace) -> int:
    """Build the Program through kcore, then hand it to drgn's shell, a script or -e code."""
    from kcore.integrations.drgn import _import_drgn, dump_program, program

    dump, words = _dump_arg(list(args.drgn_args))
    code, script = _split(words)
    _import_drgn()  # drgn installed, or an error that says how to install it
    import drgn
    import drgn.cli

    ours = logging.getLogger("kcore.drgn")
    ours.propagate = False
    if args.quiet:
        for name in ("drgn", "kcore.drgn"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("kcore: warning: %(message)s"))
        ours.addHandler(handler)
    if dump is not None:
        prog = dump_program(dump, symbols=args.symbols,
                            default_symbols=bool(args.symbols) and not args.no_default_symbols)
    else:
        prog = program(args.root, args.source, symbols=args.symbols,
                       default_symbols=not args.no_default_symbols)
    if code is None and not script and sys.stdin.isatty():
        drgn.cli.run_interactive(prog)
        return 0
    drgn.set_default_prog(prog)
    try:
        _run_code(prog, code, script)
    except Exception:  # the user's code failed: its traceback, as drgn shows it
        traceback.print_exc()
        return 1
    return 0


def _run_code(prog: object, code: str | None, script: list[str]) -> None:
    """Run a drgn script, -e code, or the code on standard input, with `prog` in scope."""
    import drgn.cli

    if script:
        sys.argv = script
        if pkgutil.get_importer(script[0]) is None:
            sys.path.insert(0, os.path.dirname(os.path.abspath(script[0])))
        runpy.run_path(script[0], init_globals={"prog": prog}, run_name="__main__")
        return
    sys.path.insert(0, "")
    env = drgn.cli.default_globals(prog)
    if code is None:
        sys.argv = [""]
        env["__file__"] = "<stdin>"
        exec(compile(sys.stdin.read(), "<stdin>", "exec"), env)
    else:
        sys.argv = ["-e"]
        exec(code, env)
