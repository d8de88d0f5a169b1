"""Dump formats: one module per format, each exporting a `Format` record, registered below.

The pieces every format shares live in modules with one job each:
  plan.py      Blob/Copy/Zeros items, the Plan (what a dump writes), the Request (what to dump)
  segments.py  Segment (memory to dump), RAM segments, where segment bytes sit in the source
  pages.py     virtual areas (vmalloc, modules) as segments, through the page tables
  zeroruns.py  zero-run elision: the engine's scan, runs coarsened to a limit
  write.py     writing a Plan to an Output (holes, or every byte in order to a stream)

Adding a format: write `kcore/formats/NAME.py` with a `plan(req) -> Plan` function and
`FORMAT = Format(name=..., extension=..., plan=plan, ...)`, then add `NAME.FORMAT` to the
tuple in `_registered()` below. `kcore dump --format` choices, the default file extension,
the stdout check, the option checks, --help's text, `kcore check`'s size estimates and how
the dump is written (`Format.dump`, the one entry point) all come from the record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kcore.formats.plan import Plan, Request
from kcore.formats.write import Run, two_pass

if TYPE_CHECKING:
    from kcore.output import Output

Progress = Callable[[int], None]
# one_pass(req, out, progress, sized) -> (plan, copy stats), or None where it cannot apply
OnePass = Callable[[Request, "Output", Progress | None, Progress | None], "tuple[Plan, Any] | None"]
# write(req, out, progress) -> (plan, copy stats): a format that writes itself (compressed
# formats, whose sizes are known only as they are written)
Writer = Callable[[Request, "Output", Progress | None], "tuple[Plan, Any]"]


def _no_plan(req: Request) -> Plan:
    raise AssertionError("this format writes itself (Format.write)")


def _no_headers(runs: int, page: int) -> int:
    return 0


@dataclass(frozen=True)
class Format:
    """One output format of `kcore dump`: how to plan it and what the CLI allows with it."""

    name: str  # --format NAME
    extension: str  # of the default output name, kcore-TIME.EXT
    plan: Callable[[Request], Plan] = _no_plan  # the items to write (after a zero-run scan)
    streamable: bool = False  # may go to stdout (-o -): its plan is contiguous
    elides: bool = False  # leaves zero runs out (--no-elide and --granule apply)
    segment_options: bool = False  # --no-text, --vmalloc and --modules apply
    sparse: bool = True  # a seekable output gets holes for Zeros (False: zeros written)
    digest: bool = True  # a SHA-256 of the output is made (False: too large to hash)
    needs_seek: bool = False  # refuses an output that cannot seek (even a named FIFO)
    one_pass: OnePass | None = None  # scan and copy at once, when no digest is made
    dump_levels: bool = True  # -d applies (False: an exact image, which keeps every page)
    help: str = ""  # its paragraph in `kcore dump --help` (lines of at most 82 characters)
    write: Writer | None = None  # writes itself instead of planning items (then no plan)
    compresses: bool = False  # --compress applies
    notes: bool = False  # carries kcore's symbol notes itself (others: an OUTPUT.symbols sidecar)
    # (ranges of the source, page size) -> room its headers take around the pages -d keeps
    header_bytes: Callable[[int, int], int] = _no_headers
    excluded: str = ""  # what -d's excluded pages become in it ("absent", "holes", "zeros")
    # a sparse image too large to hash: the manifest holds a SHA-256 per 64 MiB chunk of data
    chunk_digests: bool = False
    # (request) -> (bytes, granules read): the size its dump would take, from a sample of the
    # memory (kcore check); None: its plan's size is the estimate (an upper bound)
    estimate: Callable[[Request], tuple[int, int]] | None = None

    @property
    def writes_itself(self) -> bool:
        """It compresses pages in address order as it reads them (no plan, no reordering)."""
        return self.write is not None

    def dump(self, req: Request, out: Output, run: Run) -> tuple[Plan, Any]:
        """Write the dump of req to out: the one entry point. A format that writes itself
        does; else its one pass (scan and copy at once) where nothing needs the plan first
        (no digest in file order, no read-time record, no resumed upload); else the two
        passes (kcore.formats.write.two_pass)."""
        if self.write is not None:
            bar = run.bar(None, f"dump {self.name}")
            try:
                return self.write(req, out, bar.update if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
        if self.one_pass is not None and not run.digest and run.times is None \
                and not run.resume:
            bar = run.bar(None, f"dump {self.name}")

            def sized(total: int) -> None:
                if bar is not None:
                    bar.total = total
                    bar.refresh()

            try:
                done = self.one_pass(req, out, bar.update if bar is not None else None, sized)
            finally:
                if bar is not None:
                    bar.close()
            if done is not None:
                return done
        return two_pass(self.name, self.plan, self.sparse, req, out, run)


def _registered() -> dict[str, Format]:
    from kcore.formats import avml, elf, kcore, kdump, lime, raw

    return {f.name: f for f in (elf.FORMAT, kcore.FORMAT, lime.FORMAT, raw.RAW, raw.PADDED,
                                kdump.FORMAT, avml.FORMAT)}


FORMATS: dict[str, Format] = _registered()  # in --help order; elf is the default


__all__ = ["FORMATS", "Format", "Run", "names"]


def names(pick: Callable[[Format], bool] = lambda f: True) -> list[str]:
    """The names of the registered formats for which pick(format) holds."""
    return [f.name for f in FORMATS.values() if pick(f)]
