"""The ELF header buffer of /proc/kcore: ELF header, program headers and notes."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kcore.addrmap import ALL_ONES, AddressMap
from kcore.errors import InputError
from kcore.kclist import KcoreEntry, KcoreType
from kcore.wire.elf import (
    CORE_NAME,
    EHDR,
    ELF_PRARGSZ,
    EM_BY_ARCH,
    NT_PRPSINFO,
    NT_PRSTATUS,
    NT_TASKSTRUCT,
    PF_RWX,
    PHDR,
    PRPSINFO,
    PRSTATUS_SIZE,
    PT_LOAD,
    PT_NOTE,
    VMCOREINFO_NAME,
    ehdr,
    note,
    note_size,
    pack_prpsinfo,
    phdr,
)

if TYPE_CHECKING:
    from kcore.system import System

FLAVOURS = ("modern", "2.6")


def _page_align(n: int, page_size: int) -> int:
    return (n + page_size - 1) & ~(page_size - 1)


def prpsinfo(cmdline: str, layout: str = "modern") -> bytes:
    """NT_PRPSINFO of kcore: state 'R', fname "vmlinux", psargs from the command line."""
    args = cmdline.encode("utf-8", "surrogateescape")
    if layout == "2.6":
        psargs = args[:ELF_PRARGSZ]  # strncpy(): not NUL-terminated at 80 chars
    else:
        psargs = args[: ELF_PRARGSZ - 1]  # strscpy(): always NUL-terminated
    return pack_prpsinfo("R", b"vmlinux", psargs)


@dataclass(frozen=True)
class NoteInputs:
    """What the notes are made of: command line, VMCOREINFO text, task_struct size or bytes."""

    arch: str
    cmdline: str
    vmcoreinfo: bytes
    task_struct_size: int
    task_struct: bytes | None = None  # the reading task's own, known only from a real kcore


def build_notes_from(inputs: NoteInputs, layout: str = "modern") -> bytes:
    """The PT_NOTE contents: prstatus, prpsinfo, task_struct and (modern) VMCOREINFO."""
    prstatus_size = PRSTATUS_SIZE[inputs.arch]
    task = inputs.task_struct
    if task is None or len(task) != inputs.task_struct_size:
        task = bytes(inputs.task_struct_size)
    out = [
        note(CORE_NAME, NT_PRSTATUS, bytes(prstatus_size)),
        note(CORE_NAME, NT_PRPSINFO, prpsinfo(inputs.cmdline, layout)),
        note(CORE_NAME, NT_TASKSTRUCT, task),
    ]
    if layout == "modern":
        out.append(note(VMCOREINFO_NAME, 0, inputs.vmcoreinfo))
    return b"".join(out)


def notes_len(inputs: NoteInputs, layout: str = "modern") -> int:
    """get_kcore_size()'s notes_len (modern) or the seed's exact note sum (2.6)."""
    n = (note_size(CORE_NAME, PRSTATUS_SIZE[inputs.arch]) + note_size(CORE_NAME, PRPSINFO.size)
         + note_size(CORE_NAME, inputs.task_struct_size))
    if layout == "modern":
        n += note_size(VMCOREINFO_NAME, len(inputs.vmcoreinfo))
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


def phdr_paddr(entry: KcoreEntry, layout: str) -> int:
    """p_paddr: 0 in the seed; since 4.11 __pa() for RAM and text, all-ones otherwise."""
    if layout == "2.6":
        return 0
    if entry.type in (KcoreType.RAM, KcoreType.TEXT):
        return entry.paddr
    return ALL_ONES


def build_header_from(
    entries: Sequence[KcoreEntry], amap: AddressMap, inputs: NoteInputs, layout: str = "modern"
) -> KcoreHeader:
    """elf_kcore_store_hdr() / read_kcore()'s header: the first data_offset bytes of kcore."""
    if layout not in FLAVOURS:
        raise ValueError(f"unknown header layout {layout!r} (modern or 2.6)")
    machine = EM_BY_ARCH[amap.arch]
    nphdr = 1 + len(entries)
    notes = build_notes_from(inputs, layout)
    nlen = notes_len(inputs, layout)
    if layout == "modern":
        data_offset = _page_align(EHDR.size + nphdr * PHDR.size + nlen, amap.page_size)
    else:  # the seed's elf_buflen, with room for (nphdr + 2) program headers
        data_offset = _page_align(EHDR.size + (nphdr + 2) * PHDR.size + nlen, amap.page_size)
    notes_offset = EHDR.size + nphdr * PHDR.size
    parts = [ehdr(machine, nphdr), phdr(PT_NOTE, 0, notes_offset, 0, 0, nlen, 0, 0)]
    loads = []
    size = 0
    for e in entries:
        p_offset = amap.kc_vaddr_to_offset(e.vaddr, layout) + data_offset
        loads.append((e, p_offset))
        size = max(size, amap.kc_vaddr_to_offset(e.vaddr + e.size, layout))
        parts.append(phdr(PT_LOAD, PF_RWX, p_offset, e.vaddr, phdr_paddr(e, layout), e.size,
                          e.size, amap.page_size))
    buf = bytearray(data_offset)
    head = b"".join(parts) + notes
    buf[: len(head)] = head
    return KcoreHeader(bytes(buf), data_offset, data_offset + size, tuple(loads),
                       notes_offset, nlen)


def note_inputs(system: System, task_struct: bytes | None = None) -> NoteInputs:
    """The note inputs of a discovered system."""
    return NoteInputs(system.addrmap.arch, system.cmdline, system.vmcoreinfo.data,
                      system.task_struct_size, task_struct or system.task_struct)


def build_notes(system: System, layout: str = "modern") -> bytes:
    """The PT_NOTE contents /proc/kcore would carry for a discovered system."""
    return build_notes_from(note_inputs(system), layout)


def build_header(system: System, layout: str = "modern") -> KcoreHeader:
    """The header region /proc/kcore would start with, for a discovered system."""
    try:
        return build_header_from(system.kclist.entries, system.addrmap, note_inputs(system),
                                 layout)
    except struct.error as exc:  # a value from the root files or VMCOREINFO is out of range
        raise InputError(f"a kcore header field cannot hold a value the system gives ({exc}): "
                         f"the root files or VMCOREINFO are corrupt") from None
