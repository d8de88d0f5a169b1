"""The ELF header buffer of /proc/kcore: ELF header, program headers and notes."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from elftools.construct import Container
from elftools.elf.structs import ELFStructs

from kcore.addrmap import ALL_ONES, AddressMap
from kcore.kclist import KcoreEntry, KcoreType

if TYPE_CHECKING:
    from kcore.discover import System

CORE_STR = b"CORE"
VMCOREINFO_NOTE_NAME = b"VMCOREINFO"
NT_PRSTATUS, NT_PRPSINFO, NT_TASKSTRUCT = 1, 3, 4
PF_RWX = 7  # PF_R | PF_W | PF_X
ELF_PRARGSZ = 80
FLAVOURS = ("modern", "2.6")

# Per architecture: e_machine, sizeof(struct elf_prstatus), sizeof(struct elf_prpsinfo).
ARCH_ELF = {
    "x86_64": ("EM_X86_64", 336, 136),
    "aarch64": ("EM_AARCH64", 392, 136),
}

# struct elf_prpsinfo (include/uapi/linux/elfcore.h), 64-bit.
PRPSINFO = struct.Struct("<bbbb4xQIIiiii16s80s")


def _structs() -> ELFStructs:
    s = ELFStructs(little_endian=True, elfclass=64)
    s.create_basic_structs()
    s.create_advanced_structs(
        e_type="ET_CORE", e_machine="EM_X86_64", e_ident_osabi="ELFOSABI_SYSV"
    )
    return s


STRUCTS = _structs()
EHDR_SIZE = STRUCTS.Elf_Ehdr.sizeof()
PHDR_SIZE = STRUCTS.Elf_Phdr.sizeof()
NHDR_SIZE = STRUCTS.Elf_Nhdr.sizeof()


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _page_align(n: int, page_size: int) -> int:
    return (n + page_size - 1) & ~(page_size - 1)


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note: header, NUL-terminated name and descriptor, each padded to 4 bytes."""
    namesz = len(name) + 1
    hdr = STRUCTS.Elf_Nhdr.build(
        Container(n_namesz=namesz, n_descsz=len(desc), n_type=ntype)
    )
    name_b = name + b"\0" * (_align4(namesz) - len(name))
    return hdr + name_b + desc + b"\0" * (_align4(len(desc)) - len(desc))


def prpsinfo(cmdline: str, flavour: str = "modern") -> bytes:
    """NT_PRPSINFO of kcore: state 'R', fname "vmlinux", psargs from the command line."""
    args = cmdline.encode("utf-8", "surrogateescape")
    if flavour == "2.6":
        psargs = args[:ELF_PRARGSZ]  # strncpy(): not NUL-terminated at 80 chars
    else:
        psargs = args[: ELF_PRARGSZ - 1]  # strscpy(): always NUL-terminated
    return PRPSINFO.pack(0, ord("R"), 0, 0, 0, 0, 0, 0, 0, 0, 0, b"vmlinux", psargs)


@dataclass(frozen=True)
class NoteInputs:
    """What the notes are made of: command line, VMCOREINFO text, task_struct size or bytes."""

    arch: str
    cmdline: str
    vmcoreinfo: bytes
    task_struct_size: int
    task_struct: bytes | None = None  # the reading task's own, known only from a real kcore


def build_notes_from(inputs: NoteInputs, flavour: str = "modern") -> bytes:
    """The PT_NOTE contents: prstatus, prpsinfo, task_struct and (modern) VMCOREINFO."""
    _machine, prstatus_size, _ = ARCH_ELF[inputs.arch]
    task = inputs.task_struct
    if task is None or len(task) != inputs.task_struct_size:
        task = bytes(inputs.task_struct_size)
    out = [
        note(CORE_STR, NT_PRSTATUS, bytes(prstatus_size)),
        note(CORE_STR, NT_PRPSINFO, prpsinfo(inputs.cmdline, flavour)),
        note(CORE_STR, NT_TASKSTRUCT, task),
    ]
    if flavour == "modern":
        out.append(note(VMCOREINFO_NOTE_NAME, 0, inputs.vmcoreinfo))
    return b"".join(out)


def notes_len(inputs: NoteInputs, flavour: str = "modern") -> int:
    """get_kcore_size()'s notes_len (modern) or the seed's exact note sum (2.6)."""
    _machine, prstatus_size, prpsinfo_size = ARCH_ELF[inputs.arch]
    n = (3 * (NHDR_SIZE + _align4(len(CORE_STR) + 1)) + _align4(prstatus_size)
         + _align4(prpsinfo_size) + _align4(inputs.task_struct_size))
    if flavour == "modern":
        n += NHDR_SIZE + _align4(len(VMCOREINFO_NOTE_NAME) + 1) + _align4(len(inputs.vmcoreinfo))
    return n


@dataclass(frozen=True)
class KcoreHeader:
    """The header region of a kcore file, and where each entry's bytes sit."""

    data: bytes  # exactly data_offset bytes: what /proc/kcore returns before the first page
    data_offset: int
    file_size: int
    loads: tuple[tuple[KcoreEntry, int], ...]  # (entry, p_offset)
    notes_offset: int
    notes_size: int


def phdr_paddr(entry: KcoreEntry, flavour: str) -> int:
    """p_paddr: 0 in the seed; since 4.11 __pa() for RAM and text, all-ones otherwise."""
    if flavour == "2.6":
        return 0
    if entry.type in (KcoreType.RAM, KcoreType.TEXT):
        return entry.paddr
    return ALL_ONES


def build_header_from(
    entries: Sequence[KcoreEntry], amap: AddressMap, inputs: NoteInputs, flavour: str = "modern"
) -> KcoreHeader:
    """elf_kcore_store_hdr() / read_kcore()'s header: the first data_offset bytes of kcore."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown header flavour {flavour!r} (modern or 2.6)")
    machine, _, _ = ARCH_ELF[amap.arch]
    nphdr = 1 + len(entries)
    notes = build_notes_from(inputs, flavour)
    nlen = notes_len(inputs, flavour)
    if flavour == "modern":
        data_offset = _page_align(EHDR_SIZE + nphdr * PHDR_SIZE + nlen, amap.page_size)
    else:  # the seed's elf_buflen, with room for (nphdr + 2) program headers
        data_offset = _page_align(EHDR_SIZE + (nphdr + 2) * PHDR_SIZE + nlen, amap.page_size)
    ehdr = STRUCTS.Elf_Ehdr.build(Container(
        e_ident=Container(
            EI_MAG=[0x7F, ord("E"), ord("L"), ord("F")], EI_CLASS="ELFCLASS64",
            EI_DATA="ELFDATA2LSB", EI_VERSION="EV_CURRENT", EI_OSABI="ELFOSABI_SYSV",
            EI_ABIVERSION=0,
        ),
        e_type="ET_CORE", e_machine=machine, e_version="EV_CURRENT", e_entry=0,
        e_phoff=EHDR_SIZE, e_shoff=0, e_flags=0, e_ehsize=EHDR_SIZE,
        e_phentsize=PHDR_SIZE, e_phnum=nphdr, e_shentsize=0, e_shnum=0, e_shstrndx=0,
    ))
    notes_offset = EHDR_SIZE + nphdr * PHDR_SIZE
    phdrs = [STRUCTS.Elf_Phdr.build(Container(
        p_type="PT_NOTE", p_flags=0, p_offset=notes_offset, p_vaddr=0, p_paddr=0,
        p_filesz=nlen, p_memsz=0, p_align=0,
    ))]
    loads = []
    size = 0
    for e in entries:
        p_offset = amap.kc_vaddr_to_offset(e.vaddr, flavour) + data_offset
        loads.append((e, p_offset))
        size = max(size, amap.kc_vaddr_to_offset(e.vaddr + e.size, flavour))
        phdrs.append(STRUCTS.Elf_Phdr.build(Container(
            p_type="PT_LOAD", p_flags=PF_RWX, p_offset=p_offset, p_vaddr=e.vaddr,
            p_paddr=phdr_paddr(e, flavour), p_filesz=e.size, p_memsz=e.size,
            p_align=amap.page_size,
        )))
    buf = bytearray(data_offset)
    head = ehdr + b"".join(phdrs) + notes
    buf[: len(head)] = head
    return KcoreHeader(bytes(buf), data_offset, data_offset + size, tuple(loads),
                       notes_offset, nlen)


def note_inputs(system: System, task_struct: bytes | None = None) -> NoteInputs:
    """The note inputs of a discovered system."""
    return NoteInputs(system.addrmap.arch, system.cmdline, system.vmcoreinfo.data,
                      system.task_struct_size, task_struct or system.task_struct)


def build_notes(system: System, flavour: str = "modern") -> bytes:
    """The PT_NOTE contents /proc/kcore would carry for a discovered system."""
    return build_notes_from(note_inputs(system), flavour)


def build_header(system: System, flavour: str = "modern") -> KcoreHeader:
    """The header region /proc/kcore would start with, for a discovered system."""
    return build_header_from(system.kclist.entries, system.addrmap, note_inputs(system), flavour)
