"""Dump levels: which pages to leave out, from the kernel's own mem_map (makedumpfile's -d).

The struct page array is found through VMCOREINFO (SPARSEMEM, with or without
SPARSEMEM_EXTREME and VMEMMAP: makedumpfile's get_mm_sparsemem), read through the dump's own
memory source, and classified in C (csrc/pageclass.c) into a bitmap of one bit per page frame:
set means kept. That bitmap is the only structure here that grows with RAM.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kcore.errors import InputError

# makedumpfile's dump-level bits (-d); zero pages are found by the zero-run scan.
DL_ZERO, DL_CACHE, DL_CACHE_PRI, DL_USER, DL_FREE = 1, 2, 4, 8, 16
MAX_DUMP_LEVEL = 31
CLASSES = ("zero", "cache", "cache_private", "user", "free", "hwpoison", "offline")
LEVEL_HELP = "1 zero, 2 cache without private data, 4 cache with private data, 8 user, 16 free"

# include/linux/mmzone.h (x86-64 defaults where VMCOREINFO is silent)
SECTION_MARKED_PRESENT = 1 << 0
SECTION_MAP_LAST_BIT = 1 << 5  # 1 << 2 before Linux 4.13 (makedumpfile: the same mask)
SECTION_MAP_MASK = ~(SECTION_MAP_LAST_BIT - 1) & ((1 << 64) - 1)
X86_64_SECTION_SIZE_BITS = 27
X86_64_MAX_PHYSMEM_BITS = (46, 52)  # 4- and 5-level paging
# What a real kernel can have (checked before a value sizes a buffer, a shift or a loop):
STRUCT_PAGE_SIZES = range(32, 257)  # SIZE(page): 40-80 bytes on every 64-bit config
MEM_SECTION_SIZES = range(8, 257)  # SIZE(mem_section): 16-32 bytes (usage, page_ext)
# SECTION_SIZE_BITS and MAX_PHYSMEM_BITS per architecture (arch/*/include/asm/sparsemem.h):
# x86-64 27 and 46/52; arm64 27 (30 before 5.12, 29 with 64 KiB pages) and 48/52.
SECTION_BITS = {"x86_64": range(27, 28), "aarch64": range(27, 31)}
PHYSMEM_BITS = {"x86_64": (46, 52), "aarch64": (48, 52)}
FREE_AREA_LENGTHS = range(1, 65)  # LENGTH(zone.free_area): MAX_ORDER + 1 (11-16)
MAPCOUNT_VALUES = range(-(1 << 31), 1 << 32)  # page_type values compared with a 32-bit field
PGMM_CACHED = 512  # makedumpfile reads struct pages in groups of 512 (compound heads)
SECTION_CHUNK_PAGES = 1 << 15  # struct pages classified per C call (2 MiB of 64-byte ones)
RUNS_BATCH = 4096  # runs fetched from the bitmap per C call

# What each dump-level bit needs from VMCOREINFO, besides the mem_map location and page.flags.
BASE_FIELDS = ("SYMBOL(mem_section)", "SIZE(mem_section)", "OFFSET(mem_section.section_mem_map)",
               "SIZE(page)", "OFFSET(page.flags)")
CACHE_FIELDS = ("NUMBER(PG_lru)", "NUMBER(PG_private)", "NUMBER(PG_swapcache)",
                "OFFSET(page.mapping)")
USER_FIELDS = ("OFFSET(page.mapping)",)
FREE_FIELDS = ("OFFSET(page._mapcount)", "OFFSET(page.private)")


def parse_level(text: str) -> int:
    """A dump level 0-31 (argparse type)."""
    try:
        level = int(text, 0)
    except ValueError:
        raise InputError(f"dump level {text!r} is not a number 0-31 ({LEVEL_HELP})") from None
    if not 0 <= level <= MAX_DUMP_LEVEL:
        raise InputError(f"dump level {level} is out of range 0-31 ({LEVEL_HELP})")
    return level


def needs_mem_map(info: Any, level: int) -> bool:
    """Whether a level reads the mem_map (makedumpfile's create_2nd_bitmap test).

    Beyond the cache, user and free bits, makedumpfile walks it whenever the kernel has
    PG_hwpoison, to leave out poisoned and offline pages at any level.
    """
    return bool(level & (DL_CACHE | DL_CACHE_PRI | DL_USER | DL_FREE)) or (
        info.number("PG_hwpoison") is not None)


def missing_fields(info: Any, level: int) -> list[str]:
    """The VMCOREINFO entries a dump level needs that this kernel did not give."""
    want: list[str] = []
    if not level & (DL_CACHE | DL_CACHE_PRI | DL_USER | DL_FREE):
        return []
    want.extend(BASE_FIELDS)
    if level & (DL_CACHE | DL_CACHE_PRI):
        want.extend(CACHE_FIELDS)
    if level & DL_USER:
        want.extend(USER_FIELDS)
    if level & DL_FREE:
        want.extend(FREE_FIELDS)
        if (info.get("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)") is None
                and info.get("NUMBER(PG_buddy)") is None):
            want.append("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)")
    seen: list[str] = []
    for key in want:
        if key not in seen and info.get(key) is None:
            seen.append(key)
    return seen


def _kernel_version(release: str | None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or "")
    return (int(m.group(1)), int(m.group(2))) if m else (99, 0)


def _bad(key: str, value: int, why: str) -> InputError:
    """The one-line error for a VMCOREINFO value no real kernel has."""
    return InputError(f"VMCOREINFO {key}={value} {why}: the VMCOREINFO is corrupt or not this "
                      "kernel's (-d needs it to read the mem_map; dump without -d)")


def struct_page_size(info: Any) -> int:
    """SIZE(page), checked against what a kernel can have (32-256 bytes)."""
    size: int | None = info.size("page")
    if size is None:
        raise InputError("VMCOREINFO has no SIZE(page): the mem_map cannot be read "
                         "(dump without -d)")
    if size not in STRUCT_PAGE_SIZES:
        raise _bad("SIZE(page)", size, "is not the size of a struct page (32-256 bytes)")
    return size


def page_rules(info: Any, level: int) -> Any:
    """The struct kc_page_rules for a level, from VMCOREINFO (missing fields: -1 / unknown).

    Every value is checked against what a kernel can have before it reaches C: a field past
    the end of struct page, a flag bit past 63 or a count no kernel has is an InputError
    naming it.
    """
    from kcore._native import ffi, lib

    size = struct_page_size(info)
    version = _kernel_version(info.osrelease)
    order_width = 1 if version >= (4, 16) else 2
    dtor_width = 1 if version >= (4, 16) else 2 if version >= (4, 4) else 8

    def off(name: str, limit: int = size) -> int:
        """OFFSET(name) inside a structure of limit bytes, or -1 when the kernel has none."""
        v: int | None = info.offset(name)
        if v is None:
            return -1
        if v >= limit:
            raise _bad(f"OFFSET({name})", v, f"lies past the end of its structure ({limit} "
                       "bytes)")
        return v

    def inside(key: str, v: int, width: int) -> int:
        """A field offset v of width bytes that must lie inside struct page (-1: none)."""
        if v >= 0 and v + width > size:
            raise _bad(key, v, f"leaves a {width}-byte field past the end of struct page "
                       f"(SIZE(page)={size})")
        return v

    r = ffi.new("struct kc_page_rules *")
    r.dump_level = level
    r.struct_size = size
    flags = off("page.flags")
    if flags < 0:
        raise InputError("VMCOREINFO has no OFFSET(page.flags): the mem_map cannot be "
                         "classified (dump without -d)")
    r.off_flags = inside("OFFSET(page.flags)", flags, 8)
    r.off_mapping = inside("OFFSET(page.mapping)", off("page.mapping"), 8)
    r.off_mapcount = inside("OFFSET(page._mapcount)", off("page._mapcount"), 4)
    r.off_private = inside("OFFSET(page.private)", off("page.private"), 8)
    # 7.x renamed it compound_info (include/linux/page-flags.h: bit 0 still marks a tail page;
    # the rest is the head's address or a mask to it). Without it each tail page was judged
    # on its own fields and a slab's tails were left out at -d 31, as makedumpfile 1.7.8
    # leaves them out (2,449 slab pages on a 1 GiB 7.2.13 guest: bench/RESULTS.md).
    head = "page.compound_head" if info.offset("page.compound_head") is not None \
        else "page.compound_info"
    r.off_compound_head = inside(f"OFFSET({head})", off(head), 8)
    # init_compound_offset: folio fields (6.3+) sit in the folio's second page (a folio is
    # at most four struct pages)
    order, dtor = off("folio._folio_order", 4 * size), off("folio._folio_dtor", 4 * size)
    off_order = order - size if order >= 0 else off("page.compound_order")
    off_dtor = dtor - size if dtor >= 0 else off("page.compound_dtor")
    if version < (4, 4):
        lru, nxt, prev = off("page.lru"), off("list_head.next", 16), off("list_head.prev", 16)
        if off_order < 0 and lru >= 0 and prev >= 0:
            off_order = lru + prev
        if off_dtor < 0 and lru >= 0 and nxt >= 0:
            off_dtor = lru + nxt
    r.off_order = inside("the compound order's offset", max(off_order, -1), order_width)
    r.off_dtor = inside("the compound destructor's offset", max(off_dtor, -1), dtor_width)
    r.order_width, r.dtor_width = order_width, dtor_width
    for name, attr in (("PG_lru", "pg_lru"), ("PG_private", "pg_private"),
                       ("PG_swapcache", "pg_swapcache"), ("PG_swapbacked", "pg_swapbacked"),
                       ("PG_slab", "pg_slab"), ("PG_hwpoison", "pg_hwpoison"),
                       ("PG_buddy", "pg_buddy"), ("PG_hugetlb", "pg_hugetlb")):
        v = info.number(name)
        if v is not None and not 0 <= v < 64:
            raise _bad(f"NUMBER({name})", v, "is not a bit of the 64-bit page.flags")
        setattr(r, attr, v if v is not None else -1)
    head_mask = info.number("PG_head_mask") or 0
    if head_mask < 0 or head_mask & (head_mask - 1):
        raise _bad("NUMBER(PG_head_mask)", head_mask, "is not one bit of page.flags")
    r.head_mask = head_mask
    known = 0
    for name, attr, bit in (
            ("PAGE_BUDDY_MAPCOUNT_VALUE", "buddy_mapcount", lib.KC_KNOW_BUDDY_MAPCOUNT),
            ("PAGE_OFFLINE_MAPCOUNT_VALUE", "offline_mapcount", lib.KC_KNOW_OFFLINE_MAPCOUNT),
            ("PAGE_SLAB_MAPCOUNT_VALUE", "slab_mapcount", lib.KC_KNOW_SLAB_MAPCOUNT),
            ("PAGE_HUGETLB_MAPCOUNT_VALUE", "hugetlb_mapcount", lib.KC_KNOW_HUGETLB_MAPCOUNT),
            ("PAGE_UNACCEPTED_MAPCOUNT_VALUE", "unaccepted_mapcount",
             lib.KC_KNOW_UNACCEPTED_MAPCOUNT)):
        v = info.number(name)
        if v is not None:
            if v not in MAPCOUNT_VALUES:
                raise _bad(f"NUMBER({name})", v, "does not fit the 32-bit page._mapcount")
            setattr(r, attr, v)
            known |= bit
    dtor_id = info.number("HUGETLB_PAGE_DTOR")
    if dtor_id is None:
        dtor_id = info.symbol("free_huge_page")  # before 4.4 the destructor was a function
    if dtor_id is not None:
        r.hugetlb_dtor = dtor_id & ((1 << 64) - 1)
        known |= lib.KC_KNOW_HUGETLB_DTOR
    r.known = known
    length = info.length("zone.free_area")
    if length is not None and length not in FREE_AREA_LENGTHS:
        raise _bad("LENGTH(zone.free_area)", length, "is not a count of buddy orders (1-64)")
    r.free_area_length = length or 0
    return r


def sparsemem_bits(system: Any) -> tuple[int, int]:
    """(SECTION_SIZE_BITS, MAX_PHYSMEM_BITS), checked against the architecture's range."""
    info = system.vmcoreinfo
    arch = getattr(system.addrmap, "arch", "x86_64")
    l5 = 1 if info.number("pgtable_l5_enabled") else 0
    physmem_choices = PHYSMEM_BITS.get(arch, X86_64_MAX_PHYSMEM_BITS)
    section_range = SECTION_BITS.get(arch, range(X86_64_SECTION_SIZE_BITS,
                                                 X86_64_SECTION_SIZE_BITS + 1))
    section_bits = info.number("SECTION_SIZE_BITS")
    if section_bits is None:
        section_bits = X86_64_SECTION_SIZE_BITS
    elif section_bits not in section_range:
        raise _bad("NUMBER(SECTION_SIZE_BITS)", section_bits,
                   f"is not {arch}'s ({section_range.start}-{section_range.stop - 1})")
    physmem_bits = info.number("MAX_PHYSMEM_BITS")
    if physmem_bits is None:
        physmem_bits = physmem_choices[l5] if arch == "x86_64" else physmem_choices[-1]
    elif physmem_bits not in physmem_choices:
        raise _bad("NUMBER(MAX_PHYSMEM_BITS)", physmem_bits,
                   f"is not {arch}'s ({' or '.join(map(str, physmem_choices))})")
    page_bits = system.addrmap.page_size.bit_length() - 1
    if not page_bits < section_bits < physmem_bits:
        raise _bad("NUMBER(SECTION_SIZE_BITS)", section_bits,
                   f"is not between the page shift {page_bits} and MAX_PHYSMEM_BITS "
                   f"{physmem_bits}")
    return section_bits, physmem_bits


@dataclass(frozen=True)
class Section:
    """One memory section's page frames and the kernel virtual address of their struct pages."""

    pfn_start: int
    pfn_end: int
    mem_map: int  # vaddr of pfn_start's struct page


class Translator:
    """Kernel virtual to physical for the mem_map: the page tables, else the direct map."""

    def __init__(self, system: Any) -> None:
        from kcore.arch import walker_for

        self.system = system
        self.walker = walker_for(system)

    def runs(self, vaddr: int, length: int) -> list[tuple[int, int, int]]:
        """(vaddr, paddr, length) mapped runs of [vaddr, vaddr+length)."""
        if self.walker is not None:
            return self.walker.runs(vaddr, length)
        amap = self.system.addrmap
        start = getattr(amap, "page_offset", None)
        if start is not None and start <= vaddr < start + (1 << amap.max_physmem_bits):
            return [(vaddr, vaddr - start + amap.phys_offset, length)]
        return []

    def u64s(self, vaddr: int, count: int) -> list[int] | None:
        """count little-endian u64 at vaddr, or None if any byte is unmapped or unreadable."""
        buf = bytearray(8 * count)
        if not self._read(vaddr, buf):
            return None
        return [int.from_bytes(buf[i:i + 8], "little") for i in range(0, len(buf), 8)]

    def _read(self, vaddr: int, buf: bytearray) -> bool:
        view = memoryview(buf)
        pos = 0
        for va, pa, n in self.runs(vaddr, len(buf)):
            if va - vaddr != pos:
                return False
            if not self.system.source.contains(pa, n):
                return False
            st = self.system.source.readinto_phys(pa, view[pos:pos + n])
            if st.pages_zero_filled:
                return False
            pos += n
        return pos == len(buf)


def mem_map_sections(system: Any, max_pfn: int) -> list[Section]:
    """The sections below max_pfn whose mem_map the kernel has (makedumpfile: get_mm_sparsemem)."""
    info = system.vmcoreinfo
    mem_section = info.symbol("mem_section")
    sec_size = info.size("mem_section")
    map_off = info.offset("mem_section.section_mem_map") or 0
    page_size = system.addrmap.page_size
    struct_page = struct_page_size(info)
    section_bits, physmem_bits = sparsemem_bits(system)
    if mem_section is None or not sec_size:
        raise InputError("VMCOREINFO has no SYMBOL(mem_section)/SIZE(mem_section): "
                         "this kernel's mem_map cannot be found (not SPARSEMEM?)")
    if sec_size not in MEM_SECTION_SIZES:
        raise _bad("SIZE(mem_section)", sec_size, "is not the size of a struct mem_section "
                   "(8-256 bytes)")
    if map_off + 8 > sec_size:
        raise _bad("OFFSET(mem_section.section_mem_map)", map_off,
                   f"lies past the end of struct mem_section ({sec_size} bytes)")
    if max_pfn > 1 << (physmem_bits - page_size.bit_length() + 1):
        raise InputError(f"RAM reaches page frame {max_pfn:#x}, past MAX_PHYSMEM_BITS "
                         f"{physmem_bits}: the RAM ranges are not this kernel's")
    pfn_shift = section_bits - page_size.bit_length() + 1
    per_section = 1 << pfn_shift
    nr_sections = -(-max_pfn // per_section)
    per_root = page_size // sec_size  # _SECTIONS_PER_ROOT_EXTREME
    nr_mem_sections = 1 << (physmem_bits - section_bits)
    length = info.length("mem_section")
    extreme = length is None or length == -(-nr_mem_sections // per_root)
    tr = Translator(system)

    def decode(root_array: int | None) -> list[Section] | None:
        """validate_mem_section: the sections, or None when none is valid (or a bad one)."""
        roots: list[int] | None = None
        if root_array is not None:
            roots = tr.u64s(root_array, -(-nr_sections // per_root))
            if roots is None:
                return None
        out: list[Section] = []
        valid = False
        for nr in range(nr_sections):
            if roots is not None:
                root = roots[nr // per_root]
                if root == 0:
                    continue
                addr = root + (nr % per_root) * sec_size
            else:
                addr = mem_section + nr * sec_size
            word = tr.u64s(addr + map_off, 1)
            if word is None:
                continue
            coded = word[0]
            if not coded & SECTION_MARKED_PRESENT:
                continue  # no mem_map, or hot-removed
            mem_map = ((coded & SECTION_MAP_MASK) + nr * per_section * struct_page) & (
                (1 << 64) - 1)
            if mem_map < 0xFF00000000000000:  # !is_kvaddr: not this layout
                return None
            valid = True
            start = nr * per_section
            out.append(Section(start, min(start + per_section, max_pfn), mem_map))
        return out if valid else None

    if not extreme:
        found = decode(None)
    else:
        # SYMBOL(mem_section) is the root array; a vmlinux-style pointer to it as fallback
        found = decode(mem_section)
        if found is None:
            ptr = tr.u64s(mem_section, 1)
            found = decode(ptr[0]) if ptr is not None else None
    if found is None:
        raise InputError(f"no valid mem_section at {mem_section:#x}: the memory source does "
                         "not hold this kernel's mem_map")
    return found


@dataclass
class PageClasses:
    """The result of classifying a system's pages for one dump level."""

    level: int
    bitmap: bytearray  # bit n set: page frame n is kept
    max_pfn: int
    page_size: int
    counts: dict[str, int] = field(default_factory=dict)  # pages left out per class
    unreadable_mem_map: int = 0  # pages kept because their struct page could not be read
    no_mem_map: int = 0  # pages kept because their section has no mem_map
    gap_kept: int = 0  # excluded pages kept to bound the number of ranges (kept_source)
    seconds: float = 0.0
    classified: bool = True  # False: the level needed no mem_map walk

    def runs(self, paddr: int, length: int) -> Iterator[tuple[int, int]]:
        """The kept (paddr, length) runs of physical [paddr, paddr+length), page-aligned."""
        from kcore._native import ffi, lib

        page = self.page_size
        lo, hi = paddr // page, -(-(paddr + length) // page)
        end_pfn = min(hi, self.max_pfn)
        buf = ffi.new("uint64_t[]", 2 * RUNS_BATCH)
        nruns, nxt, nset = ffi.new("size_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        bm = ffi.from_buffer(self.bitmap)
        pfn = lo
        while pfn < end_pfn:
            rc = lib.kc_bitmap_runs(bm, pfn, end_pfn, buf, RUNS_BATCH, nruns, nxt, nset)
            if rc:
                raise ValueError("kc_bitmap_runs: bad arguments")
            for k in range(nruns[0]):
                s, n = buf[2 * k], buf[2 * k + 1]
                a, b = max(s * page, paddr), min((s + n) * page, paddr + length)
                if a < b:
                    yield a, b - a
            pfn = nxt[0]
        if hi > self.max_pfn and self.max_pfn * page < paddr + length:
            a = max(self.max_pfn * page, paddr)
            yield a, paddr + length - a  # beyond the bitmap: not classified, kept

    def kept_pages(self, paddr: int, length: int) -> int:
        """Pages of physical [paddr, paddr+length) that are kept."""
        return sum(n for _a, n in self.runs(paddr, length)) // self.page_size

    def excluded(self) -> int:
        """Pages left out by the mem_map classes."""
        return sum(v for k, v in self.counts.items() if k != "zero")


_ONES = b"\xff" * (1 << 20)


def _set_bits(bitmap: bytearray, lo: int, hi: int) -> None:
    """Set bits [lo, hi) of bitmap."""
    if lo >= hi:
        return
    a, b = -(-lo // 8), hi // 8
    if a >= b:
        for pfn in range(lo, hi):
            bitmap[pfn >> 3] |= 1 << (pfn & 7)
        return
    for pfn in range(lo, a * 8):
        bitmap[pfn >> 3] |= 1 << (pfn & 7)
    view = memoryview(bitmap)
    for at in range(a, b, len(_ONES)):  # no temporary as large as the bitmap
        n = min(len(_ONES), b - at)
        view[at:at + n] = _ONES[:n]
    for pfn in range(b * 8, hi):
        bitmap[pfn >> 3] |= 1 << (pfn & 7)


def classify(system: Any, level: int, ranges: Iterable[tuple[int, int]],
             progress: Callable[[int], None] | None = None) -> PageClasses:
    """Classify the pages of the physical (paddr, length) ranges for a dump level.

    Raises InputError naming the VMCOREINFO fields the level needs and lacks.
    """
    from kcore._native import ffi, lib

    t0 = time.perf_counter()
    info = system.vmcoreinfo
    missing = missing_fields(info, level)
    if missing:
        raise InputError(f"dump level {level} needs VMCOREINFO {', '.join(missing)}, which "
                         f"this kernel does not give (use a level without those classes)")
    page = system.addrmap.page_size
    spans = sorted((pa // page, -(-(pa + n) // page)) for pa, n in ranges if n > 0)
    max_pfn = max((hi for _lo, hi in spans), default=0)
    bitmap = bytearray(-(-max_pfn // 8))
    for lo, hi in spans:
        _set_bits(bitmap, lo, hi)
    result = PageClasses(level, bitmap, max_pfn, page)
    result.counts = dict.fromkeys(CLASSES, 0)
    if not needs_mem_map(info, level) or max_pfn == 0 or info.symbol("mem_section") is None:
        result.classified = False
        result.seconds = time.perf_counter() - t0
        return result
    rules = page_rules(info, level)
    sections = mem_map_sections(system, max_pfn)
    tr = Translator(system)
    counts = ffi.new("struct kc_page_counts *")
    skip = ffi.new("uint64_t *")
    bm = ffi.from_buffer(bitmap)
    struct_size = rules.struct_size
    buf = bytearray(SECTION_CHUNK_PAGES * struct_size)
    for sec in sections:
        for lo, hi in _overlaps(spans, sec.pfn_start, sec.pfn_end):
            # whole 512-page groups, as makedumpfile reads them (compound heads)
            lo = max(sec.pfn_start, lo // PGMM_CACHED * PGMM_CACHED)
            hi = min(sec.pfn_end, -(-hi // PGMM_CACHED) * PGMM_CACHED)
            for start in range(lo, hi, SECTION_CHUNK_PAGES):
                n = min(SECTION_CHUNK_PAGES, hi - start)
                vaddr = sec.mem_map + (start - sec.pfn_start) * struct_size
                bad = _read_structs(system, tr, vaddr, memoryview(buf)[:n * struct_size],
                                    struct_size)
                if not bad:
                    _check(lib.kc_classify_pages(rules, ffi.from_buffer(buf), n, start, bm,
                                                 max_pfn, skip, counts))
                else:
                    _classify_around(rules, buf, n, start, bm, max_pfn, skip, counts, bad,
                                     struct_size, result)
                if progress is not None:
                    progress(n)
    result.no_mem_map = _pages_without_map(spans, sections)
    result.counts.update(free=counts.free, cache=counts.cache,
                         cache_private=counts.cache_private, user=counts.user,
                         hwpoison=counts.hwpoison, offline=counts.offline)
    result.seconds = time.perf_counter() - t0
    return result


def _check(rc: int) -> None:
    if rc:
        raise InputError(f"VMCOREINFO's struct page layout is inconsistent (the classifier "
                         f"refused it: {os.strerror(-rc)}): dump without -d")


def _overlaps(spans: list[tuple[int, int]], lo: int, hi: int) -> Iterator[tuple[int, int]]:
    for a, b in spans:
        a, b = max(a, lo), min(b, hi)
        if a < b:
            yield a, b


def _pages_without_map(spans: list[tuple[int, int]], sections: list[Section]) -> int:
    total = sum(b - a for a, b in spans)
    mapped = sum(b - a for s in sections for a, b in _overlaps(spans, s.pfn_start, s.pfn_end))
    return total - mapped


def _read_structs(system: Any, tr: Translator, vaddr: int, view: memoryview,
                  struct_size: int) -> list[tuple[int, int]]:
    """Read struct pages at vaddr into view; return the (offset, length) parts unreadable."""
    source = system.source
    page = system.addrmap.page_size
    bad: list[tuple[int, int]] = []
    pos = 0
    for va, pa, n in tr.runs(vaddr, len(view)):
        at = va - vaddr
        if at > pos:
            bad.append((pos, at - pos))
        st = source.readinto_phys(pa, view[at:at + n]) if source.contains(pa, n) else None
        if st is None or st.pages_zero_filled:
            # find the unreadable mem_map pages one by one
            for p in range(at, at + n, page):
                k = min(page - (pa + p - at) % page, at + n - p)
                q = pa + p - at
                ok = source.contains(q, k) and not source.readinto_phys(
                    q, view[p:p + k]).pages_zero_filled
                if not ok:
                    bad.append((p, k))
        pos = at + n
    if pos < len(view):
        bad.append((pos, len(view) - pos))
    return bad


def _classify_around(rules: Any, buf: bytearray, n: int, start: int, bm: Any, max_pfn: int,
                     skip: Any, counts: Any, bad: list[tuple[int, int]], struct_size: int,
                     result: PageClasses) -> None:
    """Classify the readable struct pages of a chunk; the pages of unreadable ones are kept."""
    from kcore._native import ffi, lib

    ok = [True] * n
    for off, length in bad:
        for i in range(off // struct_size, min(n, -(-(off + length) // struct_size))):
            ok[i] = False
    i = 0
    view = ffi.from_buffer(buf)
    while i < n:
        j = i
        while j < n and ok[j] == ok[i]:
            j += 1
        if ok[i]:
            _check(lib.kc_classify_pages(rules, view + i * struct_size, j - i, start + i, bm,
                                         max_pfn, skip, counts))
        else:
            result.unreadable_mem_map += sum(
                1 for pfn in range(start + i, start + j)
                if pfn < max_pfn and result.bitmap[pfn >> 3] >> (pfn & 7) & 1)
        i = j


MAX_KEPT_RUNS = 1 << 14  # kept runs a view holds at most (the smallest gaps are kept beyond)


def kept_source(source: Any, classes: PageClasses, max_runs: int = MAX_KEPT_RUNS) -> Any:
    """A view of a memory source that holds only the kept pages (its extents cut to them).

    Every format lays out what a source holds and treats the rest as zeros (holes, zero-fill
    loads, split ranges): this is where the dump level enters a plan. Past max_runs runs the
    smallest excluded gaps are kept (as makedumpfile -E keeps gaps under 256 pages), so the
    view stays small; classes.gap_kept counts those pages.
    """
    import copy

    from kcore.sources.base import Extent

    page = classes.page_size
    runs: list[tuple[int, int, int]] = []  # (paddr, length, extent index)
    for k, e in enumerate(source.extents):
        runs.extend((a, n, k) for a, n in classes.runs(e.paddr, e.length))
    if len(runs) > max_runs:
        gaps = sorted((runs[i + 1][0] - runs[i][0] - runs[i][1], i)
                      for i in range(len(runs) - 1) if runs[i][2] == runs[i + 1][2])
        close = {i for _n, i in gaps[:len(runs) - max_runs]}
        merged: list[tuple[int, int, int]] = []
        for i, (a, n, k) in enumerate(runs):
            if i - 1 in close:
                pa, pn, pk = merged[-1]
                gap = a - pa - pn
                classes.gap_kept += gap // page
                _set_bits(classes.bitmap, (pa + pn) // page,
                          min((pa + pn + gap) // page, classes.max_pfn))
                merged[-1] = (pa, a + n - pa, pk)
            else:
                merged.append((a, n, k))
        runs = merged
    extents = [Extent(a, n, source.extents[k].offset + a - source.extents[k].paddr)
               for a, n, k in runs]
    view = copy.copy(source)
    view._set_extents(extents)
    view.close = lambda: None  # the fds belong to the source
    return view
