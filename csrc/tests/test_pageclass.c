/*
 * Unit tests of the page classifier (csrc/pageclass.c), built with
 * -fsanitize=address,undefined by tests/test_pageclass.py. Struct pages laid
 * out as Linux 6.1's VMCOREINFO describes them (64 bytes, flags at 0, lru and
 * compound_head at 8, compound_dtor/order at 16/17, mapping at 24, private at
 * 40, _mapcount at 48), with the page-flag numbers it gives.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kcore_api.h"
#include "check.h"

enum { SP = 64, NPAGES = 4096, PG_LRU = 4, PG_PRIVATE = 13, PG_SWAPCACHE = 10,
       PG_SWAPBACKED = 19, PG_SLAB = 9, PG_HWPOISON = 23, HEAD_MASK = 1 << 16,
       BUDDY = -129, OFFLINE = -257, HUGETLB_DTOR = 2 };


static void put(unsigned char *pages, uint64_t pfn, int off, uint64_t v, int width)
{
    for (int i = 0; i < width; i++)
        pages[pfn * SP + (uint64_t)off + (uint64_t)i] = (unsigned char)(v >> (8 * i));
}

static struct kc_page_rules rules_6_1(uint32_t level)
{
    struct kc_page_rules r;

    memset(&r, 0, sizeof(r));
    r.dump_level = level;
    r.known = KC_KNOW_BUDDY_MAPCOUNT | KC_KNOW_OFFLINE_MAPCOUNT | KC_KNOW_HUGETLB_DTOR;
    r.struct_size = SP;
    r.off_flags = 0;
    r.off_mapping = 24;
    r.off_mapcount = 48;
    r.off_private = 40;
    r.off_compound_head = 8;
    r.off_order = 17;
    r.off_dtor = 16;
    r.order_width = r.dtor_width = 1;
    r.pg_lru = PG_LRU;
    r.pg_private = PG_PRIVATE;
    r.pg_swapcache = PG_SWAPCACHE;
    r.pg_swapbacked = PG_SWAPBACKED;
    r.pg_slab = PG_SLAB;
    r.pg_hwpoison = PG_HWPOISON;
    r.pg_buddy = -1;
    r.pg_hugetlb = -1;
    r.head_mask = HEAD_MASK;
    r.buddy_mapcount = BUDDY;
    r.offline_mapcount = OFFLINE;
    r.hugetlb_dtor = HUGETLB_DTOR;
    r.free_area_length = 11;
    return r;
}

static int kept(const uint8_t *bm, uint64_t pfn)
{
    return (bm[pfn >> 3] >> (pfn & 7)) & 1;
}

static unsigned char *sample(void)
{
    unsigned char *p = calloc(NPAGES, SP);

    for (uint64_t pfn = 0; pfn < NPAGES; pfn++)
        put(p, pfn, 48, (uint32_t)-1, 4); /* _mapcount -1: an unmapped page */
    /* 16..23: a free block of order 3 */
    put(p, 16, 48, (uint32_t)BUDDY, 4);
    put(p, 16, 40, 3, 8);
    /* 32: a page-cache page; 33: one with private data; 34: swap cache (swapbacked) */
    put(p, 32, 0, 1u << PG_LRU, 8);
    put(p, 33, 0, (1u << PG_LRU) | (1u << PG_PRIVATE), 8);
    put(p, 34, 0, (1u << PG_SWAPCACHE) | (1u << PG_SWAPBACKED), 8);
    /* 35: swap cache without swapbacked: PG_swapcache means something else then */
    put(p, 35, 0, 1u << PG_SWAPCACHE, 8);
    /* 36: an anonymous page (on the LRU too: user data, not cache) */
    put(p, 36, 0, 1u << PG_LRU, 8);
    put(p, 36, 24, 0xffff888000001001ull, 8);
    /* 64..71: an anonymous compound page of order 3 (tails point at the head) */
    put(p, 64, 0, HEAD_MASK, 8);
    put(p, 64, 24, 0xffff888000002001ull, 8);
    put(p, 65, 17, 3, 1);
    for (uint64_t t = 65; t < 72; t++)
        put(p, t, 8, 0xffffea0000001000ull | 1, 8);
    /* 128..131: a hugetlbfs page of order 2 (destructor in the first tail) */
    put(p, 128, 0, HEAD_MASK, 8);
    put(p, 129, 16, HUGETLB_DTOR, 1);
    put(p, 129, 17, 2, 1);
    for (uint64_t t = 129; t < 132; t++)
        put(p, t, 8, 0xffffea0000002000ull | 1, 8);
    /* 200: hwpoison; 201: offline; 202: a slab page whose mapcount looks like a buddy's */
    put(p, 200, 0, 1u << PG_HWPOISON, 8);
    put(p, 201, 48, (uint32_t)OFFLINE, 4);
    put(p, 202, 0, 1u << PG_SLAB, 8);
    put(p, 202, 48, (uint32_t)BUDDY, 4);
    /* 300: a buddy with an order past the free areas: kept (makedumpfile warns) */
    put(p, 300, 48, (uint32_t)BUDDY, 4);
    put(p, 300, 40, 40, 8);
    /* 511: a compound head ending a 512-page group: order 0 (makedumpfile) */
    put(p, 511, 0, HEAD_MASK, 8);
    put(p, 511, 24, 0xffff888000003001ull, 8);
    put(p, 512, 17, 1, 1);
    put(p, 512, 8, 0xffffea0000003000ull | 1, 8);
    /* 1024..2047: a free block of order 10, split over two calls below */
    put(p, 1024, 48, (uint32_t)BUDDY, 4);
    put(p, 1024, 40, 10, 8);
    /* 3000: a page-cache compound head with a misaligned order: order 0 */
    put(p, 3000, 0, HEAD_MASK | (1u << PG_LRU), 8);
    put(p, 3001, 17, 4, 1);
    return p;
}

static void test_levels(void)
{
    unsigned char *pages = sample();
    uint8_t bm[NPAGES / 8];
    struct kc_page_counts c;
    uint64_t skip = 0;
    struct kc_page_rules r = rules_6_1(KC_DL_CACHE | KC_DL_CACHE_PRI | KC_DL_USER | KC_DL_FREE);

    memset(bm, 0xff, sizeof(bm));
    memset(&c, 0, sizeof(c));
    /* in two calls: the order-10 block's pages beyond the first are skipped in the second */
    CHECK(kc_classify_pages(&r, pages, 1536, 0, bm, NPAGES, &skip, &c) == 0);
    CHECK(skip == 2048);
    CHECK(kc_classify_pages(&r, pages + 1536 * SP, NPAGES - 1536, 1536, bm, NPAGES, &skip,
                            &c) == 0);
    for (uint64_t pfn = 16; pfn < 24; pfn++)
        CHECK(!kept(bm, pfn));
    CHECK(kept(bm, 15) && kept(bm, 24));
    CHECK(!kept(bm, 32) && !kept(bm, 33) && !kept(bm, 34) && kept(bm, 35) && !kept(bm, 36));
    for (uint64_t pfn = 64; pfn < 72; pfn++)
        CHECK(!kept(bm, pfn));
    CHECK(kept(bm, 72));
    for (uint64_t pfn = 128; pfn < 132; pfn++)
        CHECK(!kept(bm, pfn));
    CHECK(!kept(bm, 200) && !kept(bm, 201) && kept(bm, 202) && kept(bm, 300));
    CHECK(!kept(bm, 511) && kept(bm, 512)); /* order 0: the tail stays */
    for (uint64_t pfn = 1024; pfn < 2048; pfn++)
        CHECK(!kept(bm, pfn));
    CHECK(kept(bm, 2048));
    CHECK(!kept(bm, 3000) && kept(bm, 3001));
    CHECK(c.free == 8 + 1024);
    CHECK(c.cache == 3 && c.cache_private == 1);
    CHECK(c.user == 1 + 8 + 4 + 1);
    CHECK(c.hwpoison == 1 && c.offline == 1 && c.bad_order == 1);

    /* level 16 alone: cache and user pages stay, hwpoison and offline still go */
    r = rules_6_1(KC_DL_FREE);
    memset(bm, 0xff, sizeof(bm));
    memset(&c, 0, sizeof(c));
    skip = 0;
    CHECK(kc_classify_pages(&r, pages, NPAGES, 0, bm, NPAGES, &skip, &c) == 0);
    CHECK(kept(bm, 32) && kept(bm, 36) && kept(bm, 64) && !kept(bm, 16) && !kept(bm, 200));
    CHECK(c.cache == 0 && c.user == 0 && c.free == 8 + 1024);

    /* level 2 alone: cache with private data stays */
    r = rules_6_1(KC_DL_CACHE);
    memset(bm, 0xff, sizeof(bm));
    skip = 0;
    CHECK(kc_classify_pages(&r, pages, NPAGES, 0, bm, NPAGES, &skip, &c) == 0);
    CHECK(!kept(bm, 32) && kept(bm, 33) && kept(bm, 36));

    /* pages already out of the bitmap are not looked at, and a range stops at its end */
    r = rules_6_1(KC_DL_FREE);
    memset(bm, 0, sizeof(bm));
    bm[2] = 0x0f; /* pfns 16..19 in the dump */
    memset(&c, 0, sizeof(c));
    skip = 0;
    CHECK(kc_classify_pages(&r, pages, NPAGES, 0, bm, 20, &skip, &c) == 0);
    CHECK(bm[2] == 0 && c.free == 4 && c.examined == 1);
    free(pages);
}

static void test_bad_arguments(void)
{
    struct kc_page_rules r = rules_6_1(KC_DL_FREE);
    struct kc_page_counts c;
    uint8_t bm[1] = {0xff};
    uint64_t skip = 0;
    unsigned char page[SP] = {0};

    memset(&c, 0, sizeof(c));
    r.off_private = SP - 4; /* an 8-byte field past the struct's end */
    CHECK(kc_classify_pages(&r, page, 1, 0, bm, 8, &skip, &c) == -EINVAL);
    r = rules_6_1(KC_DL_FREE);
    r.struct_size = 0;
    CHECK(kc_classify_pages(&r, page, 1, 0, bm, 8, &skip, &c) == -EINVAL);
    r = rules_6_1(KC_DL_FREE);
    CHECK(kc_classify_pages(&r, NULL, 1, 0, bm, 8, &skip, &c) == -EINVAL);
    CHECK(kc_classify_pages(&r, page, 1, 0, bm, 8, &skip, &c) == 0);
}

static void test_bitmap_runs(void)
{
    uint8_t bm[32];
    uint64_t runs[8], next = 0, set = 0;
    size_t n = 0;

    memset(bm, 0, sizeof(bm));
    bm[0] = 0x0e;       /* pfns 1..3 */
    bm[2] = 0xff;       /* 16..23 */
    bm[3] = 0x01;       /* 24 */
    bm[31] = 0x80;      /* 255 */
    CHECK(kc_bitmap_runs(bm, 0, 256, runs, 4, &n, &next, &set) == 0);
    CHECK(n == 3 && next == 256 && set == 3 + 9 + 1);
    CHECK(runs[0] == 1 && runs[1] == 3 && runs[2] == 16 && runs[3] == 9);
    CHECK(runs[4] == 255 && runs[5] == 1);
    CHECK(kc_bitmap_runs(bm, 2, 20, runs, 1, &n, &next, &set) == 0);
    CHECK(n == 1 && runs[0] == 2 && runs[1] == 2 && next == 16);
    CHECK(kc_bitmap_runs(bm, 16, 20, runs, 4, &n, &next, &set) == 0);
    CHECK(n == 1 && runs[0] == 16 && runs[1] == 4 && next == 20);
    CHECK(kc_bitmap_runs(NULL, 0, 8, runs, 4, &n, &next, &set) == -EINVAL);
}

int main(void)
{
    test_levels();
    test_bad_arguments();
    test_bitmap_runs();
    return check_report("kcore page classifier");
}
