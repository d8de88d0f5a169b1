"""makedumpfile's kdump-compressed format (diskdump_mod.h): headers, bitmaps, page descriptors.

A file of block_size (= page size) blocks: block 0 the disk_dump_header; from block 1 the
kdump_sub_header, the ELF notes right after it (VMCOREINFO among them), sub_hdr_size blocks in
all; then bitmap_blocks blocks of two bitmaps of equal size (1: the pages that exist, 2: the
pages dumped); then one page_desc per dumped page in PFN order; then the pages' data.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from kcore.wire import LayoutError as LayoutError  # the kdump checks raise it

KDUMP_SIGNATURE = b"KDUMP   "
DISKDUMP_SIGNATURE = b"DISKDUMP"
HEADER_VERSION = 6  # the sub header's 64-bit start_pfn_64/end_pfn_64/max_mapnr_64 fields
# struct disk_dump_header on 64-bit: signature, header_version, new_utsname (6 x 65 bytes),
# 6 bytes of alignment, struct timeval (2 x 8), status, block_size, sub_hdr_size, bitmap_blocks,
# max_mapnr, total_ram_blocks, device_blocks, written_blocks, current_cpu, nr_cpus.
HEADER = struct.Struct("<8si65s65s65s65s65s65s6xqqIiiIIIIIIi")
# struct kdump_sub_header on 64-bit.
SUB_HEADER = struct.Struct("<QiiQQQQQQQQQQQ")
PAGE_DESC = struct.Struct("<QIIQ")  # offset, size, flags, page_flags
# DUMP_DH_COMPRESSED_*: the header's status and a page descriptor's flags.
DH_ZLIB, DH_LZO, DH_SNAPPY, DH_INCOMPLETE, DH_EXCLUDED_VMEMMAP, DH_ZSTD = (
    0x1, 0x2, 0x4, 0x8, 0x10, 0x20)
DH_CODECS = DH_ZLIB | DH_LZO | DH_SNAPPY | DH_ZSTD

assert HEADER.size == 464 and SUB_HEADER.size == 104 and PAGE_DESC.size == 24


@dataclass
class DiskDumpHeader:
    """struct disk_dump_header (the fields kdump-compressed files use)."""

    block_size: int
    sub_hdr_size: int
    bitmap_blocks: int
    max_mapnr: int
    status: int = 0
    nr_cpus: int = 1
    utsname: tuple[bytes, bytes, bytes, bytes, bytes, bytes] = (b"Linux", b"", b"", b"",
                                                                b"x86_64", b"")
    timestamp: tuple[int, int] = (0, 0)
    header_version: int = HEADER_VERSION
    signature: bytes = KDUMP_SIGNATURE

    def pack(self) -> bytes:
        """The header's bytes (max_mapnr clipped to 32 bits, as makedumpfile does)."""
        return HEADER.pack(self.signature, self.header_version, *self.utsname,
                           *self.timestamp, self.status, self.block_size, self.sub_hdr_size,
                           self.bitmap_blocks, min(self.max_mapnr, 0xFFFFFFFF), 0, 0, 0, 0,
                           self.nr_cpus)

    @classmethod
    def unpack(cls, data: bytes) -> DiskDumpHeader:
        """Parse the first HEADER.size bytes of a file."""
        (sig, version, *rest) = HEADER.unpack_from(data)
        uts = tuple(rest[:6])
        sec, usec, status, block, sub, bitmap, mapnr, _ram, _dev, _written, _cpu, cpus = rest[6:]
        return cls(block, sub, bitmap, mapnr, status, cpus, uts, (sec, usec),
                   version, sig)


@dataclass
class SubHeader:
    """struct kdump_sub_header (header_version 6)."""

    phys_base: int = 0
    dump_level: int = 0
    offset_vmcoreinfo: int = 0
    size_vmcoreinfo: int = 0
    offset_note: int = 0
    size_note: int = 0
    max_mapnr: int = 0
    split: int = 0
    start_pfn: int = 0
    end_pfn: int = 0

    def pack(self) -> bytes:
        """The sub header's bytes (no split: start and end PFNs 0)."""
        return SUB_HEADER.pack(self.phys_base, self.dump_level, self.split, self.start_pfn,
                               self.end_pfn, self.offset_vmcoreinfo, self.size_vmcoreinfo,
                               self.offset_note, self.size_note, 0, 0, self.start_pfn,
                               self.end_pfn, self.max_mapnr)

    @classmethod
    def unpack(cls, data: bytes, version: int) -> SubHeader:
        """Parse a sub header; fields newer than version read as 0."""
        (phys_base, level, split, start, end, off_vi, size_vi, off_note, size_note, _oe, _se,
         start64, end64, mapnr64) = SUB_HEADER.unpack_from(data)
        sub = cls(phys_base, level if version >= 1 else 0)
        if version >= 3:
            sub.offset_vmcoreinfo, sub.size_vmcoreinfo = off_vi, size_vi
        if version >= 4:
            sub.offset_note, sub.size_note = off_note, size_note
        sub.split = split if version >= 2 else 0
        sub.start_pfn, sub.end_pfn = (start64, end64) if version >= 6 else (start, end)
        sub.max_mapnr = mapnr64 if version >= 6 else 0
        return sub


# Where disk_dump_header's fields are (the 64-bit layout above) and, from the sub header's
# block, the kdump_sub_header's: what a LayoutError names.
FIELD_OFFSETS = {"signature": 0x0, "header_version": 0x8, "block_size": 0x1AC,
                 "sub_hdr_size": 0x1B0, "bitmap_blocks": 0x1B4, "max_mapnr": 0x1B8}
SUB_FIELD_OFFSETS = {"split": 12, "offset_vmcoreinfo": 32, "size_vmcoreinfo": 40,
                     "max_mapnr_64": 96}
MIN_BLOCK, MAX_BLOCK = 1 << 12, 1 << 16  # block size = page size: 4 KiB to 64 KiB
MAX_VMCOREINFO = 1 << 20


def check_header(hdr: DiskDumpHeader, size: int) -> Geometry:
    """The geometry of a file of size bytes with this disk_dump_header, or a LayoutError."""
    def bad(field: str, why: str) -> LayoutError:
        return LayoutError(FIELD_OFFSETS[field], field, why)

    if hdr.signature not in (KDUMP_SIGNATURE, DISKDUMP_SIGNATURE):
        raise bad("signature", f"{hdr.signature!r} is not {KDUMP_SIGNATURE!r}: not a "
                               "kdump-compressed file")
    if not 1 <= hdr.header_version <= 1 << 10:
        raise bad("header_version", f"{hdr.header_version} (a kdump file has a sub header "
                                    "from version 1)")
    bs = hdr.block_size
    if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
        raise bad("block_size", f"{bs} is not a power of two from 4 KiB to 64 KiB")
    if hdr.sub_hdr_size <= 0 or (1 + hdr.sub_hdr_size) * bs > size:
        raise bad("sub_hdr_size", f"{hdr.sub_hdr_size} blocks do not fit the file of "
                                  f"{size:#x} bytes")
    if hdr.bitmap_blocks < 2 or hdr.bitmap_blocks % 2:
        raise bad("bitmap_blocks", f"{hdr.bitmap_blocks} is not an even count of blocks "
                                   "(two bitmaps of equal size)")
    geo = Geometry(bs, hdr.sub_hdr_size, hdr.bitmap_blocks, 0)
    if geo.desc_offset > size:
        raise bad("bitmap_blocks", f"the bitmaps end at {geo.desc_offset:#x}, past the end of "
                                   f"the file ({size:#x}): truncated")
    return geo


def check_sub(hdr: DiskDumpHeader, sub: SubHeader, size: int) -> int:
    """max_mapnr of a file whose header passed check_header, or a LayoutError."""
    at = hdr.block_size
    if sub.split:
        raise LayoutError(at + SUB_FIELD_OFFSETS["split"], "split", "one part of a split "
                          "dump: reassemble it with makedumpfile --reassemble")
    if sub.size_vmcoreinfo and (sub.size_vmcoreinfo > MAX_VMCOREINFO
                                or sub.offset_vmcoreinfo + sub.size_vmcoreinfo > size):
        raise LayoutError(at + SUB_FIELD_OFFSETS["size_vmcoreinfo"], "size_vmcoreinfo",
                          f"{sub.size_vmcoreinfo} bytes at {sub.offset_vmcoreinfo:#x} lie "
                          f"outside the file ({size:#x} bytes) or exceed 1 MiB")
    mapnr = sub.max_mapnr or hdr.max_mapnr
    half = hdr.bitmap_blocks * hdr.block_size // 2
    if mapnr > half * 8:
        field = "max_mapnr_64" if sub.max_mapnr else "max_mapnr"
        offset = at + SUB_FIELD_OFFSETS[field] if sub.max_mapnr else FIELD_OFFSETS[field]
        raise LayoutError(offset, field, f"{mapnr:#x} pages do not fit bitmaps of {half} bytes")
    return mapnr


@dataclass(frozen=True)
class Geometry:
    """Where each part of a kdump-compressed file starts, for a block size and sizes."""

    block_size: int
    sub_hdr_size: int  # blocks
    bitmap_blocks: int  # blocks, both bitmaps
    dumped_pages: int

    @classmethod
    def of(cls, block_size: int, max_mapnr: int, notes_len: int, dumped_pages: int) -> Geometry:
        """The geometry of a file whose sub header carries notes_len bytes of notes."""
        sub = -(-(SUB_HEADER.size + notes_len) // block_size)
        half = max(1, -(-max_mapnr // (8 * block_size)))
        return cls(block_size, sub, 2 * half, dumped_pages)

    @property
    def notes_offset(self) -> int:
        """File offset of the ELF notes (right after the sub header)."""
        return self.block_size + SUB_HEADER.size

    @property
    def bitmap_offset(self) -> int:
        """File offset of the first bitmap."""
        return (1 + self.sub_hdr_size) * self.block_size

    @property
    def bitmap_len(self) -> int:
        """Bytes of each of the two bitmaps."""
        return self.bitmap_blocks * self.block_size // 2

    @property
    def desc_offset(self) -> int:
        """File offset of the first page descriptor."""
        return self.bitmap_offset + self.bitmap_blocks * self.block_size

    @property
    def data_offset(self) -> int:
        """File offset where page data starts (the shared zero page first)."""
        return self.desc_offset + self.dumped_pages * PAGE_DESC.size


@dataclass(frozen=True)
class Layout:
    """A kdump-compressed file's headers, checked: where each part is and which pages it holds."""

    header: DiskDumpHeader
    sub: SubHeader
    geometry: Geometry  # dumped_pages: the pages the second bitmap says are in the file
    max_mapnr: int
    runs: list[tuple[int, int]]  # (first PFN, count) of the dumped pages
    vmcoreinfo: bytes | None


def read_layout(read: Callable[[int, int, str], bytes], size: int) -> Layout:
    """Walk a kdump-compressed file of size bytes up to its page descriptors: the headers
    (check_header, check_sub), VMCOREINFO, the dumpable bitmap, and that the descriptors fit.
    read(offset, length, what) gives exactly that many of the file's bytes. LayoutError at the
    first field that makes no sense."""
    header = DiskDumpHeader.unpack(read(0, HEADER.size, "disk_dump_header"))
    geo = check_header(header, size)
    sub = SubHeader.unpack(read(header.block_size, SUB_HEADER.size, "kdump_sub_header"),
                           header.header_version)
    max_mapnr = check_sub(header, sub, size)
    vmcoreinfo = None
    if sub.size_vmcoreinfo:
        vmcoreinfo = read(sub.offset_vmcoreinfo, sub.size_vmcoreinfo, "VMCOREINFO")
    dumped = read(geo.bitmap_offset + geo.bitmap_len, geo.bitmap_len, "dumpable bitmap")
    runs = runs_of(dumped, max_mapnr)
    npages = sum(n for _f, n in runs)
    geo = Geometry(geo.block_size, geo.sub_hdr_size, geo.bitmap_blocks, npages)
    if geo.data_offset > size:
        raise LayoutError(geo.desc_offset, "page_desc", "truncated",
                          f"{npages} page descriptors at {geo.desc_offset:#x} run past the end "
                          f"of the file ({size:#x}): truncated")
    return Layout(header, sub, geo, max_mapnr, runs, vmcoreinfo)


def check_descs(raw: bytes, first: int, layout: Layout, size: int) -> None:
    """The page descriptors first, first + 1... whose bytes are raw: each page's data inside
    the file's page data, one codec flag at most, an uncompressed page a whole block. Raises
    LayoutError at the first descriptor that breaks a rule."""
    geo = layout.geometry
    bs = geo.block_size
    for i in range(len(raw) // PAGE_DESC.size):
        offset, length, flags, _pf = PAGE_DESC.unpack_from(raw, i * PAGE_DESC.size)
        at = geo.desc_offset + (first + i) * PAGE_DESC.size
        if offset < geo.data_offset or offset + length > size or not 0 < length <= bs:
            raise LayoutError(at, "offset" if 0 < length <= bs else "size", "outside the page data",
                              f"page descriptor {first + i}: {length:#x} bytes at "
                              f"{offset:#x} lie outside the page data "
                              f"({geo.data_offset:#x}-{size:#x})")
        if flags & ~DH_CODECS or bin(flags).count("1") > 1:
            raise LayoutError(at, "flags", "unknown", f"page descriptor {first + i}: "
                              f"unknown flags {flags:#x}")
        if not flags and length != bs:
            raise LayoutError(at, "size", "not a page", f"page descriptor {first + i}: an "
                              f"uncompressed page of {length:#x} bytes")


def bitmap_of(runs: list[tuple[int, int]], nbytes: int) -> bytearray:
    """A bitmap of nbytes with the bits of (first PFN, count) runs set (bit i: byte i/8, LSB)."""
    bm = bytearray(nbytes)
    for first, count in runs:
        pfn, end = first, first + count
        while pfn < end and pfn % 8:
            bm[pfn // 8] |= 1 << (pfn % 8)
            pfn += 1
        full_end = end // 8 * 8
        if pfn < full_end:
            bm[pfn // 8:full_end // 8] = b"\xff" * ((full_end - pfn) // 8)
            pfn = full_end
        while pfn < end:
            bm[pfn // 8] |= 1 << (pfn % 8)
            pfn += 1
    return bm


def runs_of(bitmap: bytes, limit: int) -> list[tuple[int, int]]:
    """The (first PFN, count) runs of set bits among the first limit bits of a bitmap."""
    runs: list[tuple[int, int]] = []

    def add(pfn: int, count: int) -> None:
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + count)
        else:
            runs.append((pfn, count))

    view = bytes(bitmap[:-(-limit // 8)])
    for m in re.finditer(rb"[^\x00]+", view):
        lo, hi = m.span()
        if view.count(b"\xff", lo, hi) == hi - lo:
            add(lo * 8, (hi - lo) * 8)
            continue
        for i in range(lo, hi):
            byte = view[i]
            if byte == 0xFF:
                add(i * 8, 8)
                continue
            for bit in range(8):
                if byte >> bit & 1:
                    add(i * 8 + bit, 1)
    if runs and runs[-1][0] + runs[-1][1] > limit:  # bits past limit are not pages
        first, _n = runs[-1]
        runs[-1] = (first, limit - first)
        if runs[-1][1] <= 0:
            runs.pop()
    return runs


def vmcoreinfo_span(notes: bytes) -> tuple[int, int]:
    """(offset in notes, size) of the VMCOREINFO note's desc; (0, 0) if there is none."""
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, _ntype = struct.unpack_from("<III", notes, pos)
        name_at = pos + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        if notes[name_at:name_at + namesz].rstrip(b"\0") == b"VMCOREINFO":
            return desc_at, descsz
        if namesz == 0 and descsz == 0:
            break
        pos = desc_at + (descsz + 3) // 4 * 4
    return 0, 0
