"""Which tool is right about a page: the kernel's own state, read with drgn from the core.

For page frames where kcore's `-d` page set and makedumpfile's differ, drgn (with the kernel's
debug vmlinux) reads the buddy allocator's free lists (every zone, order and migrate type),
the per-CPU page lists, and each page's flags, mapping and page_type, and says what the page
is: not-ram (outside System RAM), free (in a buddy block), pcp (free but on a per-CPU list:
makedumpfile keeps those), zero, anon (user data), cache (a file's, or shmem's, page cache),
slab, or other. -d's bits:
1 zero, 2 cache without private, 4 cache with private, 8 user, 16 free (makedumpfile(8)).
"""

from __future__ import annotations

from pathlib import Path

PAGE = 4096


def _free_blocks(prog) -> dict[int, int]:
    """{first pfn: order} of every block on a buddy free list."""
    from drgn import cast
    from drgn.helpers.linux.list import list_for_each_entry
    from drgn.helpers.linux.mm import page_to_pfn

    out: dict[int, int] = {}
    nodes = prog["node_data"] if "node_data" in prog else [prog["contig_page_data"].address_of_()]
    for nid in range(int(prog["nr_online_nodes"]) if "nr_online_nodes" in prog else 1):
        pgdat = nodes[nid]
        for z in range(len(pgdat.node_zones)):
            zone = pgdat.node_zones[z]
            if not zone.present_pages:
                continue
            for order in range(len(zone.free_area)):
                area = zone.free_area[order]
                for mt in range(len(area.free_list)):
                    for page in list_for_each_entry("struct page",
                                                    area.free_list[mt].address_of_(),
                                                    "buddy_list" if _has(prog, "buddy_list")
                                                    else "lru"):
                        out[int(page_to_pfn(cast("struct page *", page)))] = order
    return out


def _pcp_pages(prog) -> set[int]:
    """pfns on the per-CPU page lists (freed, not yet back in the buddy lists)."""
    from drgn.helpers.linux.cpumask import for_each_online_cpu
    from drgn.helpers.linux.list import list_for_each_entry
    from drgn.helpers.linux.mm import page_to_pfn
    from drgn.helpers.linux.percpu import per_cpu_ptr

    link = "pcp_list" if _has(prog, "pcp_list") else "lru"
    out: set[int] = set()
    pgdat = prog["node_data"][0] if "node_data" in prog else prog["contig_page_data"]
    for z in range(len(pgdat.node_zones)):
        zone = pgdat.node_zones[z]
        if not zone.present_pages:
            continue
        for cpu in for_each_online_cpu(prog):
            pcp = per_cpu_ptr(zone.per_cpu_pageset, cpu)
            for i in range(len(pcp.lists)):
                for page in list_for_each_entry("struct page", pcp.lists[i].address_of_(), link):
                    out.add(int(page_to_pfn(page)))
    return out


def _head(prog, page):
    """The compound head of page (a struct page *), by include/linux/page-flags.h's
    _compound_head: bit 0 of compound_head (compound_info from 7.x) marks a tail; the rest is
    the head's address, or from 7.x, with a power-of-two struct page and HVO
    (compound_info_has_mask()), a mask that turns the tail's address into the head's."""
    import drgn

    info = int(page.compound_info if _has(prog, "compound_info") else page.compound_head)
    if not info & 1:
        return page
    low = ~info & ((1 << 64) - 1) | 1  # set_compound_head's mask: GENMASK(63, shift) | 1
    if _has(prog, "compound_info") and low & (low + 1) == 0:
        return drgn.Object(prog, "struct page *", page.value_() & info)
    return drgn.Object(prog, "struct page *", info - 1)


def _flags(page) -> int:
    """page->flags (a memdesc_flags_t, struct { unsigned long f; }, from 7.x)."""
    try:
        return int(page.flags)
    except TypeError:
        return int(page.flags.f)


def _is_slab(prog, page, flags: int) -> bool:
    """PG_slab, or from 6.10 the page type PGTY_slab (page_type's top byte)."""
    try:
        return bool(flags >> int(prog["PG_slab"]) & 1)
    except KeyError:
        return int(page.page_type) >> 24 == int(prog["PGTY_slab"])


def _has(prog, member: str) -> bool:
    try:
        prog.type("struct page").member(member)
        return True
    except LookupError:
        return False


def judge(core: Path, vmlinux: Path, pfns: list[int], iomem: Path | None = None
          ) -> dict[int, str]:
    """What each pfn is, by the kernel's own state in the core (with the guest's proc/iomem:
    "not-ram" outside System RAM, which /proc/kcore and so kcore leave out at every level)."""
    out: dict[int, str] = {}
    if iomem is not None:
        from kcore.iomem import parse_iomem

        ram = parse_iomem(iomem.read_text(), str(iomem)).system_ram()
        for pfn in pfns:
            if not any(s <= pfn * PAGE and pfn * PAGE + PAGE - 1 <= e for s, e in ram):
                out[pfn] = "not-ram"
        pfns = [p for p in pfns if p not in out]
        if not pfns:
            return out
    import drgn
    from drgn.helpers.linux.mm import pfn_to_page

    prog = drgn.Program()
    prog.set_core_dump(str(core))
    prog.load_debug_info([str(vmlinux)])
    free = _free_blocks(prog)
    free_pfns = {p + i for p, order in free.items() for i in range(1 << order)}
    pcp = _pcp_pages(prog)
    for pfn in pfns:
        if pfn in free_pfns:
            out[pfn] = "free"
            continue
        if pfn in pcp:
            out[pfn] = "pcp"
            continue
        try:
            data = prog.read(pfn * PAGE, PAGE, True)
        except drgn.FaultError:
            out[pfn] = "unreadable"
            continue
        if data == bytes(PAGE):
            out[pfn] = "zero"
            continue
        page = pfn_to_page(prog, pfn)
        head = _head(prog, page)
        mapping = int(head.mapping)
        flags = _flags(head)
        if _is_slab(prog, head, flags):
            kind = "slab"
        elif mapping & 1:
            kind = "anon"
        elif mapping and (flags >> int(prog["PG_lru"]) & 1 or
                              flags >> int(prog["PG_swapbacked"]) & 1):
            kind = "cache"
        elif mapping:
            kind = "mapped-not-lru"
        else:
            kind = f"other(flags={flags:#x},type={int(head.page_type):#x})"
        out[pfn] = kind
    return out
