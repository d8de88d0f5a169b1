"""`kcore dump`: write kernel memory to a file (or stdout) in a format analysis tools open."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from kcore import __version__, destinations, engine
from kcore.cli import add_system_args, int_arg, subcommand
from kcore.codecs import CODECS
from kcore.codecs import DEFAULT as DEFAULT_CODEC
from kcore.codecs import get as get_codec
from kcore.engine import MAX_THREADS, default_threads
from kcore.errors import InputError, SourceError
from kcore.formats import FORMATS, Format, Run, names
from kcore.formats.plan import DEFAULT_GRANULE, SCAN_CHUNK, Plan, Request
from kcore.output import Output, human

DESCRIPTION_TEMPLATE = """\
Dump kernel memory in a format analysis tools open, at the speed of the hardware.

{formats}
sources (--source): auto (the live system: /proc/kcore, then /dev/crash, then /dev/mem),
  raw:PATH, padded:PATH, lime:PATH, elf:PATH (e.g. QEMU dump-guest-memory), kcore:PATH,
  kdump:PATH (makedumpfile's, plain or flattened), avml:PATH (both unpacked first into a
  temporary file under $KCORE_TMPDIR, $TMPDIR or /var/tmp), devmem:PATH,
  pid:PID:START-END@PHYS. --root DIR reads proc/ and sys/ files under DIR
  (a captured system) instead of /.

output: created 0600 under a temporary name and renamed into place when complete; an
  existing file needs --force; symlinks are refused; on ENOSPC, a strict read error or
  Ctrl-C the partial file is removed. Beside it: OUTPUT.sha256 (sha256sum -c) and
  OUTPUT.json (a manifest). -o - writes {streams} to stdout.
"""

DESCRIPTION = DESCRIPTION_TEMPLATE.format(streams=", ".join(names(lambda f: f.streamable)),
                                          formats="formats:\n" + "".join(
    f"  {f.name:<7} " + f.help.replace("\n", "\n" + " " * 10) + "\n" for f in FORMATS.values()))

EPILOG = """\
examples:
  sudo kcore dump -o mem.elf                         live system, compact ELF core
  sudo kcore dump mem.elf                            the same: OUTPUT without -o
  sudo kcore dump --format lime -o - | zstd > mem.lime.zst
  kcore dump --root capture/root --source elf:vmcore.elf --format lime -o mem.lime
  kcore dump --source devmem:/dev/crash -o mem.elf   when lockdown forbids /proc/kcore
  sudo kcore dump --format kdump -o mem.kdump          compressed (zstd): crash, drgn open it
  sudo kcore dump --format kdump --compress lzo -o - | ssh host 'makedumpfile -R mem.kdump'
  kcore dump --source kdump:mem.kdump --format elf -o mem.elf      any dump to any format
  drgn -c mem.elf; vol -f mem.lime banners.Banners; gdb -c mem.elf; crash vmlinux mem.kdump
  sudo kcore dump -d 31 -o small.elf                 kernel pages only, as makedumpfile -d 31
  sudo kcore dump --estimate -d 31                   what -d 31 leaves out, writing nothing
  sudo kcore dump --format lime -o tcp-listen:4444   then, elsewhere: nc HOST 4444 > mem.lime
  sudo kcore dump -o 'https://ACCOUNT.blob.core.windows.net/dumps/mem.elf?sv=...&sig=...'

""" + destinations.HELP + "\n"

def _level_help() -> str:
    """-d's help: makedumpfile's levels, and what excluded pages become in each format."""
    by: dict[str, list[str]] = {}
    for f in FORMATS.values():
        if f.dump_levels and f.excluded:
            by.setdefault(f.excluded, []).append(f.name)
    said = ", ".join(f"{what} {'in' if what != 'absent' else 'from'} "
                     f"{' and '.join([', '.join(n[:-1]), n[-1]] if len(n) > 1 else n)}"
                     for what, n in by.items())
    return ("leave out pages as makedumpfile -d N does (0-31, a sum of: 1 zero pages, 2 page "
            "cache without private data, 4 page cache with private data, 8 user data, 16 free "
            "pages); the kernel's own mem_map says which page is which. Every format but "
            f"{' and '.join(names(lambda f: not f.dump_levels))} (excluded pages: {said})")


LEVEL_HELP = _level_help()


def add_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register `kcore dump` and its options."""
    p = subcommand(sub, name, help_text, description=DESCRIPTION, epilog=EPILOG)
    add_system_args(p)
    p.add_argument("--format", choices=list(FORMATS), default="elf",
                   help="output format (default elf)")
    p.add_argument("-o", "--output", metavar="OUTPUT",
                   help=f"output file, - for stdout, or a destination: a URL, multipart:FILE, "
                        f"tcp://HOST:PORT, tcp-listen:PORT (below) (those: "
                        f"{', '.join(names(lambda f: f.streamable))}); default kcore-TIME.EXT")
    p.add_argument("output_arg", nargs="?", metavar="OUTPUT",
                   help="the output, as -o OUTPUT (as `avml OUTPUT` takes it)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary")
    p.add_argument("--json", action="store_true",
                   help="print a machine-readable summary on stdout")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first unreadable page (default: dump it as zeros, counted)")
    p.add_argument("--no-text", dest="text", action="store_false",
                   help="elf: leave the kernel text segment out")
    p.add_argument("--vmalloc", action="store_true",
                   help="elf: add the vmalloc area's mapped pages")
    p.add_argument("--modules", action="store_true", help="elf: add the module area's mapped pages")
    p.add_argument("--no-elide", dest="elide", action="store_false",
                   help="elf, lime: keep zero runs (a dense dump)")
    p.add_argument("--granule", type=int_arg, default=DEFAULT_GRANULE, metavar="BYTES",
                   help="elf, lime: smallest zero run left out (default 64 KiB; a power of 2)")
    p.add_argument("--recheck", action="store_true",
                   help="read every range again after the dump and count the pages that "
                        "changed meanwhile (the smear; in the summary and the manifest)")
    p.add_argument("--order", choices=("address", "critical"), default="address",
                   help="critical: read first the pages analysis follows (the kernel's globals "
                        "and page tables, tasks and their mm, VMAs, files and credentials, the "
                        "module list; found through the kernel's BTF), then the rest in address "
                        "order; elf, lime, raw, padded and kcore (default address)")
    p.add_argument("--times", action="store_true",
                   help="keep when each run of pages was read (ns from the dump's start) in "
                        "OUTPUT.times; the summary gives the window of the critical set and of "
                        "the whole dump")
    p.add_argument("--no-digest", dest="digest", action="store_false",
                   help="skip the SHA-256 (and OUTPUT.sha256)")
    p.add_argument("-d", "--dump-level", type=_level_arg, metavar="N", help=LEVEL_HELP)
    p.add_argument("--estimate", action="store_true",
                   help="write nothing: print the pages -d N (default 31) leaves out per class "
                        "and the output size it gives")
    p.add_argument("--compress", metavar="CODEC",
                   help=f"{', '.join(names(lambda f: f.compresses))}: the page codec, one of "
                        f"{', '.join(CODECS)} (default {DEFAULT_CODEC})")
    p.add_argument("--no-symbols", dest="symbols", action="store_false",
                   help="leave out the kernel's symbol files (BTF, kallsyms, modules, release), "
                        "kept by default: in the elf and kdump files, else in OUTPUT.symbols")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="threads for the zero-run scan and unhashed copies (default 0: one "
                        f"per CPU, at most {MAX_THREADS}; up to 16), and parts uploaded at "
                        f"once to object storage (default there: 4, or one per CPU if more); "
                        f"the output is the same")
    destinations.add_args(p)
    return p


def _level_arg(text: str) -> int:
    from kcore.pageclass import parse_level

    try:
        return parse_level(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _planned() -> str:
    """The formats whose bytes are memory's, in a plan (not compressed as read)."""
    planned = names(lambda f: not f.writes_itself)
    return ", ".join(planned[:-1]) + " or " + planned[-1]


def _check_args(args: argparse.Namespace, fmt: Format) -> None:
    if getattr(args, "output_arg", None) is not None:
        if args.output is not None and args.output != args.output_arg:
            raise InputError(f"two outputs given, -o {args.output} and {args.output_arg}: "
                             f"give one")
        args.output = args.output_arg
    remote = args.output is not None and destinations.is_remote(args.output)
    if (args.output == "-" or remote) and not fmt.streamable:
        where = "stdout" if args.output == "-" else "a remote destination"
        raise InputError(f"--format {fmt.name} cannot go to {where} (it needs seeking); "
                         f"use {' or '.join(names(lambda f: f.streamable))}, or -o FILE")
    if not remote and (args.resume or args.manifest_url):
        raise InputError("--resume and --manifest-url apply to a remote -o (URL, multipart:)")
    if args.output == "-" and args.recheck:
        raise InputError("--recheck reads the output back: give a file (-o FILE), not stdout")
    if args.output == "-" and args.json:
        raise InputError("--json prints to stdout, which the dump already uses; drop one")
    segment_formats = " or ".join(names(lambda f: f.segment_options))
    for opt in ("vmalloc", "modules"):
        if getattr(args, opt) and not fmt.segment_options:
            raise InputError(f"--{opt} applies to --format {segment_formats} only")
    if not args.text and not fmt.segment_options:
        raise InputError(f"--no-text applies to --format {segment_formats} only")
    g = args.granule
    if g < 4096 or g > SCAN_CHUNK or g & (g - 1):
        raise InputError(f"--granule {g} must be a power of two from 4096 to {SCAN_CHUNK}")
    if args.compress is not None and not fmt.compresses:
        raise InputError(f"--compress applies to --format "
                         f"{' or '.join(names(lambda f: f.compresses))} only")
    if fmt.compresses:
        get_codec(args.compress or DEFAULT_CODEC)  # unknown or unavailable: exit 2, say which
    if fmt.writes_itself and (args.order == "critical" or args.times):
        what = "--order critical" if args.order == "critical" else "--times"
        raise InputError(f"{what}: --format {fmt.name} compresses pages in address order as "
                         f"it reads them, which this option cannot reorder or time; use "
                         f"{_planned()} (then convert: --source elf:DUMP)")
    if args.times and args.output == "-":
        raise InputError("--times keeps its record beside the output (OUTPUT.times): give a "
                         "file (-o FILE), not stdout")
    if not 0 <= args.threads <= 16:
        raise InputError(f"--threads {args.threads} must be from 0 (one per CPU) to 16")


@contextlib.contextmanager
def _interrupts(landed: Callable[[], bool], standalone: bool) -> Iterator[None]:
    """Ctrl-C and SIGTERM interrupt the dump (the partial file is removed) until it has landed.

    A signal that arrives once the output and its sidecars are in place is ignored: the
    work is done, and the exit status says so. standalone (the kcore process itself): they
    stay ignored up to the exit.
    """
    def handler(signum: int, frame: Any) -> None:
        if not landed():
            raise KeyboardInterrupt

    held = (signal.SIGINT, signal.SIGTERM)
    try:
        old = {sig: signal.signal(sig, handler) for sig in held}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig in held:
            signal.signal(sig, signal.SIG_IGN if standalone and landed() else old[sig])


def _open_system(args: argparse.Namespace) -> Any:
    from kcore.discover import discover

    try:
        return discover(args.root, args.source, layout=args.layout)
    except SourceError as exc:
        if args.source != "auto":
            raise
        raise SourceError(f"{exc}; to dump a saved image instead: kcore dump --root DIR "
                          f"--source raw:FILE (see kcore dump --help)") from None


def _progress_bar(total: int | None, quiet: bool, desc: str) -> Any:
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                file=sys.stderr, dynamic_ncols=True, leave=False, mininterval=0.25)


def run(args: argparse.Namespace) -> int:
    """Dump memory; print a summary; return the exit status."""
    fmt = FORMATS[args.format]
    _check_args(args, fmt)
    path = args.output or time.strftime(f"kcore-%Y%m%d-%H%M%S.{fmt.extension}")
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    landed: list[bool] = []
    with _interrupts(lambda: bool(landed), getattr(args, "standalone", False)):
        system = _open_system(args)
        try:
            if args.estimate:
                return _estimate(args, system, fmt)
            return _dump(args, system, fmt, path, started, t0, landed)
        finally:
            system.close()


def _dump(args: argparse.Namespace, system: Any, fmt: Format, path: str, started: datetime,
          t0: float, landed: list[bool]) -> int:
    """Plan, write and land one dump of a discovered system."""
    source = system.source
    req = Request(system, source, text=args.text, vmalloc=args.vmalloc,
                  modules=args.modules, elide=args.elide and fmt.elides,
                  granule=args.granule, strict=args.strict, layout=args.layout,
                  threads=args.threads or default_threads(),
                  compress=args.compress or DEFAULT_CODEC)
    symbols = _symbols(args, system)
    req.symbols = symbols if fmt.notes else None
    want_digest = args.digest and fmt.digest
    # What the dump allocates (the output file, its threads) is allocated before -d classifies
    # a live kernel's pages: else their pages were free to the classification, left out, and
    # crash would find the task list pointing into them.
    remote = destinations.options(args) if destinations.is_remote(path) else None
    timeline = _timeline(args, system)
    with (destinations.open_output(path, remote, force=args.force, digest=want_digest) as out,
          engine.started_threads(req.threads)):
        filtered = _apply_level(args, req, fmt)
        first = _read_critical(args, system, req, timeline)
        if args.recheck and out.kind != "file":
            raise InputError(f"--recheck reads the output back: give a file, not {path}")
        if args.recheck and fmt.writes_itself:
            raise InputError(f"--recheck compares the output's bytes with memory: --format "
                             f"{fmt.name} compresses them (use {_planned()})")
        if fmt.needs_seek and not out.seekable:
            raise InputError(f"--format {fmt.name} needs a seekable file, not {path}")
        run = Run(lambda total, label: _progress_bar(total, args.quiet, label),
                  digest=want_digest, strict=args.strict, first=first, times=timeline,
                  resume=args.resume)
        plan, stats = fmt.dump(req, out, run)
        hashing = out.hasher
        bar = _progress_bar(plan.size, args.quiet, "sha256") if hashing is not None else None
        if bar is not None and hashing is not None:
            bar.update(hashing.done)
        try:
            out.finish(plan.size, bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t0
        if args.dump_level is not None and not fmt.dump_levels:
            plan.warnings.append(f"--dump-level does not apply to --format {fmt.name} (an "
                                 f"exact image keeps every page): ignored")
        smear = _recheck(args, out, req.source, plan, system) if args.recheck else None
        summary = _summary(args, out, system, plan, stats, seconds, started)
        if fmt.chunk_digests and out.kind == "file" and args.digest:
            from kcore.manifest import CHUNK
            from kcore.verify import sparse_chunk_digests

            # no whole-file digest of ~128 TiB, but one per 64 MiB chunk that holds data
            summary["manifest"]["chunks"] = {"size": CHUNK, "sparse": True,
                                             "sha256": sparse_chunk_digests(out.fd, plan.size)}
        if smear is not None:
            summary["manifest"]["recheck"] = smear
            summary["result"]["recheck"] = {k: smear[k] for k in ("pages", "changed", "share",
                                                                  "kernel_code") if k in smear}
        if filtered is not None:
            summary["result"]["dump_level"] = summary["manifest"]["dump_level"] = (
                _level_report(filtered, plan, fmt))
        if symbols is not None:
            if not fmt.notes and out.kind == "file":
                from kcore.formats.elf import machine_of
                from kcore.symbols import SIDECAR, sidecar

                out.extra_sidecars[SIDECAR] = sidecar(symbols, machine_of(system))
            elif not fmt.notes:
                plan.warnings.append(f"the kernel's symbols are not kept: --format "
                                     f"{fmt.name} keeps them in OUTPUT.symbols, and "
                                     f"{path} is not a file")
            kept = symbols.summary()
            kept["where"] = "notes" if fmt.notes else "sidecar"
            summary["manifest"]["symbols"] = kept
            summary["result"]["symbols"] = {"files": len(kept["files"]),
                                            "missing": kept["missing"], "where": kept["where"]}
        if timeline is not None:
            _time_report(args, summary, out, req.source, timeline, first)
        out.commit(plan.size, summary["manifest"] if out.kind in ("file", "remote") else None,
                   landed=lambda: landed.append(True))
    if isinstance(out, destinations.RemoteOutput):
        summary["result"]["uploaded"] = out.where
        summary["result"]["parts_resumed"] = out.resumed_parts
    summary["result"]["warnings"] = summary["result"]["warnings"] + out.notes
    if args.json:
        print(json.dumps(summary["result"], indent=2))
    elif not args.quiet:
        _print_human(summary["result"], plan)
    return 0


def _symbols(args: argparse.Namespace, system: Any) -> Any:
    """The kernel's symbol files to keep with the dump (kcore.symbols), or None."""
    if not args.symbols:
        return None
    from kcore.symbols import gather

    return gather(args.root, system)


def _timeline(args: argparse.Namespace, system: Any) -> Any:
    """The read-time record of --times and --order critical (None without either)."""
    if not args.times and args.order != "critical":
        return None
    from kcore.pagetimes import Timeline

    return Timeline(page_size=system.addrmap.page_size)


def _read_critical(args: argparse.Namespace, system: Any, req: Request, timeline: Any) -> Any:
    """--order critical: find the critical pages (through the whole source) and read those
    the dump holds now; None without the option."""
    if args.order != "critical":
        return None
    from kcore import critical

    cset = critical.find(system, system.source)
    return critical.read_first(req.source, cset, timeline)


def _time_report(args: argparse.Namespace, summary: dict[str, Any], out: Output, source: Any,
                 timeline: Any, first: Any) -> None:
    """The windows (and the critical set) in the summary and manifest; OUTPUT.times."""
    from kcore import pagetimes

    times = pagetimes.summary(timeline.records(source.extents))
    if args.times and out.kind == "file":
        out.extra_sidecars[pagetimes.SUFFIX] = timeline.to_bytes(source.extents)
        times["sidecar"] = out.path + pagetimes.SUFFIX
    summary["result"]["times"] = summary["manifest"]["times"] = times
    summary["result"]["order"] = summary["manifest"]["order"] = args.order
    if first is not None:
        cset = first.found
        crit = {"pages": first.pages, "kinds": cset.counts, "tasks": len(cset.tasks),
                "walk_seconds": round(cset.seconds, 3), "read_seconds": round(first.seconds, 6),
                "pages_unreadable": first.pages_unreadable, "realtime": first.realtime,
                "pages_not_in_output": first.pages_not_placed, "warnings": cset.warnings}
        summary["result"]["critical"] = summary["manifest"]["critical"] = crit


def _apply_level(args: argparse.Namespace, req: Request, fmt: Format) -> Any:
    """The one point where -d enters a plan: the request reads a view of its source that
    holds only the kept pages, so every format lays the rest out as it does holes (absent,
    zero-fill loads, split ranges). Zero pages go page by page with bit 1, or stay without it.
    """
    if args.dump_level is None or not fmt.dump_levels:
        return None
    from kcore import dumplevel

    filtered = dumplevel.apply(req.system, req.source, args.dump_level)
    req.source = filtered.source
    req.dump_level = args.dump_level
    req.elide = fmt.elides
    req.granule = req.system.addrmap.page_size if dumplevel.wants_zero_elision(
        args.dump_level) else 0
    return filtered


def _level_report(filtered: Any, plan: Plan, fmt: Format) -> dict[str, Any]:
    """Pages left out per class, for the summary and the manifest."""
    page = filtered.classes.page_size
    held = filtered.held_pages()
    if fmt.elides:
        kept = sum(r["size"] for r in plan.ranges if r.get("kind") == "ram") // page
        zero = max(0, held - kept)
    else:
        kept, zero = held, 0
    report: dict[str, Any] = filtered.report(zero, kept)
    return report


def _estimate(args: argparse.Namespace, system: Any, fmt: Format) -> int:
    """--estimate: classify and count, write nothing; the figures the dump would give."""
    from kcore import dumplevel

    if not fmt.dump_levels:
        raise InputError(f"--estimate: --format {fmt.name} keeps every page (an exact image)")
    level = 31 if args.dump_level is None else args.dump_level
    filtered = dumplevel.apply(system, system.source, level)
    zero = 0
    if fmt.elides and dumplevel.wants_zero_elision(level):
        zero = dumplevel.zero_pages(filtered, args.threads or default_threads())
    kept = filtered.held_pages() - zero
    page = filtered.classes.page_size
    report = filtered.report(zero, kept)
    kept_symbols = 0  # the symbol files the dump keeps in its notes (elf, kdump)
    symbols = _symbols(args, system) if fmt.notes else None
    if symbols is not None:
        from kcore.symbols import elf_notes

        kept_symbols = len(elf_notes(symbols))
    result: dict[str, Any] = {"format": fmt.name, "estimate": True,
              "bytes": kept * page + fmt.header_bytes(
                  len(filtered.source.extents), page) + kept_symbols,
              "dump_level": report,
              "levels": dumplevel.level_table(system, level, filtered)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    total = report["pages_in_ram"]
    lines = [f"kcore: -d {level} --format {fmt.name} would keep {kept} of {total} RAM pages "
             f"(~{human(result['bytes'])})"]
    for name, n in report["pages_excluded"].items():
        lines.append(f"  {name:<14} {n:>12} pages left out ({human(n * page)})")
    if report["pages_unreadable_mem_map"]:
        lines.append(f"  {report['pages_unreadable_mem_map']} pages kept: their struct page "
                     f"could not be read")
    lines.append("  pages each level keeps before zero pages go (bit 1 scans for those):")
    lines.append("    " + ", ".join(f"-d {k}: {v}" for k, v in result["levels"].items()))
    print("\n".join(lines))
    return 0


def _recheck(args: argparse.Namespace, out: Output, source: Any, plan: Plan,
             system: Any) -> dict[str, Any]:
    """Re-read the copied ranges and compare them with the output (--recheck)."""
    from kcore.recheck import recheck

    bar = _progress_bar(plan.copy_bytes, args.quiet, "recheck")
    try:
        return recheck(out.fd, source, plan, system.addrmap.page_size,
                       bar.update if bar is not None else None, _kernel_code(args, system))
    finally:
        if bar is not None:
            bar.close()


def _kernel_code(args: argparse.Namespace, system: Any) -> tuple[int, int] | None:
    """The kernel code's physical [_stext, _etext), from the root's kallsyms."""
    import os

    want = {"_stext": 0, "_etext": 0}
    try:
        with open(os.path.join(args.root, "proc/kallsyms"), encoding="ascii",
                  errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] in want:
                    want[parts[2]] = int(parts[0], 16)
                    if all(want.values()):
                        break
        lo, hi = (system.addrmap.pa_symbol(want["_stext"]),
                  system.addrmap.pa_symbol(want["_etext"]))
    except (OSError, ValueError, AttributeError):
        return None
    return (lo, hi) if all(want.values()) and lo < hi else None


def _summary(args: argparse.Namespace, out: Output, system: Any, plan: Plan, stats: Any,
             seconds: float, started: datetime) -> dict[str, Any]:
    page = system.addrmap.page_size
    scan = plan.scan_stats
    unreadable = (scan.pages_zero_filled if scan is not None else stats.pages_zero_filled)
    copied = plan.compression["input_bytes"] if plan.compression else plan.copy_bytes
    memory = copied + plan.elided
    result = {
        "output": out.path,
        "format": args.format,
        "bytes": plan.size,
        "bytes_copied": copied,
        "pages_read": stats.bytes_read // page,
        "pages_zero_filled": unreadable,
        "bytes_elided": plan.elided,
        "pages_sparse": getattr(stats, "pages_sparse", 0),
        "seconds": round(seconds, 3),
        "gb_per_s": round(memory / seconds / 1e9, 3) if seconds > 0 else None,
        "sha256": out.sha256,
        "warnings": plan.warnings,
    }
    if plan.compression:
        result["compression"] = plan.compression
    manifest = {
        "tool": f"kcore {__version__}",
        "output": out.path,
        "format": args.format,
        "source": getattr(system.source, "spec", str(args.source)),
        "root": args.root,
        "kernel_release": getattr(system, "osrelease", None),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "size": plan.size,
        "ranges": plan.ranges,
        "bytes_elided": plan.elided,
        "pages_zero_filled": unreadable,
        "first_unreadable": _first_error(stats, scan),
        "warnings": plan.warnings,
    }
    if plan.compression:
        manifest["compression"] = plan.compression
    from kcore.preflight import manifest_facts

    manifest.update(manifest_facts(args.root, str(args.source), system.source, system))
    return {"result": result, "manifest": manifest}


def _first_error(*stats: Any) -> str | None:
    for st in stats:
        if st is not None and st.first_error_offset is not None:
            return f"source offset {st.first_error_offset:#x} (errno {st.first_errno})"
    return None


def _print_human(r: dict[str, Any], plan: Plan) -> None:
    lines = [f"kcore: wrote {r['output']} ({r['format']}, {human(r['bytes'])}) "
             f"in {r['seconds']:.2f} s, {r['gb_per_s'] or 0:.2f} GB/s of memory"]
    if r["bytes_elided"]:
        lines.append(f"  zero elision saved {human(r['bytes_elided'])} "
                     f"({len(plan.ranges)} ranges)")
    c = r.get("compression")
    if c:
        lines.append(f"  {c['codec']}: {human(c['input_bytes'])} of memory in "
                     f"{human(c['output_bytes'])} ({c['ratio']}x smaller)")
    if r["pages_zero_filled"]:
        lines.append(f"  {r['pages_zero_filled']} unreadable pages dumped as zeros")
    t = r.get("times")
    if t and t.get("dump"):
        crit = t.get("critical")
        part = (f"; the critical set ({crit['pages']} pages) in {crit['seconds'] * 1e3:.3f} ms, "
                f"{100 * (t.get('critical_share') or 0):.3f}% of it") if crit else ""
        lines.append(f"  read times: the dump's reads spanned {t['dump']['seconds']:.3f} s{part}"
                     + (f" (per run in {t['sidecar']})" if t.get("sidecar") else ""))
    if r.get("recheck"):
        c = r["recheck"]
        lines.append(f"  recheck: {c['changed']} of {c['pages']} copied pages "
                     f"({100 * c['share']:.2f}%) changed while the dump ran (per range in "
                     f"the manifest)")
    if r["sha256"]:
        beside = r["uploaded"][1:] if "uploaded" in r else [r["output"] + ".sha256"]
        lines.append(f"  sha256 {r['sha256']}" + (f" (also in {', '.join(beside)})"
                                                  if beside else ""))
    level = r.get("dump_level")
    if level is not None:
        out = ", ".join(f"{k} {v}" for k, v in level["pages_excluded"].items() if v)
        lines.append(f"  dump level {level['level']}: {level['pages_kept']} pages kept; "
                     f"left out: {out or 'none'}")
    sym = r.get("symbols")
    if sym is not None:
        where = "in the file" if sym["where"] == "notes" else f"in {r['output']}.symbols"
        lines.append(f"  symbols: {sym['files']} files kept {where}"
                     + (f" (missing: {'; '.join(sym['missing'])})" if sym["missing"] else ""))
    for w in r["warnings"]:
        lines.append(f"  warning: {w}")
    print("\n".join(lines), file=sys.stderr)

