"""Classifying the mem_map of 1 TiB of RAM: time and peak RSS, on a sparse synthetic image.

The image is a sparse raw file of 1 TiB whose only non-zero bytes are a SPARSEMEM_EXTREME
mem_section tree (laid out as Linux 6.1 lays it, VMCOREINFO numbers of Debian's 6.1 kernel)
and a few thousand struct pages of free blocks; the 16 GiB struct page array is otherwise
holes (zero struct pages: kept). kcore.pageclass.classify reads all of it through the raw
source and classifies 268 million pages in C. The figure that matters is the peak RSS.

On paper, per TiB of RAM (4 KiB pages): the kept bitmap, 1 bit a page, is 32 MiB; the
struct page buffer is 2 MiB (one 32768-page chunk); the section list 8192 small objects
(~1 MiB); the source view at most MAX_KEPT_RUNS (16384) extents; the ELF writer at most
65533 program headers. Everything else is the interpreter and kcore's modules (~40 MiB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHM = Path(os.environ.get("KCORE_BENCH_DIR", "/dev/shm"))
TIB = 1 << 40
PAGE_OFFSET = 0xFFFF888000000000
ROOTS = 2 << 30  # physical address of the root array, then one page per root
MEM_MAP = 4 << 30  # physical address of the struct page array (16 GiB per TiB)
SECTION_BITS, PER_ROOT, SEC_SIZE, SP = 27, 128, 32, 64

VMCOREINFO = f"""OSRELEASE=6.1.0-56-amd64
PAGESIZE=4096
SYMBOL(mem_section)={PAGE_OFFSET + ROOTS:x}
LENGTH(mem_section)=4096
SIZE(mem_section)=32
OFFSET(mem_section.section_mem_map)=0
NUMBER(SECTION_SIZE_BITS)=27
NUMBER(MAX_PHYSMEM_BITS)=46
SIZE(page)=64
OFFSET(page.flags)=0
OFFSET(page._refcount)=52
OFFSET(page.mapping)=24
OFFSET(page.lru)=8
OFFSET(page._mapcount)=48
OFFSET(page.private)=40
OFFSET(page.compound_dtor)=16
OFFSET(page.compound_order)=17
OFFSET(page.compound_head)=8
LENGTH(zone.free_area)=11
NUMBER(PG_lru)=4
NUMBER(PG_private)=13
NUMBER(PG_swapcache)=10
NUMBER(PG_swapbacked)=19
NUMBER(PG_slab)=9
NUMBER(PG_hwpoison)=23
NUMBER(PG_head_mask)=65536
NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129
NUMBER(HUGETLB_PAGE_DTOR)=2
NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)=-257
"""

CHILD = r"""
import json, resource, sys, time
from types import SimpleNamespace
from kcore.pageclass import classify, kept_source
from kcore.sources import open_source
from kcore.vmcoreinfo import VmcoreInfo

path, ram, text = sys.argv[1], int(sys.argv[2]), sys.argv[3]
src = open_source(f"raw:{path}")
amap = SimpleNamespace(page_size=4096, page_offset=0xFFFF888000000000, max_physmem_bits=46,
                       phys_offset=0, pgd_paddr=None, arch="x86_64")
system = SimpleNamespace(vmcoreinfo=VmcoreInfo.parse(text.encode()), addrmap=amap, source=src)
t0 = time.perf_counter()
pc = classify(system, 31, [(0, ram)])
view = kept_source(src, pc)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "free": pc.counts["free"], "extents": len(view.extents),
                  "bitmap": len(pc.bitmap),
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def build(path: Path, ram: int, blocks: int) -> None:
    """The sparse image: mem_section roots and sections, and `blocks` order-10 free blocks."""
    nsec = ram >> SECTION_BITS
    nroots = -(-nsec // PER_ROOT)
    with open(path, "wb") as f:
        f.truncate(ram)
        f.seek(ROOTS)
        f.write(b"".join((PAGE_OFFSET + ROOTS + 4096 * (1 + r)).to_bytes(8, "little")
                         for r in range(nroots)))
        # sparse_encode_mem_map: mem_map - section_nr_to_pfn(nr) * sizeof(struct page),
        # the same for every section when the array is one block
        coded = ((PAGE_OFFSET + MEM_MAP) | 1).to_bytes(8, "little")
        for r in range(nroots):
            f.seek(ROOTS + 4096 * (1 + r))
            f.write((coded + bytes(SEC_SIZE - 8)) * PER_ROOT)
        step = (ram >> 12) // blocks // 1024 * 1024
        for b in range(blocks):
            pfn = (b * step) or 1024
            f.seek(MEM_MAP + pfn * SP + 40)  # private: the order; _mapcount: PageBuddy
            f.write((10).to_bytes(8, "little") + (-129 & 0xFFFFFFFF).to_bytes(4, "little"))


def test_one_tib_mem_map_stays_small(benchmark, record, note):
    st = os.statvfs(SHM)
    if st.f_bavail * st.f_frsize < (64 << 20):
        pytest.skip(f"{SHM} has no room for the image's few written pages")
    path = SHM / f"kcore-bench-memmap-{os.getpid()}.raw"
    blocks = 4096
    try:
        build(path, TIB, blocks)
        env = dict(os.environ, PYTHONPATH=str(REPO))

        def run() -> dict:
            r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(TIB), VMCOREINFO],
                               capture_output=True, text=True, env=env, check=True)
            return json.loads(r.stdout)

        got = benchmark.pedantic(run, rounds=1)
    finally:
        path.unlink(missing_ok=True)
    rss = got["rss_kib"] / 1024
    assert got["free"] == blocks * 1024  # every synthetic free block found and left out
    record("1 TiB of RAM (sparse synthetic mem_map, 268M struct pages): peak RSS of "
           "classify + kept_source", f"{rss:.0f} MiB (bitmap {got['bitmap'] >> 20} MiB, "
           f"{got['seconds']:.1f} s, {got['extents']} kept runs)", "<= 200 MiB", rss <= 200)
    note(f"1 TiB synthetic: {got['seconds']:.1f} s to read and classify 16 GiB of struct pages "
         f"(holes) in C, {blocks} order-10 free blocks found; peak RSS {rss:.0f} MiB of which "
         f"the bitmap is {got['bitmap'] >> 20} MiB.")
    assert rss <= 200
