"""`kcore dump`: write kernel memory to a file (or stdout) in a format analysis tools open."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from kcore import __version__
from kcore.cli import add_system_args, int_arg
from kcore.engine import MAX_THREADS, default_threads
from kcore.errors import InputError, SourceError
from kcore.formats import (
    DEFAULT_GRANULE,
    FORMATS,
    SCAN_CHUNK,
    STREAMABLE,
    Layout,
    Request,
    write_layout,
)
from kcore.output import Output, human, open_output

# With the digest on, the one pass writes the header last, so the SHA-256 (in file order)
# cannot start before the copy ends; the two passes let it trail the copy instead.
PACK_WITH_DIGEST = False
# The SHA-256 hashes the writer's own buffers in a thread (no read-back of the output).
INLINE_DIGEST = True

EXTENSIONS = {"elf": "elf", "kcore": "kcore", "lime": "lime", "raw": "raw", "padded": "img"}

DESCRIPTION = """\
Dump kernel memory in a format analysis tools open, at the speed of the hardware.

formats:
  elf     (default) a compact ELF core: PT_NOTE (NT_PRSTATUS, NT_PRPSINFO, NT_TASKSTRUCT,
          VMCOREINFO) then packed PT_LOADs for RAM and kernel text with real p_vaddr and
          p_paddr, in kdump's style. Opens in drgn, crash, gdb, makedumpfile and
          Volatility 3. Zero runs are left out of the file; PT_LOADs without file bytes
          (p_filesz 0) stand for them and read as zeros. --vmalloc/--modules add those
          areas' mapped pages (System RAM only), --no-text leaves the kernel text out.
  kcore   the exact /proc/kcore image as a sparse file of the real size (~128 TiB apparent
          on x86-64; needs tmpfs, xfs or btrfs: ext4 stops at 16 TiB). No digest.
  lime    LiME (Volatility's LimeLayer, LiME's lime format): per RAM range a 32-byte
          header then the bytes; zero runs left out.
  raw     a physical image, file offset = physical address; holes for gaps and zero pages
          (read it back with --source raw:PATH).
  padded  the same layout with zeros written densely (LiME's padded format).

sources (--source): auto (the live system: /proc/kcore, then /dev/crash, then /dev/mem),
  raw:PATH, padded:PATH, lime:PATH, elf:PATH (e.g. QEMU dump-guest-memory), kcore:PATH,
  devmem:PATH, pid:PID:START-END@PHYS. --root DIR reads proc/ and sys/ files under DIR
  (a captured system) instead of /.

output: created 0600 under a temporary name and renamed into place when complete; an
  existing file needs --force; symlinks are refused; on ENOSPC, a strict read error or
  Ctrl-C the partial file is removed. Beside it: OUTPUT.sha256 (sha256sum -c) and
  OUTPUT.json (a manifest). -o - writes elf or lime to stdout.
"""

EPILOG = """\
examples:
  sudo kcore dump -o mem.elf                         live system, compact ELF core
  sudo kcore dump --format lime -o - | zstd > mem.lime.zst
  kcore dump --root capture/root --source elf:vmcore.elf --format lime -o mem.lime
  kcore dump --source devmem:/dev/crash -o mem.elf   when lockdown forbids /proc/kcore
  drgn -c mem.elf; vol -f mem.lime banners.Banners; gdb -c mem.elf
"""


def add_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register `kcore dump` and its options."""
    p = sub.add_parser(name, help=help_text, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_system_args(p)
    p.add_argument("--format", choices=FORMATS, default="elf", help="output format (default elf)")
    p.add_argument("-o", "--output", metavar="OUTPUT",
                   help="output file, or - for stdout (elf, lime); default kcore-TIME.EXT")
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
    p.add_argument("--no-digest", dest="digest", action="store_false",
                   help="skip the SHA-256 (and OUTPUT.sha256)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="threads for the zero-run scan and unhashed copies (default 0: one "
                        f"per CPU, at most {MAX_THREADS}; up to 16); the output is the same")
    return p


def _check_args(args: argparse.Namespace) -> None:
    fmt = args.format
    if args.output == "-" and fmt not in STREAMABLE:
        raise InputError(f"--format {fmt} cannot go to stdout (it needs seeking); "
                         f"use elf or lime, or -o FILE")
    if args.output == "-" and args.json:
        raise InputError("--json prints to stdout, which the dump already uses; drop one")
    for opt in ("vmalloc", "modules"):
        if getattr(args, opt) and fmt != "elf":
            raise InputError(f"--{opt} applies to --format elf only")
    if not args.text and fmt != "elf":
        raise InputError("--no-text applies to --format elf only")
    g = args.granule
    if g < 4096 or g > SCAN_CHUNK or g & (g - 1):
        raise InputError(f"--granule {g} must be a power of two from 4096 to {SCAN_CHUNK}")
    if not 0 <= args.threads <= 16:
        raise InputError(f"--threads {args.threads} must be from 0 (one per CPU) to 16")


def plan(req: Request, fmt: str) -> Layout:
    """The layout of one dump in a format."""
    if fmt == "elf":
        from kcore.formats import elf
        return elf.plan(req)
    if fmt == "lime":
        from kcore.formats import lime
        return lime.plan(req)
    if fmt in ("raw", "padded"):
        from kcore.formats import raw
        return raw.plan(req, padded=fmt == "padded")
    from kcore.formats import kcore as kcore_format
    return kcore_format.plan(req)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while dumping, so the partial file is removed."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _open_system(args: argparse.Namespace) -> Any:
    from kcore.discover import discover

    try:
        return discover(args.root, args.source, flavour=args.layout)
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
    _check_args(args)
    fmt = args.format
    path = args.output or time.strftime(f"kcore-%Y%m%d-%H%M%S.{EXTENSIONS[fmt]}")
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    with _sigterm_interrupts():
        system = _open_system(args)
        try:
            return _dump(args, system, fmt, path, started, t0)
        finally:
            system.close()


def _dump(args: argparse.Namespace, system: Any, fmt: str, path: str, started: datetime,
          t0: float) -> int:
    """Plan, write and land one dump of a discovered system."""
    source = system.source
    req = Request(system, source, text=args.text, vmalloc=args.vmalloc,
                  modules=args.modules, elide=args.elide and fmt in STREAMABLE,
                  granule=args.granule, strict=args.strict, flavour=args.layout,
                  threads=args.threads or default_threads())
    want_digest = args.digest and fmt != "kcore"
    with open_output(path, force=args.force, digest=want_digest) as out:
        if fmt == "kcore" and not out.seekable:
            raise InputError(f"--format kcore needs a seekable file, not {path}")
        done = _write_one_pass(args, req, out, fmt, want_digest)
        if done is not None:
            layout, stats = done
        else:
            layout, stats = _write_two_pass(args, req, out, fmt)
        hashing = out.hasher
        bar = _progress_bar(layout.size, args.quiet or hashing is None, "sha256")
        if bar is not None:
            bar.update(hashing.done)
        try:
            out.finish(layout.size, bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t0
        summary = _summary(args, out, system, layout, stats, seconds, started)
        out.commit(layout.size, summary["manifest"] if out.kind == "file" else None)
    if args.json:
        print(json.dumps(summary["result"], indent=2))
    elif not args.quiet:
        _print_human(summary["result"], layout)
    return 0


def _write_one_pass(args: argparse.Namespace, req: Request, out: Output, fmt: str,
                    want_digest: bool) -> tuple[Layout, Any] | None:
    """The elf format's single pass (scan and copy at once); None where it does not apply."""
    if fmt != "elf" or (want_digest and not PACK_WITH_DIGEST):
        return None
    from kcore.formats import elf

    if not elf.can_pack(req, out):
        return None
    bar = _progress_bar(None, args.quiet, f"dump {fmt}")

    def sized(total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.refresh()

    try:
        done = elf.write_packed(req, out, bar.update if bar is not None else None, sized)
    finally:
        if bar is not None:
            bar.close()
    if done is not None:
        out.start_digest()  # the header is written last: the digest reads the file back after
        out.written(done[0].size)
    return done


def _write_two_pass(args: argparse.Namespace, req: Request, out: Output,
                    fmt: str) -> tuple[Layout, Any]:
    """Plan the layout (a zero-run scan first where elision applies), then write it."""
    bar = _progress_bar(None, args.quiet or not req.elide, "scan for zero runs")
    req.progress = bar.update if bar is not None else None
    try:
        layout = plan(req, fmt)
    finally:
        if bar is not None:
            bar.close()
    out.check_space(layout.space_needed, estimate=layout.estimate)
    out.start_digest(inline=INLINE_DIGEST and layout.contiguous)
    bar = _progress_bar(layout.copy_bytes, args.quiet, f"dump {fmt}")
    try:
        stats = write_layout(out, req.source, layout, sparse=fmt != "padded",
                             strict=args.strict, threads=req.threads,
                             progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    return layout, stats


def _summary(args: argparse.Namespace, out: Output, system: Any, layout: Layout, stats: Any,
             seconds: float, started: datetime) -> dict[str, Any]:
    page = system.layout.page_size
    scan = layout.scan_stats
    unreadable = (scan.pages_zero_filled if scan is not None else stats.pages_zero_filled)
    memory = layout.copy_bytes + layout.elided
    result = {
        "output": out.path,
        "format": args.format,
        "bytes": layout.size,
        "bytes_copied": layout.copy_bytes,
        "pages_read": stats.bytes_read // page,
        "pages_zero_filled": unreadable,
        "bytes_elided": layout.elided,
        "pages_sparse": getattr(stats, "pages_sparse", 0),
        "seconds": round(seconds, 3),
        "gb_per_s": round(memory / seconds / 1e9, 3) if seconds > 0 else None,
        "sha256": out.sha256,
        "warnings": layout.warnings,
    }
    manifest = {
        "tool": f"kcore {__version__}",
        "output": out.path,
        "format": args.format,
        "source": getattr(system.source, "spec", str(args.source)),
        "root": args.root,
        "kernel_release": getattr(system, "osrelease", None),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "size": layout.size,
        "ranges": layout.ranges,
        "bytes_elided": layout.elided,
        "pages_zero_filled": unreadable,
        "first_unreadable": _first_error(stats, scan),
        "warnings": layout.warnings,
    }
    return {"result": result, "manifest": manifest}


def _first_error(*stats: Any) -> str | None:
    for st in stats:
        if st is not None and st.first_error_offset is not None:
            return f"source offset {st.first_error_offset:#x} (errno {st.first_errno})"
    return None


def _print_human(r: dict[str, Any], layout: Layout) -> None:
    lines = [f"kcore: wrote {r['output']} ({r['format']}, {human(r['bytes'])}) "
             f"in {r['seconds']:.2f} s, {r['gb_per_s'] or 0:.2f} GB/s of memory"]
    if r["bytes_elided"]:
        lines.append(f"  zero elision saved {human(r['bytes_elided'])} "
                     f"({len(layout.ranges)} ranges)")
    if r["pages_zero_filled"]:
        lines.append(f"  {r['pages_zero_filled']} unreadable pages dumped as zeros")
    if r["sha256"]:
        lines.append(f"  sha256 {r['sha256']} (also in {r['output']}.sha256)")
    for w in r["warnings"]:
        lines.append(f"  warning: {w}")
    print("\n".join(lines), file=sys.stderr)

