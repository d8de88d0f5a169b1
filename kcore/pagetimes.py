"""`kcore dump --times`: when each run of pages was read, kept beside the dump (OUTPUT.times).

The record Pagani, Fedorov and Balzarotti's modified LiME wrote (ACM TOPS 2019), one entry a
run of pages read in one call rather than one a page: {u64 paddr, u32 pages, u32 flags,
u64 start, u64 end}, little-endian, times in ns from the dump's start (CLOCK_MONOTONIC),
after a 32-byte header {8s magic "KCTIMES1", u32 version 1, u32 page size, u64 count, u64 the
dump's start as CLOCK_REALTIME ns}. Flag 1: the run was read first (--order critical). A run
read again later (a critical page copied in address order too) keeps its first entry: the
dump holds what was read first.
"""

from __future__ import annotations

import bisect
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kcore.errors import InputError

MAGIC = b"KCTIMES1"
HEADER = struct.Struct("<8sIIQQ")
RECORD = struct.Struct("<QIIQQ")
CRITICAL = 1
SUFFIX = ".times"


@dataclass
class Timeline:
    """Read times of a dump, in ns from its start; runs in source file offsets until saved."""

    start: int = field(default_factory=time.monotonic_ns)
    wall: int = field(default_factory=time.time_ns)
    page_size: int = 4096
    # (source offset, length, start, end, flags): appended by reading threads (list.append
    # holds the GIL: safe without a lock)
    raw: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def now(self) -> int:
        """ns since the dump's start."""
        return time.monotonic_ns() - self.start

    def add(self, offset: int, length: int, t0: int, t1: int, flags: int = 0) -> None:
        """Note a read of length bytes at a source offset between t0 and t1 (ns from start)."""
        self.raw.append((offset, length, t0, t1, flags))

    def records(self, extents: list[Any]) -> list[tuple[int, int, int, int, int]]:
        """The entries by physical address: (paddr, pages, flags, start, end), in read order."""
        offs = [e.offset for e in extents]
        page = self.page_size
        out = []
        for off, n, t0, t1, flags in sorted(self.raw, key=lambda r: (r[2], r[0])):
            i = max(bisect.bisect_right(offs, off) - 1, 0)
            end = off + n
            while i < len(extents) and off < end:
                e = extents[i]
                lo, hi = max(off, e.offset), min(end, e.offset + e.length)
                if lo < hi:
                    out.append((e.paddr + lo - e.offset, (hi - lo) // page, flags, t0, t1))
                i += 1
        return [r for r in out if r[1]]

    def to_bytes(self, extents: list[Any]) -> bytes:
        """The OUTPUT.times sidecar."""
        recs = self.records(extents)
        return HEADER.pack(MAGIC, 1, self.page_size, len(recs), self.wall) + b"".join(
            RECORD.pack(*r) for r in recs)


def summary(recs: list[tuple[int, int, int, int, int]]) -> dict[str, Any]:
    """The windows of the critical set and of the whole dump, for the summary and manifest."""
    def window(rs: list[tuple[int, int, int, int, int]]) -> dict[str, Any] | None:
        if not rs:
            return None
        lo, hi = min(r[3] for r in rs), max(r[4] for r in rs)
        return {"first_ns": lo, "last_ns": hi, "seconds": round((hi - lo) / 1e9, 6),
                "pages": sum(r[1] for r in rs)}

    out: dict[str, Any] = {"records": len(recs), "dump": window(recs)}
    crit = window([r for r in recs if r[2] & CRITICAL])
    if crit is not None:
        out["critical"] = crit
        whole = out["dump"]["last_ns"] - out["dump"]["first_ns"]
        out["critical_share"] = round((crit["last_ns"] - crit["first_ns"]) / whole, 6) \
            if whole else None
    return out


def windows_ok(times: dict[str, Any]) -> bool:
    """Whether a manifest's "times" holds windows as summary() writes them (it may be hostile)."""
    def window(w: Any) -> bool:
        return isinstance(w, dict) and all(
            isinstance(w.get(k), (int, float)) and not isinstance(w.get(k), bool)
            for k in ("first_ns", "last_ns", "seconds", "pages"))

    share = times.get("critical_share")
    return (window(times.get("dump")) and ("critical" not in times or window(times["critical"]))
            and (share is None or isinstance(share, (int, float))))


class PageTimes:
    """A parsed OUTPUT.times: when the page at a physical address was read."""

    def __init__(self, data: bytes, where: str) -> None:
        if len(data) < HEADER.size:
            raise InputError(f"{where}: too short for a times header ({len(data)} bytes)")
        magic, version, page, count, wall = HEADER.unpack_from(data)
        if magic != MAGIC or version != 1:
            raise InputError(f"{where}: not a kcore times file (magic {magic!r}, version "
                             f"{version})")
        if page < 512 or page & (page - 1):
            raise InputError(f"{where}: page size {page} is not a power of two")
        if len(data) != HEADER.size + count * RECORD.size:
            raise InputError(f"{where}: {len(data)} bytes, but the header says {count} "
                             f"records ({HEADER.size + count * RECORD.size} bytes)")
        self.page_size, self.wall = page, wall
        recs = list(RECORD.iter_unpack(data[HEADER.size:]))
        self.records = recs
        # the first read of a page is what the dump holds: a critical run (read first, the
        # runs disjoint) before any bulk one; bulk runs may overlap (the ELF text repeats RAM)
        self._crit = sorted((r[0], r[1], r[3], r[4]) for r in recs if r[2] & CRITICAL)
        self._bulk = sorted((r[0], r[1], r[3], r[4]) for r in recs if not r[2] & CRITICAL)
        self._crit_starts = [r[0] for r in self._crit]
        self._bulk_starts = [r[0] for r in self._bulk]
        self._longest = max((r[1] for r in self._bulk), default=0) * page

    @classmethod
    def load(cls, path: str) -> PageTimes:
        """Read OUTPUT.times (InputError when it is not one)."""
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 31)
        except OSError as exc:
            raise InputError(f"{path}: {exc.strerror or exc}") from None
        return cls(data, path)

    def when(self, paddr: int) -> tuple[int, int] | None:
        """(start, end) ns of the first read of the page holding paddr, or None."""
        page = self.page_size
        i = bisect.bisect_right(self._crit_starts, paddr) - 1
        if i >= 0 and paddr < self._crit[i][0] + self._crit[i][1] * page:
            return self._crit[i][2], self._crit[i][3]
        best = None
        i = bisect.bisect_right(self._bulk_starts, paddr) - 1
        while i >= 0 and self._bulk_starts[i] + self._longest > paddr:
            start, pages, t0, t1 = self._bulk[i]
            if paddr < start + pages * page and (best is None or t0 < best[0]):
                best = (t0, t1)
            i -= 1
        return best

    def summary(self) -> dict[str, Any]:
        """The windows, as the dump's manifest gives them."""
        return summary(self.records)
