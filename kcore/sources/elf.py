"""ELF cores with physical addresses: QEMU dump-guest-memory, kdump /proc/vmcore, kcore's dumps."""

from __future__ import annotations

import bisect
from typing import Any, NamedTuple

from kcore.addrmap import ALL_ONES
from kcore.errors import ElfFormatError, SourceError
from kcore.sources.base import Extent, MemorySource, Probe, check_extents
from kcore.sources.files import file_size, opened, pread_exact, pread_full
from kcore.wire.elf import (
    EHDR,
    ELF_MAGIC,
    ELFCLASS64,
    ELFDATA2LSB,
    ET_CORE,
    PHDR,
    PN_XNUM,
    PT_LOAD,
    PT_NOTE,
    SH_INFO_AT,
    SHDR_INFO,
    ElfCore,
    Phdr,
    parse_notes,
    vmcoreinfo_of,
)

# Caps that bound a hostile file's cost (kdump cores of huge machines stay far below them).
MAX_PHNUM = 1 << 20
MAX_NOTES_SIZE = 64 << 20
MAX_ALIAS_BYTES = 4 << 30  # overlapping (aliased) PT_LOAD bytes compared when opening
SMEAR_FIRST = 16  # differing pages listed by address
PAGE = 4096


def parse_elf_core(fd: int, path: str, *, size: int | None = None) -> ElfCore:
    """Parse an ELF64 LE core's header, program headers and notes, checking every bound."""
    if size is None:
        size = file_size(fd)
    if size == 0:
        raise ElfFormatError(f"{path}: empty file at offset 0x0")

    def need(offset: int, length: int, what: str) -> bytes:
        if offset + length > size:
            raise ElfFormatError(f"{path}: truncated {what} at offset {offset:#x} "
                                 f"(needs {length:#x} bytes, file ends at {size:#x})")
        try:
            return pread_exact(fd, offset, length, path, what)
        except SourceError as exc:
            raise ElfFormatError(str(exc)) from None

    (ident, e_type, e_machine, _ver, _entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize,
     e_phnum, _shentsize, _shnum, _shstrndx) = EHDR.unpack(need(0, EHDR.size, "ELF header"))
    if ident[:4] != ELF_MAGIC:
        raise ElfFormatError(f"{path}: not an ELF file (bad magic at offset 0x0)")
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise ElfFormatError(f"{path}: only 64-bit little-endian ELF cores are supported "
                             f"(e_ident at offset 0x4)")
    if e_type != ET_CORE:
        raise ElfFormatError(f"{path}: e_type {e_type} at offset 0x10 is not ET_CORE")
    phnum = e_phnum
    if phnum == PN_XNUM:  # the real count is in section header 0's sh_info (kdump, >65534 phdrs)
        (phnum,) = SHDR_INFO.unpack(need(e_shoff + SH_INFO_AT, 4, "section header 0"))
    if phnum and e_phentsize != PHDR.size:
        raise ElfFormatError(f"{path}: e_phentsize {e_phentsize} at offset 0x36 is not "
                             f"{PHDR.size}")
    if phnum > MAX_PHNUM:
        raise ElfFormatError(f"{path}: {phnum} program headers at offset {e_phoff:#x} "
                             f"(more than {MAX_PHNUM})")
    table = need(e_phoff, phnum * PHDR.size, "program header table")
    phdrs = [Phdr._make((*PHDR.unpack_from(table, i * PHDR.size), e_phoff + i * PHDR.size))
             for i in range(phnum)]
    notes: list[tuple[bytes, int, bytes]] = []
    for ph in phdrs:
        if ph.p_type == PT_LOAD and ph.p_offset + ph.p_filesz > size:
            raise ElfFormatError(
                f"{path}: PT_LOAD at offset {ph.at:#x} has data past the end of file "
                f"(p_offset {ph.p_offset:#x} + p_filesz {ph.p_filesz:#x} > {size:#x})")
        if ph.p_type == PT_NOTE and ph.p_filesz:
            if ph.p_filesz > MAX_NOTES_SIZE:
                raise ElfFormatError(f"{path}: PT_NOTE at offset {ph.at:#x} is absurdly large "
                                     f"({ph.p_filesz:#x} bytes)")
            notes += parse_notes(need(ph.p_offset, ph.p_filesz, "PT_NOTE data"),
                                 ph.p_offset, path)
    return ElfCore(e_machine, e_phoff, phdrs, notes, size)


class Smear(NamedTuple):
    """Where a second mapping of RAM (the kernel text PT_LOAD) overlaps the RAM loads."""

    overlap_pages: int  # pages both copies hold
    pages: int  # of those, pages whose two copies differ (read at different moments)
    first: list[int]  # the first differing pages' physical addresses

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, addresses as hex strings."""
        return {"overlap_pages": self.overlap_pages, "pages": self.pages,
                "first": [hex(a) for a in self.first]}


NO_SMEAR = Smear(0, 0, [])


def resolve_aliases(fd: int, path: str, loads: list[Phdr]) -> tuple[list[Extent], Smear]:
    """Extents of PT_LOADs by p_paddr, and the smear between RAM and its second mapping.

    kcore's TEXT load repeats RAM at __pa_symbol(_text), in /proc/kcore and in dumps made
    from it. The loads of the mapping that holds the most bytes (the same p_vaddr - p_paddr:
    the direct map), and those without a p_vaddr, are the memory; a load of another mapping
    fills only what they leave out, and where it overlaps them it is a second read of the
    same frames: on a live system some of its pages differ (kernel data in the image, freed
    init pages), counted as smear. Loads of the same mapping that overlap with different
    bytes are an
    ElfFormatError naming both program headers.
    """
    weight: dict[int, int] = {}
    for ph in loads:
        delta = (ph.p_vaddr - ph.p_paddr) & ALL_ONES
        weight[delta] = weight.get(delta, 0) + ph.p_filesz
    main = max(weight, key=lambda d: weight[d])
    primary: list[Phdr] = []
    second: list[Phdr] = []
    for ph in loads:  # a load without a virtual address (QEMU's) maps nothing twice
        same = (ph.p_vaddr - ph.p_paddr) & ALL_ONES == main or not ph.p_vaddr
        (primary if same else second).append(ph)
    out: list[Extent] = []
    ends: list[int] = []
    ats: list[int] = []  # the program header each extent came from
    budget = [MAX_ALIAS_BYTES]
    for ph in sorted(primary, key=lambda ph: (ph.p_paddr, -ph.p_filesz)):
        start, end = ph.p_paddr, ph.p_paddr + ph.p_filesz
        for i in range(bisect.bisect_right(ends, start), len(out)):
            e = out[i]
            if e.paddr >= end:
                break
            lo, hi = max(start, e.paddr), min(end, ends[i])
            if _differ(fd, path, e.offset + lo - e.paddr, ph.p_offset + lo - start, hi - lo,
                       lo, budget, ph.at, stop=True):
                raise ElfFormatError(
                    f"{path}: PT_LOADs at offsets {ats[i]:#x} and {ph.at:#x} overlap at "
                    f"physical {lo:#x} with different contents")
        covered = out[-1].paddr + out[-1].length if out else 0
        if end > covered:
            lo = max(start, covered)
            out.append(Extent(lo, end - lo, ph.p_offset + lo - start))
            ends.append(end)
            ats.append(ph.at)
    overlap = differ = 0
    first: list[int] = []
    starts = [e.paddr for e in out]
    extra: list[Extent] = []  # kept sorted by paddr, as out is
    extra_starts: list[int] = []
    for ph in sorted(second, key=lambda ph: ph.p_paddr):
        start, end = ph.p_paddr, ph.p_paddr + ph.p_filesz
        hits = sorted(_meeting(out, starts, start, end) + _meeting(extra, extra_starts, start,
                                                                   end))
        pos = start
        gaps = []
        for e in hits:
            lo, hi = max(start, e.paddr), min(end, e.paddr + e.length)
            overlap += (hi - lo) // PAGE
            differ += _differ(fd, path, e.offset + lo - e.paddr, ph.p_offset + lo - start,
                              hi - lo, lo, budget, ph.at, first=first)
            if lo > pos:
                gaps.append(Extent(pos, lo - pos, ph.p_offset + pos - start))
            pos = max(pos, hi)
        if pos < end:
            gaps.append(Extent(pos, end - pos, ph.p_offset + pos - start))
        for g in gaps:
            i = bisect.bisect_left(extra_starts, g.paddr)
            extra.insert(i, g)
            extra_starts.insert(i, g.paddr)
    return sorted(out + extra), Smear(overlap, differ, first[:SMEAR_FIRST])


def _meeting(extents: list[Extent], starts: list[int], start: int, end: int) -> list[Extent]:
    """The extents of a sorted, disjoint list (starts: their paddrs) that meet [start, end)."""
    hits = []
    for i in range(max(bisect.bisect_right(starts, start) - 1, 0), len(extents)):
        e = extents[i]
        if e.paddr >= end:
            break
        if e.paddr + e.length > start:
            hits.append(e)
    return hits


def _differ(fd: int, path: str, a: int, b: int, length: int, paddr: int, budget: list[int],
            at: int, *, stop: bool = False, first: list[int] | None = None) -> int:
    """How many pages of the file's bytes at offsets a and b differ (paddr names the first).

    Compared in 1 MiB steps, page by page where a step differs; `stop` returns at the first
    difference. The bytes compared over one open are capped (budget) against hostile files.
    """
    budget[0] -= length
    if budget[0] < 0:
        raise ElfFormatError(f"{path}: PT_LOADs overlap by more than {MAX_ALIAS_BYTES:#x} "
                             f"bytes (program header at {at:#x})")
    step, count = 1 << 20, 0
    for pos in range(0, length, step):
        n = min(step, length - pos)
        x, y = pread_full(fd, n, a + pos), pread_full(fd, n, b + pos)
        if x == y:
            continue
        if stop:
            return 1
        for i in range(0, n, PAGE):
            if x[i:i + PAGE] != y[i:i + PAGE]:
                count += 1
                if first is not None and len(first) < SMEAR_FIRST:
                    first.append(paddr + pos + i)
    return count


class ElfSource(MemorySource):
    """An ELF core whose PT_LOADs carry physical addresses in p_paddr."""

    kind = "elf"
    core: ElfCore  # the parsed headers and notes
    smear: Smear = NO_SMEAR  # pages the text load holds differently from the RAM loads

    @classmethod
    def open(cls, path: str, spec: str | None = None, root: str = "/") -> ElfSource:
        """Open and index an ELF core read-only; extents keyed by p_paddr."""
        with opened(path) as fd:
            core = parse_elf_core(fd, path)
            loads = [ph for ph in core.phdrs
                     if ph.p_type == PT_LOAD and ph.p_filesz and ph.p_paddr != ALL_ONES]
            if not loads:
                raise ElfFormatError(f"{path}: no PT_LOAD with a physical address (p_paddr) in "
                                     f"the program headers at offset {core.phoff:#x}")
            extents, smear = resolve_aliases(fd, path, loads)
            src = cls(spec or f"elf:{path}", path, fd,
                      check_extents(extents, path, ElfFormatError), vmcoreinfo_of(core))
            src.core = core
            src.smear = smear
            return src

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        """The ELF magic (a /proc/kcore among ELF cores is KcoreSource's, tried first)."""
        return probe.head[:4] == ELF_MAGIC
