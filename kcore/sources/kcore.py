"""A live or saved /proc/kcore: virtual PT_LOADs, physical memory through RAM segments' p_paddr."""

from __future__ import annotations

from typing import Any, NamedTuple

from kcore.addrmap import ALL_ONES
from kcore.engine import CopyStats
from kcore.errors import ElfFormatError, InputError, SourceError
from kcore.kclist import KCORE_TEXT, kcore_text_x86_64
from kcore.sources.base import Extent, MemorySource, Probe, WritableBuffer, check_extents
from kcore.sources.checks import Region, Result
from kcore.sources.elf import check_elf, parse_elf_core
from kcore.sources.files import opened
from kcore.vmcoreinfo import VmcoreInfo
from kcore.wire.elf import ELF_MAGIC, PT_LOAD, ElfCore, vmcoreinfo_of

KERNEL_HALF = 0xFFFF800000000000  # lowest canonical kernel address with 4-level paging
KERNEL_HALF_LA57 = 0xFF00000000000000
# kc_vaddr_to_offset on x86-64: v & __VIRTUAL_MASK (47 bits, 56 with 5-level paging).
VIRTUAL_MASKS = ((1 << 47) - 1, (1 << 56) - 1)


class Segment(NamedTuple):
    """One PT_LOAD of a kcore file."""

    vaddr: int
    paddr: int
    offset: int
    size: int


def looks_like_kcore(core: ElfCore) -> bool:
    """Whether an ELF core is a /proc/kcore: kernel vaddrs at offsets kc_vaddr_to_offset gives."""
    loads = [ph for ph in core.phdrs if ph.p_type == PT_LOAD]
    if len(loads) < 2 or any(ph.p_vaddr < KERNEL_HALF_LA57 for ph in loads):
        return False
    for mask in VIRTUAL_MASKS:  # modern: p_offset = (vaddr & mask) + data_offset
        if len({ph.p_offset - (ph.p_vaddr & mask) for ph in loads}) == 1:
            return True
    # 2.6 era: p_offset = vaddr - PAGE_OFFSET + elf_buflen
    return len({(ph.p_vaddr - ph.p_offset) % (1 << 64) for ph in loads}) == 1


def kernel_text(e_machine: int, info: bytes | None, segments: list[Segment],
                path: str) -> Segment | None:
    """The kernel-image PT_LOAD of a kcore, by its architecture's rule (x86-64's where the
    machine is not one kcore knows), or None."""
    rule = KCORE_TEXT.get(e_machine, kcore_text_x86_64)
    try:
        parsed = VmcoreInfo.parse(info) if info else None
    except InputError as exc:
        raise ElfFormatError(f"{path}: its VMCOREINFO note: {exc}") from None
    text: Segment | None = rule(parsed, segments)
    return text


class KcoreSource(MemorySource):
    """A /proc/kcore file (live or saved); physical extents from its KCORE_RAM segments."""

    kind = "kcore"
    concurrent_reads_safe = False  # one bounce page per open /proc/kcore (see MemorySource)

    @classmethod
    def open(cls, path: str, spec: str | None = None, root: str = "/") -> KcoreSource:
        """Open and index a kcore file read-only."""
        with opened(path) as fd:
            src = cls(spec or f"kcore:{path}", path, fd, [])
            src.reload_segments()
            return src

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        """An ELF core whose PT_LOADs sit where /proc/kcore puts them (looks_like_kcore)."""
        if probe.head[:4] != ELF_MAGIC:
            return False
        try:
            return looks_like_kcore(parse_elf_core(probe.fd, probe.path))
        except SourceError:  # a damaged ELF file: ElfSource says what is wrong with it
            return False

    @classmethod
    def check(cls, fd: int, path: str, res: Result,
              manifest: dict[str, Any] | None) -> list[Region] | None:
        """`kcore verify` of a /proc/kcore image: an ELF core whose loads may share bytes."""
        return check_elf(fd, path, res, kcore=True)

    def reload_segments(self) -> None:
        """Re-read the program headers (a live kcore rebuilds them after memory hotplug)."""
        core = parse_elf_core(self.fd, self.path)
        segments = [Segment(ph.p_vaddr, ph.p_paddr, ph.p_offset, ph.p_filesz)
                    for ph in core.phdrs if ph.p_type == PT_LOAD]
        info = vmcoreinfo_of(core)
        # KCORE_RAM: direct-map segments with p_paddr = __pa(addr); TEXT (p_paddr =
        # __pa_symbol(addr): x86-64's above __START_KERNEL_map, arm64's in the vmalloc area
        # above MODULES_VADDR) would alias RAM, and vmalloc/vmemmap have all-ones.
        text = kernel_text(core.e_machine, info, segments, self.path)
        extents = [Extent(s.paddr, s.size, s.offset) for s in segments
                   if s.paddr != ALL_ONES and s is not text and s.size]
        if all(s.paddr == 0 for s in segments):
            extents = []  # before Linux 4.11 p_paddr was 0: no physical view
        self._set_extents(check_extents(extents, self.path, ElfFormatError))
        self.core = core
        self.segments = segments
        self.vmcoreinfo = info

    def read_kcore(self, offset: int, length: int) -> bytes:
        """Read `length` bytes at kcore file offset `offset` (faults read as zeros)."""
        buf = bytearray(length)
        self.readinto_kcore(offset, buf)
        return bytes(buf)

    def readinto_kcore(self, offset: int, buf: WritableBuffer) -> CopyStats:
        """Fill `buf` from kcore file offset `offset` (faults read as zeros)."""
        return self._read_at(offset, buf, False)
