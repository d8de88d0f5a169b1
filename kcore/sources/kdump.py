"""kdump-compressed files (makedumpfile, kcore --format kdump), plain or flattened, as sources.

The pages are decompressed once, when the source opens, into an unlinked temporary file
(holes for zero pages) under $KCORE_TMPDIR, $TMPDIR or /var/tmp; the source then reads that
file like a raw image, with an extent per run of dumped pages. A flattened file (makedumpfile
-F, kcore -o -) is rebuilt into another temporary file first.
"""

from __future__ import annotations

import os

from kcore.errors import SourceError
from kcore.sources.base import Extent, MemorySource, Probe, check_extents
from kcore.sources.files import file_size, open_readonly, pread_exact, pread_full
from kcore.wire import diskdump, flattened

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


def rebuild_flattened(fd: int, path: str) -> int:
    """A temporary file holding the rebuilt dump of a flattened file at fd."""
    out = temp_file(path)
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        data = pread_full(fd, n, pos)
        pos += len(data)
        return data

    try:
        flattened.rebuild(read, out)
    except flattened.FlatFormatError as exc:
        os.close(out)
        raise KdumpFormatError(f"{path}: {exc}") from None
    except OSError as exc:  # EFBIG, ENOSPC: a record's offset the temporary file cannot take
        os.close(out)
        raise KdumpFormatError(f"{path}: cannot rebuild the flattened dump in a temporary file "
                               f"(at stream offset {pos:#x}): {os.strerror(exc.errno or 0)} "
                               f"(KCORE_TMPDIR chooses where)") from None
    except BaseException:
        os.close(out)
        raise
    return out


class KdumpSource(MemorySource):
    """A kdump-compressed dump: the pages its second bitmap says are dumped."""

    kind = "kdump"

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
        """makedumpfile's "KDUMP   " signature, or a flattened file's "makedumpfile"."""
        return (probe.head.startswith(diskdump.KDUMP_SIGNATURE)
                or flattened.is_flattened(probe.head))


def unpack(fd: int, path: str, out: int) -> tuple[list[Extent], bytes | None]:
    """Decompress the dumped pages of the kdump file at fd into out; return extents, VMCOREINFO."""
    from kcore import codecs, engine  # here: only a kdump file being read needs them

    def need(offset: int, length: int, what: str) -> bytes:
        try:
            return pread_exact(fd, offset, length, path, what)
        except SourceError as exc:
            raise KdumpFormatError(str(exc)) from None

    size = file_size(fd)
    header = diskdump.DiskDumpHeader.unpack(need(0, diskdump.HEADER.size, "disk_dump_header"))
    try:
        geo = diskdump.check_header(header, size)
        sub = diskdump.SubHeader.unpack(need(header.block_size, diskdump.SUB_HEADER.size,
                                             "kdump_sub_header"), header.header_version)
        max_mapnr = diskdump.check_sub(header, sub, size)
    except diskdump.LayoutError as exc:
        raise KdumpFormatError(f"{path}: {exc}") from None
    block = header.block_size
    vmcoreinfo = None
    if sub.size_vmcoreinfo:
        vmcoreinfo = need(sub.offset_vmcoreinfo, sub.size_vmcoreinfo, "VMCOREINFO")
    dumped = need(geo.bitmap_offset + geo.bitmap_len, geo.bitmap_len, "dumpable bitmap")
    runs = diskdump.runs_of(dumped, max_mapnr)
    npages = sum(n for _f, n in runs)
    desc_end = geo.desc_offset + npages * diskdump.PAGE_DESC.size
    if desc_end > size:
        raise KdumpFormatError(f"{path}: truncated page descriptors at offset {size:#x} "
                               f"({npages} pages need them up to {desc_end:#x})")
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
        if rc == -2:  # ENOENT: the codec's library is missing
            codec = codecs.BY_FLAG.get(flags & diskdump.DH_CODECS)
            why = codecs.missing(codec) if codec else f"unknown flags {flags:#x}"
            raise KdumpFormatError(f"{path}: page {pfn:#x} (descriptor at offset {pd_at:#x}): "
                                   f"{why}")
        what = ("data past the end of the file" if rc == -34  # ERANGE
                else "corrupt page data, size or flags")
        raise KdumpFormatError(f"{path}: {what} for PFN {pfn:#x} at offset {offset:#x} (size "
                               f"{length:#x}, flags {flags:#x}; descriptor at offset "
                               f"{pd_at:#x})")

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
