"""kdump-compressed files (makedumpfile, kcore --format kdump), plain or flattened, as sources.

The pages are decompressed once, when the source opens, into an unlinked temporary file
(holes for zero pages) under $KCORE_TMPDIR, $TMPDIR or /var/tmp; the source then reads that
file like a raw image, with an extent per run of dumped pages. A flattened file (makedumpfile
-F, kcore -o -) is rebuilt into another temporary file first.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from kcore.errors import SourceError
from kcore.sources.base import Extent, MemorySource, Probe, check_extents
from kcore.sources.checks import Region, Result, need, no_notes, note_vmcoreinfo
from kcore.sources.files import file_size, open_readonly, pread_exact, pread_full
from kcore.wire import LayoutError, diskdump, flattened

BATCH_PAGES = 512
WINDOW = 4 << 20  # file bytes read at once while unpacking


class KdumpFormatError(SourceError):
    """A kdump-compressed or flattened file is truncated or inconsistent."""


def temp_file(near: str) -> int:
    """An unlinked read-write temporary file (O_TMPFILE where the filesystem has it)."""
    import tempfile  # here: a start-up that reads no kdump file does not pay for it

    folder = os.environ.get("KCORE_TMPDIR") or os.environ.get("TMPDIR") or "/var/tmp"
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        pass
    try:
        fd, path = tempfile.mkstemp(prefix="kcore-unpack-", dir=folder)
    except OSError as exc:
        raise SourceError(f"{near}: cannot create a temporary file in {folder} to unpack it: "
                          f"{exc.strerror} (set KCORE_TMPDIR)") from None
    os.unlink(path)
    return fd


class FileStream:
    """A file read as a stream from offset 0 (the flattened walker's read(n))."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pos = fd, 0

    def read(self, n: int) -> bytes:
        """Up to n bytes from where the last read ended (b"" at the end of the file)."""
        data = pread_full(self.fd, n, self.pos)
        self.pos += len(data)
        return data


def rebuild_flattened(fd: int, path: str) -> int:
    """A temporary file holding the rebuilt dump of a flattened file at fd."""
    out = temp_file(path)
    stream = FileStream(fd)
    try:
        flattened.rebuild(stream.read, out)
    except flattened.FlatFormatError as exc:
        os.close(out)
        raise KdumpFormatError(f"{path}: {exc}", offset=exc.offset, field=exc.field) from None
    except OSError as exc:  # EFBIG, ENOSPC: a record's offset the temporary file cannot take
        os.close(out)
        raise KdumpFormatError(f"{path}: cannot rebuild the flattened dump in a temporary file "
                               f"(at stream offset {stream.pos:#x}): {os.strerror(exc.errno or 0)} "
                               f"(KCORE_TMPDIR chooses where)") from None
    except BaseException:
        os.close(out)
        raise
    return out


class KdumpSource(MemorySource):
    """A kdump-compressed dump: the pages its second bitmap says are dumped."""

    kind = "kdump"
    signatures = ("kdump", "flattened")

    @classmethod
    def open(cls, path: str, spec: str | None = None, root: str = "/") -> KdumpSource:
        """Open a kdump-compressed (or flattened) file and unpack its pages."""
        fd = open_readonly(path)
        dump = fd
        out = -1
        try:
            head = pread_full(fd, diskdump.HEADER.size, 0)
            if flattened.is_flattened(head):
                dump = rebuild_flattened(fd, path)
            out = temp_file(path)
            extents, vmcoreinfo = unpack(dump, path, out)
            return cls(spec or f"kdump:{path}", path, out, check_extents(
                extents, path, KdumpFormatError), vmcoreinfo)
        except BaseException:
            if out >= 0:
                os.close(out)
            raise
        finally:
            if dump != fd:
                os.close(dump)
            os.close(fd)

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        """makedumpfile's "KDUMP   " (or diskdump's "DISKDUMP") signature, or a flattened
        file's "makedumpfile"."""
        return (probe.head[:8] in (diskdump.KDUMP_SIGNATURE, diskdump.DISKDUMP_SIGNATURE)
                or flattened.is_flattened(probe.head))

    @classmethod
    def check(cls, fd: int, path: str, res: Result,
              manifest: dict[str, Any] | None) -> list[Region] | None:
        """`kcore verify` of a kdump-compressed file (headers, bitmaps, every page descriptor,
        every page decompressed to one page) or of a flattened one (its records)."""
        if flattened.is_flattened(pread_full(fd, flattened.HEADER.size, 0)):
            return _check_flattened(fd, res)
        return _check_kdump(fd, res)


KDUMP_BATCH = 1024  # page descriptors checked (and their pages decompressed) at a time


def _check_kdump(fd: int, res: Result) -> list[Region]:
    """The checks of a kdump-compressed file (kcore.wire.diskdump's walker, kcore.codecs)."""
    from kcore import codecs

    res.format, res.detail = "kdump", "kdump-compressed (makedumpfile's diskdump format)"
    layout = diskdump.read_layout(lambda at, n, what: need(fd, at, n, res.size, what), res.size)
    note_vmcoreinfo(res, layout.vmcoreinfo)
    res.vmcoreinfo["offset"] = (layout.sub.offset_vmcoreinfo if layout.vmcoreinfo is not None
                                else None)
    geo = layout.geometry
    bs, npages, desc_at = geo.block_size, geo.dumped_pages, geo.desc_offset
    zero = 0
    window, dst = bytearray((4 << 20) + bs), bytearray(KDUMP_BATCH * bs)
    zero_page = bytes(bs)
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for first in range(0, npages, KDUMP_BATCH):
            count = min(KDUMP_BATCH, npages - first)
            raw = pread_full(fd, count * diskdump.PAGE_DESC.size,
                             desc_at + first * diskdump.PAGE_DESC.size)
            diskdump.check_descs(raw, first, layout, res.size)
            rc, bad = codecs.kdump_unpack(fd, raw, count, bs, window, dst, null, 0)
            if rc != 0:
                at = desc_at + (first + bad) * diskdump.PAGE_DESC.size
                raise LayoutError(at, "page data", os.strerror(-rc),
                                  f"page {first + bad} (descriptor at {at:#x}) does not "
                                  f"decompress to one page ({os.strerror(-rc)})")
            zero += sum(dst[i * bs:(i + 1) * bs] == zero_page for i in range(count))
    finally:
        os.close(null)
    res.structure = (f"headers, bitmaps, {npages} page descriptors, every page decompressed: "
                     f"valid")
    res.ranges["count"] = len(layout.runs)
    res.ranges["memory_bytes"] = npages * bs
    res.pages = {"memory": npages, "zero": zero,
                 "zero_share": round(zero / npages, 4) if npages else None,
                 "unreadable": None, "unreadable_share": None}
    res.consumers["volatility"] = {"ok": False, "why": "Volatility 3 does not open "
                                   "kdump-compressed files"}
    ok = bool(res.vmcoreinfo.get("valid"))
    res.consumers["drgn"] = {"ok": ok, "why": "drgn opens it when built with libkdumpfile "
                             "(VMCOREINFO present)" if ok else "no VMCOREINFO"}
    res.consumers["crash"] = {"ok": ok and res.vmcoreinfo.get("kerneloffset") is not None,
                              "why": "its native format; KERNELOFFSET in VMCOREINFO" if ok
                              else "no VMCOREINFO"}
    return []


def _check_flattened(fd: int, res: Result) -> list[Region]:
    """The checks of makedumpfile's flattened records (kcore.wire.flattened's walker)."""
    res.format, res.detail = "flattened", "makedumpfile flattened format (-F)"
    _size, records, end = flattened.walk(FileStream(fd).read, lambda _at, _data, _rec: None)
    if end != res.size:
        res.warnings.append(f"{res.size - end} bytes after the end marker (from {end:#x})")
    res.structure = f"{records} flattened records up to the end marker: valid"
    res.ranges["count"] = records
    no_notes(res, volatility="Volatility does not open flattened dumps",
             drgn="drgn refuses makedumpfile's flattened format: rearrange it with "
                  "makedumpfile -R first",
             crash="", volatility_ok=False)
    res.consumers["crash"] = {"ok": True, "why": "crash reads flattened files (it rearranges "
                              "them in memory first)"}
    res.vmcoreinfo = {"present": None, "why": "inside the flattened stream (not checked)"}
    return []


def unpack(fd: int, path: str, out: int) -> tuple[list[Extent], bytes | None]:
    """Decompress the dumped pages of the kdump file at fd into out; return extents, VMCOREINFO."""
    from kcore import codecs, engine  # here: only a kdump file being read needs them

    def need(offset: int, length: int, what: str) -> bytes:
        try:
            return pread_exact(fd, offset, length, path, what)
        except SourceError as exc:
            raise KdumpFormatError(str(exc), offset=exc.offset) from None

    size = file_size(fd)
    try:
        layout = diskdump.read_layout(need, size)
    except LayoutError as exc:
        raise KdumpFormatError(f"{path}: {exc}", offset=exc.offset, field=exc.field) from None
    geo, runs, block = layout.geometry, layout.runs, layout.geometry.block_size
    vmcoreinfo = layout.vmcoreinfo
    extents: list[Extent] = []
    jobs: list[tuple[int, int, int]] = []  # (first desc index, pages, output offset)
    at = 0
    index = 0
    for first, n in runs:
        extents.append(Extent(first * block, n * block, at))
        for k in range(0, n, BATCH_PAGES):
            m = min(BATCH_PAGES, n - k)
            jobs.append((index, m, at))
            index += m
            at += m * block
    os.ftruncate(out, at)
    threads = engine.default_threads()
    depth = threads + 1
    slots = [(bytearray(WINDOW + block), bytearray(BATCH_PAGES * block)) for _ in range(depth)]

    def work(j: int, _n: int, slot: int) -> None:
        first_desc, m, out_off = jobs[j]
        desc_at = geo.desc_offset + first_desc * diskdump.PAGE_DESC.size
        descs = pread_full(fd, m * diskdump.PAGE_DESC.size, desc_at)
        window, dst = slots[slot]
        rc, bad = codecs.kdump_unpack(fd, descs, m, block, window, dst, out, out_off)
        if rc == 0:
            return
        if bad >= m:
            raise OSError(-rc, f"writing the unpacked pages of {path}: {os.strerror(-rc)}")
        pd_at = desc_at + bad * diskdump.PAGE_DESC.size
        offset, length, flags, _pf = diskdump.PAGE_DESC.unpack_from(descs, bad * 24)
        pfn = _pfn_of(runs, first_desc + bad)
        if rc == -errno.ENOENT:  # the codec's library is missing
            codec = codecs.BY_FLAG.get(flags & diskdump.DH_CODECS)
            why = codecs.missing(codec) if codec else f"unknown flags {flags:#x}"
            raise KdumpFormatError(f"{path}: page {pfn:#x} (descriptor at offset {pd_at:#x}): "
                                   f"{why}", offset=pd_at)
        what = ("data past the end of the file" if rc == -errno.ERANGE
                else "corrupt page data, size or flags")
        raise KdumpFormatError(f"{path}: {what} for PFN {pfn:#x} at offset {offset:#x} (size "
                               f"{length:#x}, flags {flags:#x}; descriptor at offset "
                               f"{pd_at:#x})", offset=pd_at)

    engine.run_ordered(((j, 1) for j in range(len(jobs))), work,
                       lambda *_a: None, threads, depth)
    return extents, vmcoreinfo


def _pfn_of(runs: list[tuple[int, int]], index: int) -> int:
    """The PFN of the index-th dumped page."""
    for first, n in runs:
        if index < n:
            return first + index
        index -= n
    return -1
