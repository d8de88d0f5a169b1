"""ELF64 little-endian cores on the wire: headers, notes, kcore's note payloads, machines.

The one home of these layouts (include/uapi/linux/elf.h, elfcore.h): kcore's own header
(kcore.elfcore) and the compact ELF dump (kcore.formats.elf) are written with them; read_core()
is the one walker of an ELF core, which the ELF sources (kcore.sources.elf), `kcore verify`
and the kept symbols' reader call.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from kcore.errors import ElfFormatError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE = 2, 1, 1, 0
ET_CORE = 4
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
PF_RWX = PF_R | PF_W | PF_X
PN_XNUM = 0xFFFF  # e_phnum of a core with more headers: the count is in section 0's sh_info
NT_PRSTATUS, NT_PRPSINFO, NT_TASKSTRUCT = 1, 3, 4
CORE_NAME = b"CORE"
VMCOREINFO_NAME = b"VMCOREINFO"
# kcore's own notes: one file of the dumped system each (its BTF, kallsyms...). Readers skip
# notes whose owner they do not know (crash, drgn, gdb, makedumpfile, Volatility: tested).
KCORE_NAME = b"KCORE"
# desc: the file's path under the root, NUL, then its bytes as a zlib stream. The type is
# "KSYM" in ASCII, a number no core-note type takes: BFD (gdb, readelf) reads types 1-6 as
# NT_PRSTATUS... whatever the owner, and a KCORE note of type 1 looked to them like a thread.
NT_KCORE_FILE = 0x4D59534B

# e_machine per architecture (uname -m, and the arm64 spelling)
EM_BY_ARCH = {"x86_64": 62, "aarch64": 183, "arm64": 183, "riscv64": 243, "s390x": 22}
# sizeof(struct elf_prstatus) per architecture (its register set differs)
PRSTATUS_SIZE = {"x86_64": 336, "aarch64": 392, "arm64": 392}

# Elf64_Ehdr: e_ident e_type e_machine e_version e_entry e_phoff e_shoff e_flags e_ehsize
# e_phentsize e_phnum e_shentsize e_shnum e_shstrndx
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# Elf64_Phdr: p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz p_align
PHDR = struct.Struct("<IIQQQQQQ")
NHDR = struct.Struct("<III")  # Elf64_Nhdr: n_namesz n_descsz n_type
# Elf64_Shdr: sh_name sh_type sh_flags sh_addr sh_offset sh_size sh_link sh_info sh_addralign
# sh_entsize
SHDR = struct.Struct("<IIQQQQIIQQ")
SHT_NOBITS = 8  # a section with no bytes in the file
SHDR_INFO = struct.Struct("<I")  # Elf64_Shdr.sh_info, at byte SH_INFO_AT of a section header
SH_INFO_AT = 44
E_IDENT = ELF_MAGIC + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE]) + bytes(8)

# struct elf_prpsinfo, 64-bit: pr_state pr_sname pr_zomb pr_nice, pr_flag, pr_uid pr_gid,
# pr_pid pr_ppid pr_pgrp pr_sid, pr_fname[16], pr_psargs[ELF_PRARGSZ]
PRPSINFO = struct.Struct("<bbbb4xQIIiiii16s80s")
ELF_PRARGSZ = 80


def ehdr(machine: int, phnum: int) -> bytes:
    """An ET_CORE ELF header whose program headers follow it."""
    return EHDR.pack(E_IDENT, ET_CORE, machine, EV_CURRENT, 0, EHDR.size, 0, 0, EHDR.size,
                     PHDR.size, phnum, 0, 0, 0)


def phdr(p_type: int, p_flags: int, p_offset: int, p_vaddr: int, p_paddr: int, p_filesz: int,
         p_memsz: int, p_align: int) -> bytes:
    """One program header."""
    return PHDR.pack(p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align)


def align4(n: int) -> int:
    """n rounded up to the notes' 4-byte alignment."""
    return (n + 3) & ~3


def note_size(name: bytes, descsz: int) -> int:
    """The bytes one note takes: header, NUL-terminated name and descriptor, each padded."""
    return NHDR.size + align4(len(name) + 1) + align4(descsz)


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note: header, NUL-terminated name and descriptor, each padded to 4 bytes."""
    namesz = len(name) + 1
    return (NHDR.pack(namesz, len(desc), ntype) + name + bytes(align4(namesz) - len(name))
            + desc + bytes(align4(len(desc)) - len(desc)))


def pack_prpsinfo(state: str, fname: bytes, psargs: bytes) -> bytes:
    """An elf_prpsinfo with only pr_sname, pr_fname and pr_psargs set."""
    return PRPSINFO.pack(0, ord(state), 0, 0, 0, 0, 0, 0, 0, 0, 0, fname, psargs)


def prpsinfo_psargs(desc: bytes) -> bytes:
    """pr_psargs of an elf_prpsinfo note's descriptor, up to its first NUL."""
    fields = PRPSINFO.unpack_from(desc.ljust(PRPSINFO.size, b"\0"))
    psargs: bytes = fields[-1]
    return psargs.split(b"\0")[0]


class Phdr(NamedTuple):
    """One ELF64 program header, and where it sits in the file."""

    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_align: int
    at: int  # file offset of this program header


class ElfCore(NamedTuple):
    """The parts of an ELF core a memory source needs."""

    e_machine: int
    phoff: int
    phdrs: list[Phdr]
    notes: list[tuple[bytes, int, bytes]]  # (name, type, desc)
    size: int


def parse_notes(data: bytes, base: int, path: str) -> list[tuple[bytes, int, bytes]]:
    """Split PT_NOTE contents into (name, type, desc) with 4-byte alignment, checking bounds."""
    out = []
    pos = 0
    while pos + NHDR.size <= len(data):
        namesz, descsz, ntype = NHDR.unpack_from(data, pos)
        name_at = pos + NHDR.size
        desc_at = name_at + align4(namesz)
        end = desc_at + align4(descsz)
        if desc_at + descsz > len(data):
            raise ElfFormatError(f"{path}: truncated note at offset {base + pos:#x}",
                                 offset=base + pos)
        if namesz and data[name_at + namesz - 1] != 0:
            raise ElfFormatError(f"{path}: note name {data[name_at:name_at + namesz][:16]!r} "
                                 f"at offset {base + pos:#x} has no NUL in its n_namesz "
                                 f"{namesz}", offset=base + pos, field="n_namesz")
        name = data[name_at:name_at + namesz].rstrip(b"\0")
        out.append((name, ntype, data[desc_at:desc_at + descsz]))
        if namesz == 0 and descsz == 0 and ntype == 0:
            break  # zero padding after the last note
        pos = end
    return out


def find_note(core: ElfCore, name: bytes, ntype: int | None = None) -> bytes | None:
    """The desc of the first note named name (and of type ntype, if given)."""
    for n_name, n_type, desc in core.notes:
        if n_name == name and (ntype is None or n_type == ntype):
            return desc
    return None


def vmcoreinfo_of(core: ElfCore) -> bytes | None:
    """The desc of the VMCOREINFO note, if the core has one."""
    return find_note(core, VMCOREINFO_NAME)


# Caps that bound a hostile file's cost (kdump cores of huge machines stay far below them).
MAX_PHNUM = 1 << 20
MAX_NOTES_SIZE = 64 << 20


def read_core(read: Callable[[int, int, str], bytes], size: int, path: str) -> ElfCore:
    """Parse an ELF64 LE core of size bytes (read(offset, length, what) gives exactly those
    bytes): its header, program headers and notes, every bound checked. ElfFormatError,
    naming path, the offset and the field, at the first one that makes no sense."""
    if size == 0:
        raise ElfFormatError(f"{path}: empty file at offset 0x0", offset=0)

    def need(offset: int, length: int, what: str) -> bytes:
        if offset + length > size:
            raise ElfFormatError(f"{path}: truncated {what} at offset {offset:#x} "
                                 f"(needs {length:#x} bytes, file ends at {size:#x})",
                                 offset=offset)
        return read(offset, length, what)

    (ident, e_type, e_machine, _ver, _entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize,
     e_phnum, _shentsize, _shnum, _shstrndx) = EHDR.unpack(need(0, EHDR.size, "ELF header"))
    if ident[:4] != ELF_MAGIC:
        raise ElfFormatError(f"{path}: not an ELF file (bad magic at offset 0x0)", offset=0,
                             field="e_ident")
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise ElfFormatError(f"{path}: only 64-bit little-endian ELF cores are supported "
                             f"(e_ident at offset 0x4)", offset=4, field="e_ident")
    if e_type != ET_CORE:
        raise ElfFormatError(f"{path}: e_type {e_type} at offset 0x10 is not ET_CORE",
                             offset=0x10, field="e_type")
    phnum = e_phnum
    if phnum == PN_XNUM:  # the real count is in section header 0's sh_info (kdump, >65534 phdrs)
        (phnum,) = SHDR_INFO.unpack(need(e_shoff + SH_INFO_AT, 4, "section header 0"))
    if phnum and e_phentsize != PHDR.size:
        raise ElfFormatError(f"{path}: e_phentsize {e_phentsize} at offset 0x36 is not "
                             f"{PHDR.size}", offset=0x36, field="e_phentsize")
    if phnum > MAX_PHNUM:
        raise ElfFormatError(f"{path}: {phnum} program headers at offset {e_phoff:#x} "
                             f"(more than {MAX_PHNUM})", offset=e_phoff, field="e_phnum")
    table = need(e_phoff, phnum * PHDR.size, "program header table")
    phdrs = [Phdr._make((*PHDR.unpack_from(table, i * PHDR.size), e_phoff + i * PHDR.size))
             for i in range(phnum)]
    notes: list[tuple[bytes, int, bytes]] = []
    for ph in phdrs:
        if ph.p_type == PT_LOAD and ph.p_offset + ph.p_filesz > size:
            raise ElfFormatError(
                f"{path}: PT_LOAD at offset {ph.at:#x} has data past the end of file "
                f"(p_offset {ph.p_offset:#x} + p_filesz {ph.p_filesz:#x} > {size:#x})",
                offset=ph.at, field="p_filesz")
        if ph.p_type == PT_NOTE and ph.p_filesz:
            if ph.p_filesz > MAX_NOTES_SIZE:
                raise ElfFormatError(f"{path}: PT_NOTE at offset {ph.at:#x} is absurdly large "
                                     f"({ph.p_filesz:#x} bytes)", offset=ph.at, field="p_filesz")
            notes += parse_notes(need(ph.p_offset, ph.p_filesz, "PT_NOTE data"),
                                 ph.p_offset, path)
    return ElfCore(e_machine, e_phoff, phdrs, notes, size)
