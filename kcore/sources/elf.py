"""ELF cores with physical addresses: QEMU dump-guest-memory, kdump /proc/vmcore, kcore's dumps."""

from __future__ import annotations

import bisect
import os

from kcore.addrmap import ALL_ONES
from kcore.errors import ElfFormatError, SourceError
from kcore.sources.base import Extent, MemorySource, Probe, check_extents
from kcore.sources.files import file_size, opened, pread_exact
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


def resolve_aliases(fd: int, path: str, loads: list[Phdr]) -> list[Extent]:
    """Extents of PT_LOADs by p_paddr, where overlaps must hold the same bytes (aliases).

    kcore's TEXT load repeats RAM at __pa_symbol(_text), in /proc/kcore and in dumps made
    from it; such an overlap is the same memory twice and is kept once. Overlapping loads
    whose bytes differ are an ElfFormatError naming both program headers.
    """
    out: list[Extent] = []
    ends: list[int] = []
    ats: list[int] = []  # the program header each extent came from
    compared = 0
    for ph in sorted(loads, key=lambda ph: (ph.p_paddr, -ph.p_filesz)):
        start, end = ph.p_paddr, ph.p_paddr + ph.p_filesz
        for i in range(bisect.bisect_right(ends, start), len(out)):
            e, at = out[i], ats[i]
            if e.paddr >= end:
                break
            lo, hi = max(start, e.paddr), min(end, ends[i])
            compared += hi - lo
            if compared > MAX_ALIAS_BYTES:
                raise ElfFormatError(f"{path}: PT_LOADs overlap by more than "
                                     f"{MAX_ALIAS_BYTES:#x} bytes (program header at {ph.at:#x})")
            if not _same_bytes(fd, e.offset + lo - e.paddr, ph.p_offset + lo - start, hi - lo):
                raise ElfFormatError(
                    f"{path}: PT_LOADs at offsets {at:#x} and {ph.at:#x} overlap at physical "
                    f"{lo:#x} with different contents")
        covered = out[-1].paddr + out[-1].length if out else 0
        if end > covered:
            lo = max(start, covered)
            out.append(Extent(lo, end - lo, ph.p_offset + lo - start))
            ends.append(end)
            ats.append(ph.at)
    return out


def _same_bytes(fd: int, a: int, b: int, length: int) -> bool:
    """Whether the file holds the same bytes at offsets a and b (compared in 1 MiB steps)."""
    step = 1 << 20
    for pos in range(0, length, step):
        n = min(step, length - pos)
        if os.pread(fd, n, a + pos) != os.pread(fd, n, b + pos):
            return False
    return True


class ElfSource(MemorySource):
    """An ELF core whose PT_LOADs carry physical addresses in p_paddr."""

    kind = "elf"
    core: ElfCore  # the parsed headers and notes

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
            extents = resolve_aliases(fd, path, loads)
            src = cls(spec or f"elf:{path}", path, fd,
                      check_extents(extents, path, ElfFormatError), vmcoreinfo_of(core))
            src.core = core
            return src

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        """The ELF magic (a /proc/kcore among ELF cores is KcoreSource's, tried first)."""
        return probe.head[:4] == ELF_MAGIC
