"""The default format: a compact ELF core (PT_NOTE, then packed PT_LOADs for RAM and text)."""

from __future__ import annotations

import struct
from typing import Any

from kcore.errors import OutputError
from kcore.formats import (
    Blob,
    Item,
    Layout,
    Request,
    Segment,
    kind_of,
    mapped_only,
    mapped_segment,
    segment_items,
    split_segments,
)

# ELF constants (include/uapi/linux/elf.h)
ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE = 2, 1, 1, 0
ET_CORE = 4
EM_BY_ARCH = {"x86_64": 62, "aarch64": 183, "arm64": 183, "riscv64": 243, "s390x": 22}
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
PN_XNUM = 0xFFFF
MAX_LOADS = PN_XNUM - 2  # e_phnum stays below PN_XNUM: one PT_NOTE plus the loads

# Elf64_Ehdr and Elf64_Phdr, field by field (little-endian)
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # e_ident e_type e_machine e_version e_entry
#                                            e_phoff e_shoff e_flags e_ehsize e_phentsize
#                                            e_phnum e_shentsize e_shnum e_shstrndx
PHDR = struct.Struct("<IIQQQQQQ")  # p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz
#                                    p_align
E_IDENT = b"\x7fELF" + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE]) + bytes(8)


def ehdr(machine: int, phnum: int) -> bytes:
    """An ET_CORE ELF header whose program headers follow it."""
    return EHDR.pack(E_IDENT, ET_CORE, machine, EV_CURRENT, 0, EHDR.size, 0, 0, EHDR.size,
                     PHDR.size, phnum, 0, 0, 0)


def phdr(p_type: int, p_flags: int, p_offset: int, p_vaddr: int, p_paddr: int, p_filesz: int,
         p_memsz: int, p_align: int) -> bytes:
    """One program header."""
    return PHDR.pack(p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align)


def segments(req: Request) -> list[Segment]:
    """What the ELF core holds: text (unless --no-text), vmalloc/modules if asked, RAM."""
    system = req.system
    out: list[Segment] = []
    for e in system.kclist.entries:
        kind = kind_of(e, system.layout)
        if kind == "text" and req.text:
            out.append(Segment.linear("text", e.vaddr, e.paddr, e.size))
        elif kind in ("vmalloc", "modules") and getattr(req, kind):
            seg = mapped_segment(req, kind, e.vaddr, e.size)
            if seg is None:
                raise OutputError(f"--{kind} needs the page-table walker (kcore.vmem), "
                                  f"which this build lacks")
            out.extend(mapped_only(seg))
        elif kind == "ram":
            out.append(Segment.linear("ram", e.vaddr, e.paddr, e.size))
    if not out:
        raise OutputError("nothing to dump: the kclist has no RAM ranges")
    return out


def plan(req: Request) -> Layout:
    """Lay out the compact ELF core for a request."""
    from kcore.elfcore import build_notes

    system = req.system
    page = system.layout.page_size
    segs = segments(req)
    elided, stats = 0, None
    if req.elide:
        segs, elided, stats = split_segments(req, segs, MAX_LOADS)
    elif len(segs) > MAX_LOADS:
        raise OutputError(f"too many ranges ({len(segs)}) for one ELF file")
    machine = EM_BY_ARCH.get(getattr(system.layout, "arch", "x86_64"))
    if machine is None:
        raise OutputError(f"no ELF machine number for architecture {system.layout.arch}")
    notes = build_notes(system, "modern")  # VMCOREINFO whatever --layout: consumers need it
    phnum = 1 + len(segs)
    notes_offset = EHDR.size + phnum * PHDR.size
    data_offset = -(-(notes_offset + len(notes)) // page) * page
    # crash requires phdr[0] to be the PT_NOTE
    headers = [ehdr(machine, phnum),
               phdr(PT_NOTE, 0, notes_offset, 0, 0, len(notes), 0, 0)]
    items: list[Item] = []
    ranges: list[dict[str, Any]] = []
    pos = data_offset
    for s in segs:
        headers.append(phdr(PT_LOAD, PF_R | PF_W | PF_X, pos, s.vaddr, s.paddr, s.size, s.size,
                            page))
        items.extend(segment_items(req.source, s, pos))
        ranges.append({"kind": s.kind, "vaddr": hex(s.vaddr), "paddr": hex(s.paddr),
                       "size": s.size, "offset": pos})
        pos += s.size
    head = b"".join(headers) + notes
    head += bytes(data_offset - len(head))
    return Layout([Blob(0, head), *items], pos, ranges, elided, stats)
