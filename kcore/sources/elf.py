"""ELF cores with physical addresses: QEMU dump-guest-memory, kdump /proc/vmcore, kcore's dumps."""

from __future__ import annotations

import bisect
from typing import Any, NamedTuple

from kcore.addrmap import ALL_ONES, X86_64_START_KERNEL_MAP
from kcore.errors import ElfFormatError, SourceError
from kcore.kclist import KCORE_TEXT
from kcore.sources.base import Extent, MemorySource, Probe, check_extents
from kcore.sources.checks import Region, Result, layout_error, note_vmcoreinfo
from kcore.sources.files import file_size, opened, pread_exact, pread_full
from kcore.wire import LayoutError
from kcore.wire.diskdump import vmcoreinfo_span
from kcore.wire.elf import (
    EHDR,
    ELF_MAGIC,
    EM_BY_ARCH,
    PHDR,
    PT_LOAD,
    PT_NOTE,
    SHDR,
    SHT_NOBITS,
    ElfCore,
    Phdr,
    read_core,
    vmcoreinfo_of,
)

# Caps that bound a hostile file's cost (kdump cores of huge machines stay far below them).
MAX_ALIAS_BYTES = 4 << 30  # overlapping (aliased) PT_LOAD bytes compared when opening
SMEAR_FIRST = 16  # differing pages listed by address
PAGE = 4096


def parse_elf_core(fd: int, path: str, *, size: int | None = None) -> ElfCore:
    """Parse the ELF64 LE core at fd (kcore.wire.elf.read_core: every bound checked)."""
    def read(offset: int, length: int, what: str) -> bytes:
        try:
            return pread_exact(fd, offset, length, path, what)
        except SourceError as exc:
            raise ElfFormatError(str(exc), offset=exc.offset) from None

    return read_core(read, file_size(fd) if size is None else size, path)


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
                    f"physical {lo:#x} with different contents", offset=ats[i])
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
                             f"bytes (program header at {at:#x})", offset=at)
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
    signatures = ("ELF",)
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
                                     f"the program headers at offset {core.phoff:#x}",
                                     offset=core.phoff)
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

    @classmethod
    def check(cls, fd: int, path: str, res: Result,
              manifest: dict[str, Any] | None) -> list[Region] | None:
        """`kcore verify` of an ELF core: every header, note and load in bounds, loads that
        share file bytes or hold one frame differently, and what drgn, crash and Volatility
        make of it."""
        return check_elf(fd, path, res, kcore=False)


def check_elf(fd: int, path: str, res: Result, *, kcore: bool) -> list[Region]:
    """The checks of an ELF core (kcore: a /proc/kcore image, whose loads may share bytes)."""
    try:
        core = parse_elf_core(fd, path, size=res.size)
    except SourceError as exc:
        raise layout_error(exc, path) from None
    loads = [ph for ph in core.phdrs if ph.p_type == PT_LOAD]
    names = {n for n, _t, _d in core.notes}
    if kcore:
        res.format, res.detail = "kcore", "a /proc/kcore image"
    else:
        res.format = "elf"
        res.detail = ("QEMU dump-guest-memory core" if b"QEMU" in names
                      else "ELF core with physical addresses")
    if core.e_machine not in KCORE_TEXT:  # the machines kcore reads (x86-64, arm64)
        known = " or ".join(f"{em} {arch}" for arch, em in EM_BY_ARCH.items()
                            if em in KCORE_TEXT and arch != "arm64")
        res.warnings.append(f"e_machine {core.e_machine} is not a machine kcore reads "
                            f"({known})")
    end = core.phoff + len(core.phdrs) * PHDR.size
    for ph in core.phdrs:
        if ph.p_type == PT_LOAD and ph.p_filesz > ph.p_memsz:
            raise LayoutError(ph.at, "p_filesz", "larger than p_memsz",
                              f"PT_LOAD at {ph.at:#x}: p_filesz {ph.p_filesz:#x} is larger "
                              f"than p_memsz {ph.p_memsz:#x}")
        if ph.p_filesz:
            end = max(end, ph.p_offset + ph.p_filesz)
    end = max(end, _sections_end(fd, res.size))
    if res.size > end and not kcore:
        res.warnings.append(f"{res.size - end} bytes after the last segment's data "
                            f"(from {end:#x})")
    by_file = sorted((ph.p_offset, ph.p_offset + ph.p_filesz, ph.at) for ph in loads
                     if ph.p_filesz)
    for (_a0, a1, at_a), (b0, _b1, at_b) in zip(by_file, by_file[1:], strict=False):
        if b0 < a1 and not kcore:
            raise LayoutError(at_b, "p_offset", "shares file bytes",
                              f"PT_LOADs at {at_a:#x} and {at_b:#x} share file bytes "
                              f"from {b0:#x}")
    phys = [ph for ph in loads if ph.p_filesz and ph.p_paddr not in (ALL_ONES, 0)
            or ph.p_filesz and ph.p_paddr == 0 and ph.p_vaddr == 0]
    if not kcore and phys:
        try:  # RAM loads that overlap must hold the same bytes; the text load may not
            res.smear = resolve_aliases(fd, path, phys)[1].as_dict()
        except SourceError as exc:
            raise layout_error(exc, path) from None
    regions = [Region(ph.p_offset, ph.p_filesz, ph.p_memsz, ph.p_paddr,
                      "text" if ph.p_vaddr >= X86_64_START_KERNEL_MAP else
                      "ram" if ph.p_paddr != ALL_ONES else "mapped")
               for ph in loads]
    if kcore:  # vmalloc and vmemmap areas are address space, not RAM; no whole digest
        regions = [r for r in regions if r.kind != "mapped"]
        res.whole_digest = False
    else:  # the loads with file bytes, as the manifest lists them
        res.file_ranges = {(r.offset, r.filesz) for r in regions if r.filesz}
    res.structure = (f"ELF header, {len(core.phdrs)} program headers ({len(loads)} PT_LOAD), "
                     f"{len(core.notes)} notes: valid end to end")
    res.ranges["count"] = len(loads)
    res.ranges["memory_bytes"] = sum(r.memsz for r in regions if r.kind == "ram")
    note_vmcoreinfo(res, vmcoreinfo_of(core))
    res.vmcoreinfo["offset"] = _vmcoreinfo_offset(fd, core)
    _elf_consumers(res, loads)
    if kcore:
        res.consumers["volatility"] = {"ok": False, "why": "a /proc/kcore image: its vmalloc "
                                       "and vmemmap loads carry no physical address; dump "
                                       "--format elf or lime for Volatility"}
    return regions


def _vmcoreinfo_offset(fd: int, core: ElfCore) -> int | None:
    """The file offset of the VMCOREINFO note's text (None without one)."""
    for ph in core.phdrs:
        if ph.p_type == PT_NOTE and ph.p_filesz:
            at, size = vmcoreinfo_span(pread_full(fd, ph.p_filesz, ph.p_offset))
            if size:
                return ph.p_offset + at
    return None


def _sections_end(fd: int, size: int) -> int:
    """Where the section header table and its sections end (QEMU writes a .shstrtab)."""
    head = pread_full(fd, EHDR.size, 0)
    if len(head) < EHDR.size:
        return 0
    fields = EHDR.unpack(head)
    shoff, shentsize, shnum = fields[6], fields[11], fields[12]
    if not shoff or shentsize != SHDR.size or not 0 < shnum < 4096 or \
            shoff + shnum * SHDR.size > size:
        return 0
    end: int = shoff + shnum * SHDR.size
    table = pread_full(fd, shnum * SHDR.size, shoff)
    for i in range(1, shnum):
        _name, sh_type, _fl, _addr, sh_offset, sh_size, *_rest = SHDR.unpack_from(
            table, i * SHDR.size)
        if sh_type != SHT_NOBITS and sh_offset + sh_size <= size:
            end = max(end, sh_offset + sh_size)
    return end


def _elf_consumers(res: Result, loads: list[Phdr]) -> None:
    """What Volatility, drgn and crash make of an ELF core's loads and VMCOREINFO."""
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
    text = any(ph.p_vaddr >= X86_64_START_KERNEL_MAP and ph.p_filesz for ph in loads)
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
