"""What `kcore verify` finds in a dump file, and what each kind of source's check() fills in.

verify detects a file's kind through the source registry (kcore.sources.detect_kind) and calls
that kind's `check(fd, path, res, manifest)`: it walks the file's structure with the same
walker the source opens it with (kcore.wire), fills the Result (format, structure, ranges,
VMCOREINFO, which consumers open it) and returns the Regions of memory the file holds for
the data pass. A structure that stops making sense raises LayoutError (its offset and field).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kcore.errors import KcoreError
from kcore.sources.files import pread_full
from kcore.wire import LayoutError

PAGE = 4096
ZERO_PAGE = bytes(PAGE)


@dataclass
class Region:
    """Memory held in the file: filesz bytes at offset standing for memsz bytes of memory."""

    offset: int
    filesz: int
    memsz: int
    paddr: int
    kind: str = "ram"


@dataclass
class Result:
    """What `kcore verify` found."""

    path: str
    size: int
    format: str = "unknown"
    detail: str = ""
    problems: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    structure: str = ""
    sha256: str | None = None
    digest: dict[str, str] = field(default_factory=dict)
    chunks: dict[str, Any] = field(default_factory=dict)
    vmcoreinfo: dict[str, Any] = field(default_factory=dict)
    ranges: dict[str, Any] = field(default_factory=dict)
    pages: dict[str, Any] = field(default_factory=dict)
    # an ELF core's text load against the RAM loads holding the same frames: overlap_pages,
    # pages (differing: a live kernel read twice), first (their physical addresses)
    smear: dict[str, Any] = field(default_factory=dict)
    consumers: dict[str, dict[str, Any]] = field(default_factory=dict)
    symbols: dict[str, Any] = field(default_factory=dict)
    times: dict[str, Any] = field(default_factory=dict)  # read-time windows (--times, --order)
    # What the kind's check() says of the file for the checks all kinds share (not printed):
    # the (file offset, size) ranges a manifest lists for it (None: it lists none to compare)
    file_ranges: set[tuple[int, int]] | None = None
    whole_digest: bool = True  # a SHA-256 of the whole file is made (False: a sparse image)
    elided_in_manifest: bool = False  # zero runs left out are counted by the manifest only

    @property
    def ok(self) -> bool:
        """No problem was found."""
        return not self.problems

    def problem(self, where: int | None, what: str) -> None:
        """Record a problem at a file offset (None: the whole file)."""
        self.problems.append({"offset": None if where is None else hex(where), "what": what})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        d = {k: v for k, v in self.__dict__.items() if k not in _UNPRINTED}
        d["ok"] = self.ok
        return d


_UNPRINTED = ("file_ranges", "whole_digest", "elided_in_manifest")


def need(fd: int, offset: int, length: int, size: int, what: str) -> bytes:
    """Exactly length bytes at offset, or a LayoutError naming what was cut off."""
    if offset < 0 or length < 0 or offset + length > size:
        raise LayoutError(offset, what, "truncated", f"truncated {what}: needs {length:#x} "
                          f"bytes at {offset:#x}, the file ends at {size:#x}")
    data = pread_full(fd, length, offset)
    if len(data) != length:
        raise LayoutError(offset, what, "short read", f"short read of {what}")
    return data


def layout_error(exc: KcoreError, path: str) -> LayoutError:
    """A source's error about the file at path as a LayoutError (its offset and field kept,
    the path left out of the message: verify names the file once)."""
    return LayoutError(getattr(exc, "offset", None), getattr(exc, "field", None) or "structure",
                       str(exc), str(exc).removeprefix(f"{path}: "))


def note_vmcoreinfo(res: Result, data: bytes | None) -> None:
    """What the file's VMCOREINFO says (release, KERNELOFFSET, phys_base), or that it has none."""
    from kcore.vmcoreinfo import VmcoreInfo

    if data is None:
        res.vmcoreinfo = {"present": False}
        return
    try:
        info = VmcoreInfo.parse(data)
    except KcoreError as exc:
        res.vmcoreinfo = {"present": True, "valid": False}
        res.problem(None, f"the VMCOREINFO note is not VMCOREINFO text ({exc})")
        return
    res.vmcoreinfo = {
        "present": True, "valid": True, "osrelease": info.osrelease,
        "kerneloffset": info.get("KERNELOFFSET"),
        "phys_base": info.get("NUMBER(phys_base)"),
    }


def no_notes(res: Result, volatility: str, drgn: str, crash: str,
             volatility_ok: bool = True) -> None:
    """A format without notes: no VMCOREINFO, and what each consumer makes of it."""
    res.vmcoreinfo = {"present": False, "why": "the format has no notes"}
    res.consumers["volatility"] = {"ok": volatility_ok, "why": volatility}
    res.consumers["drgn"] = {"ok": False, "why": drgn}
    res.consumers["crash"] = {"ok": False, "why": crash}
