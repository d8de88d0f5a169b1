"""`kcore verify`: is a dump intact, and will drgn, crash and Volatility open it?

A dump is checked end to end without trusting it: its structure (ELF headers, program headers
and notes; LiME and AVML range headers; makedumpfile's flattened records), its SHA-256 against
DUMP.sha256 and the manifest (DUMP.json, with a digest per 64 MiB chunk that says where a
damaged file breaks), its ranges against the manifest's, its VMCOREINFO, and the rules each
consumer applies:

- Volatility 3's ELF layer (framework/layers/elf.py) maps only PT_LOADs with
  p_filesz == p_memsz > 0 (by p_paddr); any other load's memory is missing to it.
- drgn takes an ELF core as a kernel core only when it carries a VMCOREINFO note, and refuses
  makedumpfile's flattened format (`makedumpfile -R` rearranges it first).
- crash needs, for a KASLR kernel, KERNELOFFSET from VMCOREINFO, and phys_base: VMCOREINFO's
  NUMBER(phys_base) or a PT_LOAD of the kernel text (x86_64_calc_phys_base).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

from kcore.errors import InputError, KcoreError
from kcore.manifest import CHUNK, ManifestError, sidecar_path
from kcore.manifest import load as load_manifest
from kcore.manifest import ranges as manifest_ranges
from kcore.sources.files import pread_full
from kcore.wire.flattened import is_flattened

BLOCK = 4 << 20
PAGE = 4096
ZERO_PAGE = bytes(PAGE)
ZERO_BLOCK = bytes(BLOCK)
ALL_ONES = (1 << 64) - 1
START_KERNEL_MAP = 0xFFFFFFFF80000000
EM_X86_64 = 62
LIME_MAGIC = 0x4C694D45
AVML_MAGIC = 0x4C4D5641
AVML_HEADER = struct.Struct("<IIQQQ")  # magic, version, start, end (inclusive), padding
KDUMP_SIGNATURE = b"KDUMP   "
MAX_FLAT_RECORDS = 1 << 24
MAX_AVML_BLOCKS = 1 << 20
AVML_CHECK_MAX = 256 << 20  # AVML blocks up to this size are decompressed to be checked


class Broken(Exception):
    """The structure stops making sense here: (file offset or None, what)."""

    def __init__(self, where: int | None, what: str) -> None:
        super().__init__(what)
        self.where = where
        self.what = what


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

    @property
    def ok(self) -> bool:
        """No problem was found."""
        return not self.problems

    def problem(self, where: int | None, what: str) -> None:
        """Record a problem at a file offset (None: the whole file)."""
        self.problems.append({"offset": None if where is None else hex(where), "what": what})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        d = {k: v for k, v in self.__dict__.items()}
        d["ok"] = self.ok
        return d


def _read(fd: int, offset: int, length: int, size: int, what: str) -> bytes:
    """Exactly length bytes at offset, or Broken naming what was cut off."""
    if offset < 0 or length < 0 or offset + length > size:
        raise Broken(offset, f"truncated {what}: needs {length:#x} bytes at {offset:#x}, "
                             f"the file ends at {size:#x}")
    data = pread_full(fd, length, offset)
    if len(data) != length:
        raise Broken(offset, f"short read of {what}")
    return data


# ---- formats ---------------------------------------------------------------------------

def _elf(fd: int, path: str, res: Result) -> tuple[list[Region], Any]:
    from kcore.sources.elf import PT_LOAD, parse_elf_core, resolve_aliases, vmcoreinfo_of
    from kcore.sources.kcore import looks_like_kcore

    try:
        core = parse_elf_core(fd, path, size=res.size)
    except KcoreError as exc:
        raise Broken(_offset_in(str(exc)), str(exc).removeprefix(f"{path}: ")) from None
    loads = [ph for ph in core.phdrs if ph.p_type == PT_LOAD]
    names = {n for n, _t, _d in core.notes}
    if looks_like_kcore(core):
        res.format, res.detail = "kcore", "a /proc/kcore image"
    else:
        res.format = "elf"
        res.detail = ("QEMU dump-guest-memory core" if b"QEMU" in names
                      else "ELF core with physical addresses")
    if core.e_machine != EM_X86_64:
        res.warnings.append(f"e_machine {core.e_machine} is not x86-64 (62)")
    end = core.phoff + len(core.phdrs) * 56
    for ph in core.phdrs:
        if ph.p_type == PT_LOAD and ph.p_filesz > ph.p_memsz:
            raise Broken(ph.at, f"PT_LOAD at {ph.at:#x}: p_filesz {ph.p_filesz:#x} is larger "
                                f"than p_memsz {ph.p_memsz:#x}")
        if ph.p_filesz:
            end = max(end, ph.p_offset + ph.p_filesz)
    end = max(end, _sections_end(fd, res.size))
    if res.size > end and res.format != "kcore":
        res.warnings.append(f"{res.size - end} bytes after the last segment's data "
                            f"(from {end:#x})")
    by_file = sorted((ph.p_offset, ph.p_offset + ph.p_filesz, ph.at) for ph in loads
                     if ph.p_filesz)
    for (_a0, a1, at_a), (b0, _b1, at_b) in zip(by_file, by_file[1:], strict=False):
        if b0 < a1 and res.format != "kcore":
            raise Broken(at_b, f"PT_LOADs at {at_a:#x} and {at_b:#x} share file bytes "
                               f"from {b0:#x}")
    phys = [ph for ph in loads if ph.p_filesz and ph.p_paddr not in (ALL_ONES, 0)
            or ph.p_filesz and ph.p_paddr == 0 and ph.p_vaddr == 0]
    if res.format != "kcore" and phys:
        try:  # RAM loads that overlap must hold the same bytes; the text load may not
            res.smear = resolve_aliases(fd, path, phys)[1].as_dict()
        except KcoreError as exc:
            raise Broken(_offset_in(str(exc)), str(exc).removeprefix(f"{path}: ")) from None
    regions = [Region(ph.p_offset, ph.p_filesz, ph.p_memsz, ph.p_paddr,
                      "text" if ph.p_vaddr >= START_KERNEL_MAP else
                      "ram" if ph.p_paddr != ALL_ONES else "mapped")
               for ph in loads]
    if res.format == "kcore":  # vmalloc and vmemmap areas are address space, not RAM
        regions = [r for r in regions if r.kind != "mapped"]
    res.structure = (f"ELF header, {len(core.phdrs)} program headers ({len(loads)} PT_LOAD), "
                     f"{len(core.notes)} notes: valid end to end")
    res.ranges["count"] = len(loads)
    res.ranges["memory_bytes"] = sum(r.memsz for r in regions if r.kind == "ram")
    _vmcoreinfo(res, vmcoreinfo_of(core))
    res.vmcoreinfo["offset"] = _vmcoreinfo_offset(fd, core)
    _elf_consumers(res, core, loads)
    if res.format == "kcore":
        res.consumers["volatility"] = {"ok": False, "why": "a /proc/kcore image: its vmalloc "
                                       "and vmemmap loads carry no physical address; dump "
                                       "--format elf or lime for Volatility"}
    return regions, core


def _vmcoreinfo_offset(fd: int, core: Any) -> int | None:
    """The file offset of the VMCOREINFO note's text (None without one)."""
    from kcore.sources.elf import PT_NOTE
    from kcore.wire.diskdump import vmcoreinfo_span

    for ph in core.phdrs:
        if ph.p_type == PT_NOTE and ph.p_filesz:
            at, size = vmcoreinfo_span(pread_full(fd, ph.p_filesz, ph.p_offset))
            if size:
                return ph.p_offset + at
    return None


def _sections_end(fd: int, size: int) -> int:
    """Where the section header table and its sections end (QEMU writes a .shstrtab)."""
    ehdr = pread_full(fd, 64, 0)
    if len(ehdr) < 64:
        return 0
    shoff, = struct.unpack_from("<Q", ehdr, 40)
    shentsize, shnum = struct.unpack_from("<HH", ehdr, 58)
    if not shoff or shentsize != 64 or not 0 < shnum < 4096 or shoff + shnum * 64 > size:
        return 0
    end = shoff + shnum * 64
    table = pread_full(fd, shnum * 64, shoff)
    for i in range(1, shnum):
        sh_type, = struct.unpack_from("<I", table, i * 64 + 4)
        sh_offset, sh_size = struct.unpack_from("<QQ", table, i * 64 + 24)
        if sh_type != 8 and sh_offset + sh_size <= size:  # SHT_NOBITS has no file bytes
            end = max(end, sh_offset + sh_size)
    return end


def _offset_in(message: str) -> int | None:
    """The first 'at offset 0x...' or 'at 0x...' in an error message."""
    import re

    m = re.search(r"at (?:offset |offsets |physical )?(0x[0-9a-f]+)", message)
    return int(m.group(1), 16) if m else None


def check_symbols(path: str, res: Result, release: str | None) -> None:
    """Whether the dump keeps the kernel's symbol files (kcore.symbols), and whether they are
    this kernel's: the release they name and VMCOREINFO's OSRELEASE (or the manifest's), and
    kallsyms' address of every SYMBOL() VMCOREINFO lists (which carry KERNELOFFSET)."""
    from kcore import isf, symbols
    from kcore.vmcoreinfo import VmcoreInfo

    try:
        found = symbols.read_dump(path)
    except KcoreError as exc:
        res.symbols = {"present": False}
        res.problem(None, f"the kept symbols cannot be read: {exc}")
        return
    if found is None:
        res.symbols = {"present": False}
        return
    files, where = found
    info = None
    data = files.get(symbols.VMCOREINFO)
    try:
        info = VmcoreInfo.parse(data) if data else None
    except KcoreError:
        info = None
    words = (files.text(symbols.UNAME) or files.text(symbols.VERSION) or "").split()
    named = words[2] if len(words) > 2 else None
    noted = res.vmcoreinfo.get("osrelease") or (info.osrelease if info else None) or release
    checked, differ = 0, []
    kallsyms = files.text(symbols.KALLSYMS)
    if kallsyms is not None and info is not None:
        # VMCOREINFO_SYMBOL_ARRAY(mem_section) gives the array's address: with
        # SPARSEMEM_EXTREME that is the pointer's value, not the symbol's
        wanted = {k[len("SYMBOL("):-1]: v for k, v in info.values.items()
                  if k.startswith("SYMBOL(") and k != "SYMBOL(mem_section)"}
        from kcore.kallsyms import parse_kallsyms

        try:
            found_at = parse_kallsyms(kallsyms, wanted, required=())
        except KcoreError:
            found_at = {}
        for name, addr in found_at.items():
            checked += 1
            if addr != int(wanted[name], 16):
                differ.append(name)
    match = (named is None or noted is None or named == noted) and not differ
    res.symbols = {
        "present": True, "where": where, "files": files.summary()["files"],
        "release": named, "kerneloffset": info.get("KERNELOFFSET") if info else None,
        "symbols_checked": checked, "match": match,
        "isf": isf.file_name(files) if files.btf is not None else None,
    }
    if named and noted and named != noted:
        res.problem(None, f"the kept symbols are of release {named}, the dump of {noted}")
    if differ:
        res.problem(None, f"the kept kallsyms disagree with VMCOREINFO on {len(differ)} of "
                          f"{checked} symbols ({', '.join(differ[:3])}): another boot's")


def _vmcoreinfo(res: Result, data: bytes | None) -> None:
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


def _elf_consumers(res: Result, core: Any, loads: list[Any]) -> None:
    partial = [ph for ph in loads if ph.p_filesz and ph.p_filesz != ph.p_memsz]
    empty = [ph for ph in loads if not ph.p_filesz]
    if partial:
        ph = partial[0]
        res.consumers["volatility"] = {
            "ok": False,
            "why": f"{len(partial)} PT_LOADs have 0 < p_filesz < p_memsz (first at {ph.at:#x}: "
                   f"{ph.p_filesz:#x} < {ph.p_memsz:#x}); Volatility's ELF layer maps only "
                   f"PT_LOADs with p_filesz == p_memsz, so their memory is missing to it",
        }
    else:
        why = "every PT_LOAD with file bytes has p_filesz == p_memsz"
        if empty:
            why += (f"; {len(empty)} zero-run PT_LOADs (p_filesz 0) are unmapped to it "
                    f"(read as zeros elsewhere)")
        res.consumers["volatility"] = {"ok": True, "why": why}
    vi = res.vmcoreinfo
    if not vi.get("present"):
        res.consumers["drgn"] = {"ok": False, "why": "no VMCOREINFO note: drgn does not take "
                                 "it for a kernel core"}
        res.consumers["crash"] = {"ok": False, "why": "no VMCOREINFO: crash needs --kaslr and "
                                  "phys_base given by hand for a KASLR kernel"}
        return
    res.consumers["drgn"] = {"ok": bool(vi.get("valid")), "why": "VMCOREINFO note present"
                             if vi.get("valid") else "the VMCOREINFO note is damaged"}
    text = any(ph.p_vaddr >= START_KERNEL_MAP and ph.p_filesz for ph in loads)
    if vi.get("kerneloffset") is None:
        res.consumers["crash"] = {"ok": False, "why": "VMCOREINFO has no KERNELOFFSET: crash "
                                  "cannot relocate a KASLR kernel's symbols"}
    elif vi.get("phys_base") is None and not text:
        res.consumers["crash"] = {"ok": False, "why": "no NUMBER(phys_base) in VMCOREINFO and "
                                  "no kernel text PT_LOAD to derive it from"}
    else:
        src = "NUMBER(phys_base)" if vi.get("phys_base") is not None else "the text PT_LOAD"
        res.consumers["crash"] = {"ok": True, "why": f"KERNELOFFSET={vi['kerneloffset']}, "
                                  f"phys_base from {src}"}


def _lime(fd: int, path: str, res: Result) -> list[Region]:
    from kcore.sources.lime import parse_lime

    try:
        extents = parse_lime(fd, path)
    except KcoreError as exc:
        raise Broken(_offset_in(str(exc)), str(exc).removeprefix(f"{path}: ")) from None
    res.format, res.detail = "lime", "LiME image"
    res.structure = f"{len(extents)} LiME range headers chained to the end of the file: valid"
    res.ranges["count"] = len(extents)
    res.ranges["memory_bytes"] = sum(e.length for e in extents)
    _no_notes(res, volatility="LiME: Volatility's LimeLayer opens it",
              drgn="drgn opens ELF and kdump-compressed cores, not LiME (kcore dump --source "
                   "lime:FILE --format elf converts it)",
              crash="crash opens ELF and kdump cores, not LiME (convert with kcore dump)")
    return [Region(e.offset, e.length, e.length, e.paddr) for e in
            sorted(extents, key=lambda e: e.offset)]


def _no_notes(res: Result, volatility: str, drgn: str, crash: str,
              volatility_ok: bool = True) -> None:
    res.vmcoreinfo = {"present": False, "why": "the format has no notes"}
    res.consumers["volatility"] = {"ok": volatility_ok, "why": volatility}
    res.consumers["drgn"] = {"ok": False, "why": drgn}
    res.consumers["crash"] = {"ok": False, "why": crash}


def _avml(fd: int, res: Result) -> list[Region]:
    """Walk AVML v2 blocks: header, a framed snappy stream, its length as a u64."""
    from kcore import codecs

    res.format, res.detail = "avml", "AVML image (snappy-compressed blocks)"
    pos, blocks, memory = 0, 0, 0
    checked = pages = zero = 0
    while pos < res.size:
        blocks += 1
        if blocks > MAX_AVML_BLOCKS:
            raise Broken(pos, f"more than {MAX_AVML_BLOCKS} AVML blocks")
        magic, version, start, end, _pad = AVML_HEADER.unpack(
            _read(fd, pos, AVML_HEADER.size, res.size, "AVML block header"))
        if magic != AVML_MAGIC or version != 2:
            raise Broken(pos, f"bad AVML block header (magic {magic:#x}, version {version})")
        if end < start:
            raise Broken(pos, f"AVML block end {end:#x} below its start {start:#x}")
        want = end - start + 1  # the end is inclusive, as in LiME's header
        stream = pos + AVML_HEADER.size
        at, produced = stream, 0
        while produced < want:  # snappy framing: type, 3-byte length, payload
            head = _read(fd, at, 9, res.size, "snappy frame header")
            kind, length = head[0], int.from_bytes(head[1:4], "little")
            if kind == 0x00:  # compressed: CRC, then the raw stream's varint length
                more = _read(fd, at + 9, max(0, min(4, length - 5)), res.size, "snappy frame")
                produced += _varint(head[8:] + more, at + 8)
            elif kind == 0x01:  # uncompressed: CRC, then the bytes
                produced += length - 4
            elif kind != 0xFF and not 0x80 <= kind <= 0xFE:
                raise Broken(at, f"bad snappy frame type {kind:#x}")
            if at + 4 + length > res.size:
                raise Broken(at, f"truncated snappy frame: {length:#x} bytes at {at + 4:#x}, "
                                 f"the file ends at {res.size:#x}")
            at += 4 + length
        if produced != want:
            raise Broken(at, f"AVML block at {pos:#x} holds {produced:#x} bytes, its header "
                             f"says {want:#x}")
        (trailer,) = struct.unpack("<Q", _read(fd, at, 8, res.size, "AVML block length"))
        if trailer != at - stream:
            raise Broken(at, f"AVML block length {trailer:#x} is not its stream's "
                             f"{at - stream:#x} bytes")
        if want <= AVML_CHECK_MAX:  # decompress it (CRC-32C of each chunk checked)
            out = bytearray(want)
            rc, got, bad = codecs.snappy_unframe(pread_full(fd, at - stream, stream), out)
            if rc != 0 or got != want:
                raise Broken(stream + bad, f"AVML block at {pos:#x}: its snappy stream does "
                                           f"not decompress ({os.strerror(-rc) if rc else ''}"
                                           f"{got:#x} of {want:#x} bytes)")
            checked += 1
            pages += -(-want // PAGE)
            zero += sum(out[i:i + PAGE] == ZERO_PAGE[:len(out[i:i + PAGE])]
                        for i in range(0, want, PAGE))
        memory += want
        pos = at + 8
    res.structure = (f"{blocks} AVML blocks chained to the end of the file, {checked} "
                     f"decompressed: valid")
    if checked == blocks and pages:
        res.pages = {"memory": pages, "zero": zero, "zero_share": round(zero / pages, 4),
                     "unreadable": None, "unreadable_share": None}
    res.ranges["count"] = blocks
    res.ranges["memory_bytes"] = memory
    _no_notes(res, volatility="Volatility's AVMLLayer opens it when the snappy library is "
                              "installed",
              drgn="drgn does not open AVML images (avml-convert makes a LiME image)",
              crash="crash does not open AVML images")
    return []


KDUMP_BATCH = 1024  # page descriptors checked (and their pages decompressed) at a time


def _kdump(fd: int, res: Result) -> list[Region]:
    """makedumpfile's kdump-compressed format: headers, bitmaps, every page descriptor, and
    every page decompressed to exactly one page (kcore.wire.diskdump, kcore.codecs)."""
    from kcore import codecs
    from kcore.wire import diskdump as dd

    res.format, res.detail = "kdump", "kdump-compressed (makedumpfile's diskdump format)"
    hdr = dd.DiskDumpHeader.unpack(_read(fd, 0, dd.HEADER.size, res.size, "disk_dump_header"))
    try:
        dd.check_header(hdr, res.size)
        bs = hdr.block_size
        sub = dd.SubHeader.unpack(_read(fd, bs, dd.SUB_HEADER.size, res.size,
                                        "kdump_sub_header"), hdr.header_version)
        mapnr = dd.check_sub(hdr, sub, res.size)
    except dd.LayoutError as exc:
        raise Broken(exc.offset, str(exc)) from None
    info = None
    if sub.size_vmcoreinfo:
        info = _read(fd, sub.offset_vmcoreinfo, sub.size_vmcoreinfo, res.size, "VMCOREINFO")
    _vmcoreinfo(res, info)
    res.vmcoreinfo["offset"] = sub.offset_vmcoreinfo if info is not None else None
    half = hdr.bitmap_blocks * bs // 2
    bitmap_at = (1 + hdr.sub_hdr_size) * bs
    _read(fd, bitmap_at, 2 * half, res.size, "bitmaps")  # bounds only
    dumped = dd.runs_of(pread_full(fd, half, bitmap_at + half), mapnr)
    npages = sum(n for _f, n in dumped)
    desc_at = bitmap_at + 2 * half
    data_at = desc_at + npages * dd.PAGE_DESC.size
    if data_at > res.size:
        raise Broken(desc_at, f"{npages} page descriptors at {desc_at:#x} run past the end of "
                              f"the file ({res.size:#x}): truncated")
    zero = 0
    window, dst = bytearray((4 << 20) + bs), bytearray(KDUMP_BATCH * bs)
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for first in range(0, npages, KDUMP_BATCH):
            count = min(KDUMP_BATCH, npages - first)
            raw = pread_full(fd, count * dd.PAGE_DESC.size, desc_at + first * dd.PAGE_DESC.size)
            for i in range(count):
                offset, size, flags, _pf = dd.PAGE_DESC.unpack_from(raw, i * dd.PAGE_DESC.size)
                at = desc_at + (first + i) * dd.PAGE_DESC.size
                if offset < data_at or offset + size > res.size or not 0 < size <= bs:
                    raise Broken(at, f"page descriptor {first + i}: {size:#x} bytes at "
                                     f"{offset:#x} lie outside the page data "
                                     f"({data_at:#x}-{res.size:#x})")
                if flags & ~dd.DH_CODECS or bin(flags).count("1") > 1:
                    raise Broken(at, f"page descriptor {first + i}: unknown flags {flags:#x}")
                if not flags and size != bs:
                    raise Broken(at, f"page descriptor {first + i}: an uncompressed page of "
                                     f"{size:#x} bytes")
            rc, bad = codecs.kdump_unpack(fd, raw, count, bs, window, dst, null, 0)
            if rc != 0:
                at = desc_at + (first + bad) * dd.PAGE_DESC.size
                raise Broken(at, f"page {first + bad} (descriptor at {at:#x}) does not "
                                 f"decompress to one page ({os.strerror(-rc)})")
            zero_page = bytes(bs)
            zero += sum(dst[i * bs:(i + 1) * bs] == zero_page for i in range(count))
    finally:
        os.close(null)
    res.structure = (f"headers, bitmaps, {npages} page descriptors, every page decompressed: "
                     f"valid")
    res.ranges["count"] = len(dumped)
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


def _varint(data: bytes, where: int) -> int:
    """A snappy varint (the uncompressed length at the start of a raw stream)."""
    value = 0
    for i, b in enumerate(data[:5]):
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return value
    raise Broken(where, "bad snappy length varint")


def _flattened(fd: int, res: Result) -> list[Region]:
    """Walk makedumpfile's flattened records (offset, size big-endian, then the bytes)."""
    from kcore.wire import flattened as flat

    res.format, res.detail = "flattened", "makedumpfile flattened format (-F)"
    head = _read(fd, 0, flat.HEADER_SIZE, res.size, "flattened header")
    _sig, type_, version = flat.HEADER.unpack_from(head)
    if type_ != flat.TYPE_FLAT_HEADER or version != flat.VERSION_FLAT_HEADER:
        raise Broken(16, f"flattened header type {type_} version {version} (expected 1, 1)")
    pos, records = flat.HEADER_SIZE, 0
    while True:
        offset, size = flat.RECORD.unpack(_read(fd, pos, flat.RECORD.size, res.size,
                                                "flattened record"))
        if offset == flat.END_FLAG and size == flat.END_FLAG:
            pos += flat.RECORD.size
            break
        records += 1
        if offset < 0 or size < 0 or records > MAX_FLAT_RECORDS:
            raise Broken(pos, f"bad flattened record (offset {offset}, size {size})")
        if pos + flat.RECORD.size + size > res.size:
            raise Broken(pos, f"truncated flattened record: {size:#x} bytes at {pos + 16:#x}, "
                              f"the file ends at {res.size:#x}")
        pos += flat.RECORD.size + size
    if pos != res.size:
        res.warnings.append(f"{res.size - pos} bytes after the end marker (from {pos:#x})")
    res.structure = f"{records} flattened records up to the end marker: valid"
    res.ranges["count"] = records
    _no_notes(res, volatility="Volatility does not open flattened dumps",
              drgn="drgn refuses makedumpfile's flattened format: rearrange it with "
                   "makedumpfile -R first",
              crash="",
              volatility_ok=False)
    res.consumers["crash"] = {"ok": True, "why": "crash reads flattened files (it rearranges "
                              "them in memory first)"}
    res.vmcoreinfo = {"present": None, "why": "inside the flattened stream (not checked)"}
    return []


def _raw(res: Result, manifest: dict[str, Any] | None) -> list[Region]:
    fmt = (manifest or {}).get("format")
    res.format = str(fmt)
    res.detail = ("physical image, file offset = physical address" if fmt == "raw"
                  else "physical image with zeros written (LiME padded)")
    regions = []
    for i, r in enumerate(manifest_ranges(manifest or {})):
        paddr, size = r.paddr, r.size
        if paddr is None:
            raise Broken(None, f"the manifest's ranges[{i}] has no paddr")
        if paddr + size > res.size:
            raise Broken(res.size, f"range {paddr:#x}+{size:#x} ends past the end of the file "
                                   f"({res.size:#x}): truncated")
        regions.append(Region(paddr, size, size, paddr))
    res.structure = f"{len(regions)} ranges of the manifest lie inside the file"
    res.ranges["count"] = len(regions)
    res.ranges["memory_bytes"] = sum(r.memsz for r in regions)
    _no_notes(res, volatility="a raw physical image: Volatility's raw layer opens it",
              drgn="drgn opens ELF and kdump-compressed cores, not raw images",
              crash="crash opens a raw image only as `crash vmlinux FILE@0` (ramdump)")
    return regions


# ---- the data pass -----------------------------------------------------------------------

def _data_pass(fd: int, size: int, regions: list[Region], hashing: bool
               ) -> tuple[str | None, list[str], int, int]:
    """SHA-256, per-chunk SHA-256s and (zero pages, pages) of the regions, in one read."""
    total = hashlib.sha256() if hashing else None
    chunk = hashlib.sha256() if hashing else None
    chunk_left = CHUNK
    chunks: list[str] = []
    zero = pages = 0
    cuts = sorted({0, size, *(p for r in regions for p in (r.offset, r.offset + r.filesz)
                              if 0 <= p <= size and r.kind != "text")})
    # kernel text repeats RAM: its pages are counted once, as RAM
    inside = [(r.offset, r.offset + r.filesz) for r in regions if r.filesz and r.kind != "text"]
    counted = 0  # regions are counted once even where they share file bytes
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        counting = any(a <= lo and hi <= b for a, b in inside) and lo >= counted
        if counting:
            counted = hi
        if not hashing and not counting:
            continue
        pos = lo
        while pos < hi:
            hole = _hole_until(fd, pos, hi)
            if hole - pos >= BLOCK and not hashing:
                skip = (hole - pos) // PAGE * PAGE
                zero += skip // PAGE
                pages += skip // PAGE
                pos += skip
                continue
            n = min(BLOCK, hi - pos)
            block = _read_block(fd, pos, n, hole)
            if hashing:
                assert total is not None and chunk is not None
                total.update(block)
                view = memoryview(block)
                while view:
                    take = min(chunk_left, len(view))
                    chunk.update(view[:take])
                    chunk_left -= take
                    view = view[take:]
                    if chunk_left == 0:
                        chunks.append(chunk.hexdigest())
                        chunk, chunk_left = hashlib.sha256(), CHUNK
            if counting:
                if n == BLOCK and block == ZERO_BLOCK:
                    zero += n // PAGE
                    pages += n // PAGE
                else:
                    for i in range(0, n, PAGE):
                        pages += 1
                        zero += block[i:i + PAGE] == ZERO_PAGE[:min(PAGE, n - i)]
            pos += n
    if hashing:
        assert total is not None and chunk is not None
        if chunk_left != CHUNK:
            chunks.append(chunk.hexdigest())
        return total.hexdigest(), chunks, zero, pages
    return None, chunks, zero, pages


def _hole_until(fd: int, pos: int, hi: int) -> int:
    """Where data starts again at or after pos (hi at most): pos when pos holds data."""
    try:
        return min(os.lseek(fd, pos, os.SEEK_DATA), hi)
    except OSError as exc:
        return hi if exc.errno == errno.ENXIO else pos


def _read_block(fd: int, pos: int, n: int, hole_end: int) -> bytes:
    """n bytes at pos; a hole is not read (zeros)."""
    if hole_end >= pos + n:
        return ZERO_BLOCK[:n] if n <= BLOCK else bytes(n)
    data = pread_full(fd, n, pos)
    if len(data) < n:
        raise Broken(pos + len(data), "the file shrank while it was read")
    return data


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, end) extents of a sparse file that hold data (SEEK_DATA/SEEK_HOLE)."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            return [(0, size)]  # the filesystem cannot say: all of it
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


def sparse_chunk_digests(fd: int, size: int) -> dict[str, str]:
    """The SHA-256 of each CHUNK of a sparse file that holds data, by chunk index (the kcore
    image's manifest: its other chunks are holes)."""
    chunks = sorted({i for a, b in data_extents(fd, size)
                     for i in range(a // CHUNK, (b - 1) // CHUNK + 1)})
    out = {}
    for i in chunks:
        h = hashlib.sha256()
        lo, hi = i * CHUNK, min((i + 1) * CHUNK, size)
        pos = lo
        while pos < hi:
            n = min(BLOCK, hi - pos)
            h.update(_read_block(fd, pos, n, _hole_until(fd, pos, pos + n)))
            pos += n
        out[str(i)] = h.hexdigest()
    return out


# ---- sidecars ----------------------------------------------------------------------------

def _times(path: str, res: Result, manifest: dict[str, Any] | None) -> None:
    """The read-time windows: the manifest's, checked against DUMP.times where it is."""
    from kcore.pagetimes import SUFFIX, PageTimes, windows_ok

    said = (manifest or {}).get("times")
    if isinstance(said, dict) and windows_ok(said):
        res.times = {k: said[k] for k in ("dump", "critical", "critical_share") if k in said}
    if not os.path.exists(path + SUFFIX):
        if isinstance(said, dict) and said.get("sidecar"):
            res.problem(None, f"{path}{SUFFIX} (the read times the manifest lists) is missing")
        return
    try:
        got = PageTimes.load(path + SUFFIX).summary()
    except InputError as exc:
        res.problem(None, str(exc))
        return
    res.times = {k: got[k] for k in ("dump", "critical", "critical_share") if k in got}
    res.times["records"] = got["records"]
    if isinstance(said, dict) and said.get("records") != got["records"]:
        res.problem(None, f"{path}{SUFFIX} holds {got['records']} records, the manifest says "
                          f"{said.get('records')}")


def _sidecars(path: str, res: Result) -> tuple[dict[str, Any] | None, str | None]:
    manifest = None
    try:
        manifest = load_manifest(sidecar_path(path), res.size)
    except ManifestError as exc:
        res.problem(None, f"{sidecar_path(path)} (the manifest) is unusable: {exc}")
    sidecar = None
    try:
        with open(path + ".sha256", "rb") as f:
            word = f.read(4096).split(maxsplit=1)
        sidecar = word[0].decode("ascii", "replace").lower() if word else ""
    except FileNotFoundError:
        sidecar = None
    except OSError as exc:
        res.problem(None, f"{path}.sha256 is unreadable: {exc.strerror}")
    return manifest, sidecar


def _compare_ranges(res: Result, manifest: dict[str, Any], regions: list[Region]) -> None:
    want = manifest.get("ranges")
    if not isinstance(want, list) or res.format not in ("elf", "lime"):
        return
    listed = manifest_ranges(manifest)
    if any(r.offset is None for r in listed):
        res.problem(None, "the manifest's ranges have no file offsets")
        return
    expect = {(r.offset, r.size) for r in listed}
    have = {(r.offset, r.filesz) for r in regions if r.filesz or res.format != "elf"}
    if expect == have:
        res.ranges["manifest"] = "match"
        return
    res.ranges["manifest"] = "differ"
    missing = sorted(expect - have)
    extra = sorted(have - expect)
    first = (f"the manifest's range at file offset {missing[0][0]:#x} ({missing[0][1]:#x} "
             f"bytes) is not in the file" if missing else
             f"the file's range at {extra[0][0]:#x} ({extra[0][1]:#x} bytes) is not in the "
             f"manifest")
    res.problem(missing[0][0] if missing else extra[0][0],
                f"ranges differ from the manifest: {first}")


# ---- the whole check -------------------------------------------------------------------

def verify(path: str) -> Result:
    """Check one dump file; problems are in the result (InputError when it is not a file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: not a regular file (verify checks dump files)")
        os.set_blocking(fd, True)  # O_NONBLOCK only kept a FIFO from hanging the open
        res = Result(path=path, size=st.st_size)
        return _verify(fd, path, res)
    finally:
        os.close(fd)


def _verify(fd: int, path: str, res: Result) -> Result:
    manifest, sidecar = _sidecars(path, res)
    if res.size == 0:
        raise InputError(f"{path}: empty file (no dump to verify)")
    head = pread_full(fd, 64, 0)
    regions: list[Region] = []
    try:
        if head[:4] == b"\x7fELF":
            regions, _core = _elf(fd, path, res)
        elif head[:4] == struct.pack("<I", LIME_MAGIC):
            regions = _lime(fd, path, res)
        elif head[:4] == struct.pack("<I", AVML_MAGIC):
            regions = _avml(fd, res)
        elif is_flattened(head):
            regions = _flattened(fd, res)
        elif head[:8] in (KDUMP_SIGNATURE, b"DISKDUMP"):
            regions = _kdump(fd, res)
        elif manifest is not None and manifest.get("format") in ("raw", "padded"):
            regions = _raw(res, manifest)
        else:
            raise InputError(f"{path}: not a dump kcore knows (no ELF, LiME, AVML, kdump or "
                             f"flattened signature at offset 0x0, and no {path}.json saying "
                             f"it is raw)")
    except Broken as exc:
        res.structure = "broken"
        res.problem(exc.where, exc.what)
    if manifest is not None:
        mfmt = manifest.get("format")
        if mfmt and res.format != "unknown" and mfmt != res.format:
            res.problem(0, f"the manifest says format {mfmt}, the file is {res.format}")
        msize = manifest.get("size")
        if isinstance(msize, int) and msize != res.size:
            what = "truncated" if res.size < msize else "longer than written"
            res.problem(min(msize, res.size), f"the file is {res.size:#x} bytes, the manifest "
                                              f"says {msize:#x}: {what}")
        if res.structure != "broken":
            _compare_ranges(res, manifest, regions)
        release, noted = manifest.get("kernel_release"), res.vmcoreinfo.get("osrelease")
        if release and noted and release != noted:
            res.problem(res.vmcoreinfo.get("offset"), f"VMCOREINFO says OSRELEASE={noted}, "
                                                      f"the manifest {release}")
    _times(path, res, manifest)
    # Hash only what can be compared: a digest beside the file or in the manifest.
    listed = (manifest or {}).get("chunks")
    hashing = res.format != "kcore" and (sidecar is not None or bool(
        (manifest or {}).get("sha256")) or isinstance(listed, dict) and isinstance(
        listed.get("sha256"), list))
    allocated = os.fstat(fd).st_blocks * 512
    if hashing and res.size > 1 << 40 and allocated < res.size // 16:
        hashing = False  # a sparse file of terabytes: its digest would take hours
        res.warnings.append(f"not hashed: {human_size(res.size)} apparent, "
                            f"{human_size(allocated)} allocated")
    try:
        digest, chunks, zero, pages = _data_pass(fd, res.size, regions if res.structure !=
                                                 "broken" else [], hashing)
    except Broken as exc:
        res.problem(exc.where, exc.what)
        return res
    res.sha256 = digest
    unread = (manifest or {}).get("pages_zero_filled")
    if res.pages and res.pages.get("unreadable") is None and isinstance(unread, int):
        res.pages["unreadable"] = unread
        res.pages["unreadable_share"] = round(unread / res.pages["memory"], 6) \
            if res.pages.get("memory") else None
    _compare_digests(res, manifest, sidecar, digest, chunks)
    elided = sum(r.memsz - r.filesz for r in regions if r.kind != "text")
    left_out = (manifest or {}).get("bytes_elided")
    if res.format in ("lime", "avml") and isinstance(left_out, int) and \
            "memory_bytes" in res.ranges:
        elided += left_out  # zero runs left out of the file, said by the manifest
        res.ranges["memory_bytes"] += left_out
        if res.format == "avml" and res.pages.get("memory"):
            res.pages["memory"] += left_out // PAGE
            res.pages["zero"] += left_out // PAGE
            res.pages["zero_share"] = round(res.pages["zero"] / res.pages["memory"], 4)
    if res.structure != "broken":
        check_symbols(path, res, (manifest or {}).get("kernel_release"))
    if res.structure != "broken" and regions:
        memory = pages + elided // PAGE
        unreadable = (manifest or {}).get("pages_zero_filled")
        res.pages = {
            "memory": memory,
            "zero": zero + elided // PAGE,
            "zero_share": round((zero + elided // PAGE) / memory, 4) if memory else None,
            "unreadable": unreadable,
            "unreadable_share": round(unreadable / memory, 6)
            if isinstance(unreadable, int) and memory else None,
        }
    return res


def human_size(n: int) -> str:
    """Bytes in binary units."""
    from kcore.output import human

    return human(n)


def _compare_sparse_chunks(res: Result, want: dict[str, Any]) -> None:
    """The kcore image's chunks that hold data against the manifest's digests of them."""
    fd = os.open(res.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        have = sparse_chunk_digests(fd, res.size)
    finally:
        os.close(fd)
    zeros: dict[int, str] = {}

    def zero_digest(i: int) -> str:  # a chunk of zeros is the same as a hole
        n = min(CHUNK, res.size - i * CHUNK)
        if n not in zeros:
            h = hashlib.sha256()
            for pos in range(0, n, BLOCK):
                h.update(ZERO_BLOCK[:min(BLOCK, n - pos)])
            zeros[n] = h.hexdigest()
        return zeros[n]

    bad = sorted({int(k) for k in set(have) | set(want)
                  if (have.get(k) or zero_digest(int(k))) != (want.get(k) or zero_digest(int(k)))})
    res.chunks = {"size": CHUNK, "count": len(have), "manifest": len(want), "differ": bad[:64]}
    if bad:
        i = bad[0]
        what = ("holds data where the manifest has a hole" if str(i) not in want else
                "is a hole where the manifest has data" if str(i) not in have else
                "differs from the manifest's digest")
        res.problem(i * CHUNK, f"chunk {i} (bytes {i * CHUNK:#x}-{(i + 1) * CHUNK:#x}) {what} "
                               f"({len(bad)} chunks differ)")


def _compare_digests(res: Result, manifest: dict[str, Any] | None, sidecar: str | None,
                     digest: str | None, chunks: list[str]) -> None:
    name = os.path.basename(res.path)
    listed = (manifest or {}).get("chunks") or {}
    if isinstance(listed, dict) and isinstance(listed.get("sha256"), dict):
        _compare_sparse_chunks(res, listed["sha256"])
    if digest is None:
        res.digest["sha256"] = ("not computed (the sparse kcore image has none)"
                                if res.format == "kcore" else
                                "not computed (no DUMP.sha256 or manifest digest to compare)")
        return
    for label, want in ((f"{name}.sha256", sidecar),
                        ("the manifest", (manifest or {}).get("sha256"))):
        if want is None:
            res.digest[label] = "absent"
        elif want == digest:
            res.digest[label] = "match"
        else:
            res.digest[label] = "differs"
    listed = (manifest or {}).get("chunks") or {}
    want_chunks = listed.get("sha256") if isinstance(listed, dict) else None
    if isinstance(want_chunks, list) and listed.get("size") != CHUNK:
        res.warnings.append(f"the manifest's chunks are {listed.get('size')} bytes, not "
                            f"{CHUNK}: not compared")
    elif isinstance(want_chunks, list):
        bad = [i for i, (a, b) in enumerate(zip(want_chunks, chunks, strict=False)) if a != b]
        res.chunks = {"size": CHUNK, "count": len(chunks), "manifest": len(want_chunks),
                      "differ": bad[:64]}
        if bad:
            i = bad[0]
            res.problem(i * CHUNK, f"chunk {i} (bytes {i * CHUNK:#x}-"
                                   f"{min((i + 1) * CHUNK, res.size):#x}) differs from the "
                                   f"manifest's digest ({len(bad)} of {len(chunks)} chunks "
                                   f"differ)")
        elif len(want_chunks) != len(chunks):
            res.problem(min(len(want_chunks), len(chunks)) * CHUNK,
                        f"{len(chunks)} chunks of 64 MiB, the manifest lists "
                        f"{len(want_chunks)}")
    if "differs" in res.digest.values() and not any(
            p["what"].startswith("chunk") for p in res.problems):
        which = " and ".join(k for k, v in res.digest.items() if v == "differs")
        res.problem(None, f"the SHA-256 {digest} differs from {which}: the file changed "
                          f"after it was written")
