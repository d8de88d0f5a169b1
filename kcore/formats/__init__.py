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
the stdout check and the option checks all come from the record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kcore.formats.plan import Plan, Request

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


def _registered() -> dict[str, Format]:
    from kcore.formats import avml, elf, kcore, kdump, lime, raw

    return {f.name: f for f in (elf.FORMAT, kcore.FORMAT, lime.FORMAT, raw.RAW, raw.PADDED,
                                kdump.FORMAT, avml.FORMAT)}


FORMATS: dict[str, Format] = _registered()  # in --help order; elf is the default


def names(pick: Callable[[Format], bool] = lambda f: True) -> list[str]:
    """The names of the registered formats for which pick(format) holds."""
    return [f.name for f in FORMATS.values() if pick(f)]
