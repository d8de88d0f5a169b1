"""The kernel page-table walk: real page tables of the captures, and built ones."""

from __future__ import annotations

import json
import struct

import pytest

from kcore.addrmap import PAGE_SIZE, x86_64_map
from kcore.sources import open_source
from kcore.vmcoreinfo import VmcoreInfo
from kcore.vmem import PageWalker
from tests.helpers import fixture_memory, shared_fixture

CAPTURES = {"linux-6.1.0-56-kaslr-512M": "elf", "linux-6.1.0-56-nokaslr-512M": "raw"}


def _vmcoreinfo(name: str, src) -> VmcoreInfo:
    """VMCOREINFO from the source's note, or through the root's sys/kernel/vmcoreinfo."""
    if src.vmcoreinfo:
        return VmcoreInfo.parse(src.vmcoreinfo)
    # "%pa %x": the note's physical address and VMCOREINFO_NOTE_SIZE, both hex.
    text = (shared_fixture(name) / "root/sys/kernel/vmcoreinfo").read_text().split()
    buf = src.read_phys(int(text[0], 16), int(text[1], 16))[0]
    namesz, descsz, _ = struct.unpack_from("<III", buf)
    start = 12 + (namesz + 3) // 4 * 4
    return VmcoreInfo.parse(buf[start:start + descsz])


@pytest.fixture(params=sorted(CAPTURES), scope="module")
def capture(request):
    """(name, source, walker from init_top_pgt, kcore.json) of one capture."""
    name = request.param
    src = open_source(f"{CAPTURES[name]}:{fixture_memory(name)}")
    info = _vmcoreinfo(name, src)
    kernel = x86_64_map(text_start=0, text_end=0, phys_base=info.number("phys_base"))
    pgd = kernel.pa_symbol(info.symbol("init_top_pgt"))  # __pa_symbol()
    levels = 5 if info.number("pgtable_l5_enabled") else 4
    walker = PageWalker.for_source(src, pgd, levels, sme_mask=info.number("sme_mask") or 0)
    meta = json.loads((shared_fixture(name) / "expected/kcore.json").read_text())
    yield name, src, walker, meta
    src.close()


def _modules(name: str) -> list[tuple[str, int, int]]:
    out = []
    for line in (shared_fixture(name) / "root/proc/modules").read_text().splitlines():
        parts = line.split()
        out.append((parts[0], int(parts[1]), int(parts[-1], 16)))
    return out


def test_text_through_the_walk_equals_kcore_and_pa_symbol(capture) -> None:
    """Text read through the page tables is what /proc/kcore gave, and __pa_symbol agrees."""
    name, src, walker, meta = capture
    text = next(r for r in meta["reads"] if r["file"] == "kcore-text-2M.bin")
    want = (shared_fixture(name) / "expected/kcore-text-2M.bin").read_bytes()
    assert walker.read(text["vaddr"], text["length"]) == want
    assert walker.translate(text["vaddr"])[0] == text["paddr"]
    seg = next(p for p in meta["phdrs"] if p.get("kind") == "KCORE_TEXT")
    # The whole image is mapped, physically contiguous at p_paddr (= __pa_symbol(_text)).
    assert walker.runs(seg["p_vaddr"], seg["p_filesz"]) == [
        (seg["p_vaddr"], seg["p_paddr"], seg["p_filesz"])]


def test_direct_map_through_the_walk(capture) -> None:
    """The direct map translates to __pa(): RAM read by the walk equals kcore's RAM bytes."""
    name, src, walker, meta = capture
    ram0 = next(r for r in meta["reads"] if r["file"] == "kcore-ram0.bin")
    want = (shared_fixture(name) / "expected/kcore-ram0.bin").read_bytes()
    assert walker.read(ram0["vaddr"], ram0["length"]) == want
    page_offset = int(meta["values_read_through_kcore"]["page_offset_base"], 16)
    for paddr in (0x1000, 0x100000, 0x1FEDF000):
        assert walker.translate(page_offset + paddr)[0] == paddr


def test_modules_read_mapped_code_and_guard_pages_read_zeros(capture) -> None:
    """Every module in proc/modules is mapped at its base (code, not zeros); guards are zeros."""
    name, src, walker, meta = capture
    mods = _modules(name)
    starts = {base for _, _, base in mods}
    for mod, size, base in mods:
        pages = (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        runs = walker.runs(base, pages)
        assert sum(n for _, _, n in runs) == pages, mod
        head = walker.read(base, 64)
        assert head.strip(b"\0"), mod
        # module_alloc() is a vmalloc area with a guard page after it.
        guard = base + pages
        if guard not in starts:
            assert walker.translate(guard) is None, mod
            assert walker.read(guard, PAGE_SIZE) == bytes(PAGE_SIZE)
        # A read straddling the end: data, then the guard's zeros.
        tail = walker.read(guard - 16, 32)
        if guard not in starts:
            assert tail[16:] == bytes(16)


def test_vmalloc_area_is_sparse_and_unmapped_reads_zero(capture) -> None:
    """The vmalloc area: some pages mapped; between the mapped runs everything reads zero."""
    name, src, walker, meta = capture
    seg = next(p for p in meta["phdrs"] if p.get("kind") == "KCORE_VMALLOC(vmalloc area)")
    runs = walker.runs(seg["p_vaddr"], seg["p_filesz"])
    mapped = sum(n for _, _, n in runs)
    assert 0 < mapped < 64 << 20
    va, pa, n = runs[0]
    window = walker.read(va - 2 * PAGE_SIZE, n + 4 * PAGE_SIZE)
    assert window[:2 * PAGE_SIZE] == bytes(2 * PAGE_SIZE)
    assert window[2 * PAGE_SIZE:2 * PAGE_SIZE + n] == src.read_phys(pa, n)[0]
    gap_start = va + n
    nxt = next((r for r in runs if r[0] > gap_start), None)
    if nxt and walker.translate(gap_start) is None:
        assert walker.read(gap_start, min(nxt[0] - gap_start, 1 << 20)).count(0) == min(
            nxt[0] - gap_start, 1 << 20)


def test_vmemmap_is_mapped(capture) -> None:
    """The vmemmap entries of kcore are mapped (struct pages of RAM)."""
    name, src, walker, meta = capture
    for p in meta["phdrs"]:
        if p.get("kind") == "KCORE_VMEMMAP":
            assert sum(n for _, _, n in walker.runs(p["p_vaddr"], p["p_filesz"])) == p["p_filesz"]


# ---- built page tables -----------------------------------------------------------------------

class Phys:
    """A sparse physical memory for built page tables."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}

    def page(self, paddr: int) -> bytearray:
        return self.pages.setdefault(paddr & ~(PAGE_SIZE - 1), bytearray(PAGE_SIZE))

    def set_entry(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.page(table), index * 8, value)

    def read_phys(self, paddr: int, length: int) -> bytes:
        out = bytearray()
        while length:
            n = min(length, PAGE_SIZE - paddr % PAGE_SIZE)
            page = self.pages.get(paddr & ~(PAGE_SIZE - 1))
            off = paddr % PAGE_SIZE
            out += page[off:off + n] if page else bytes(n)
            paddr += n
            length -= n
        return bytes(out)


NX = 1 << 63
P, RW, PSE = 1, 2, 0x80


def _idx(va: int, shift: int) -> int:
    return (va >> shift) & 511


def test_built_four_level_tables_with_large_pages_and_nx() -> None:
    """4 KiB, 2 MiB and 1 GiB leaves, NX and high flag bits masked, holes unmapped."""
    mem = Phys()
    pgd, pud, pmd, pte = 0x1000, 0x2000, 0x3000, 0x4000
    va4k = 0xFFFFC90000000000
    mem.set_entry(pgd, _idx(va4k, 39), pud | P | RW)
    mem.set_entry(pud, _idx(va4k, 30), pmd | P | RW)
    mem.set_entry(pmd, _idx(va4k, 21), pte | P | RW)
    mem.set_entry(pte, 0, 0x100000 | P | RW | NX)
    mem.set_entry(pte, 1, 0x200000 | P | RW | NX)  # not contiguous with page 0
    mem.set_entry(pte, 2, 0x201000 | P | NX)  # contiguous with page 1
    # page 3 unmapped (a guard page)
    va2m = va4k + (2 << 20)
    mem.set_entry(pmd, _idx(va2m, 21), 0x40000000 | P | PSE | NX | (1 << 12))  # PAT bit
    va1g = va4k + (1 << 30)
    mem.set_entry(pud, _idx(va1g, 30), 0x80000000 | P | PSE)
    for pa, fill in ((0x100000, b"A"), (0x200000, b"B"), (0x201000, b"C"),
                     (0x40000000 + 0x5000, b"D"), (0x80000000 + 0x123000, b"E")):
        mem.page(pa)[:] = fill * PAGE_SIZE
    w = PageWalker(mem.read_phys, pgd, 4)
    assert w.translate(va4k + 5) == (0x100005, PAGE_SIZE)
    assert w.translate(va4k + 3 * PAGE_SIZE) is None
    assert w.translate(va2m + 0x5010) == (0x40005010, 2 << 20)
    assert w.translate(va1g + 0x123456) == (0x80123456, 1 << 30)
    assert w.translate(0xFFFF888000000000) is None
    assert w.runs(va4k, 4 * PAGE_SIZE) == [(va4k, 0x100000, PAGE_SIZE),
                                           (va4k + PAGE_SIZE, 0x200000, 2 * PAGE_SIZE)]
    data = w.read(va4k + PAGE_SIZE - 2, 3 * PAGE_SIZE + 4)
    assert data == b"AA" + b"B" * PAGE_SIZE + b"C" * PAGE_SIZE + bytes(PAGE_SIZE + 2)
    assert w.read(va2m + 0x5000, 8) == b"D" * 8
    assert w.read(va1g + 0x123000, 8) == b"E" * 8
    assert w.runs(va2m, 4096) == [(va2m, 0x40000000, 4096)]


def test_built_five_level_tables_and_sme_mask() -> None:
    """5-level paging starts one level higher; the SME C-bit is cleared from entries."""
    mem = Phys()
    c_bit = 1 << 47
    pgd, p4d, pud, pmd, pte = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
    va = 0xFFA0000000000000
    mem.set_entry(pgd, _idx(va, 48), p4d | c_bit | P)
    mem.set_entry(p4d, _idx(va, 39), pud | c_bit | P)
    mem.set_entry(pud, _idx(va, 30), pmd | c_bit | P)
    mem.set_entry(pmd, _idx(va, 21), pte | c_bit | P)
    mem.set_entry(pte, _idx(va, 12), 0x9000 | c_bit | P | NX)
    mem.page(0x9000)[:8] = b"fivelvl!"
    w = PageWalker(mem.read_phys, pgd, 5, sme_mask=c_bit)
    assert w.translate(va) == (0x9000, PAGE_SIZE)
    assert w.read(va, 8) == b"fivelvl!"
    with pytest.raises(ValueError):
        PageWalker(mem.read_phys, pgd, 3)
