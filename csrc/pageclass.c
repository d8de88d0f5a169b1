/*
 * Page classification for dump levels: makedumpfile's rules
 * (__exclude_unnecessary_pages, page_is_buddy_v2/v3, isAnon, isSlab,
 * isHugetlb, isOffline, is_cache_page) applied to the kernel's own struct
 * pages, clearing bits of a 1-bit-per-pfn "kept" bitmap.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kcore_api.h"

enum {
    PAGE_MAPPING_ANON = 1, /* include/linux/page-flags.h */
    PGMM_CACHED = 512,     /* makedumpfile reads struct pages in groups of 512 */
    MAX_COMPOUND_ORDER = 63
};

static uint64_t get_le(const unsigned char *p, unsigned width)
{
    uint64_t v = 0;

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (width == 8) {
        memcpy(&v, p, 8);
        return v;
    }
    if (width == 4) {
        uint32_t w;

        memcpy(&w, p, 4);
        return w;
    }
#endif
    for (unsigned i = 0; i < width; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static uint64_t field(const unsigned char *page, int32_t off, unsigned width)
{
    return off < 0 ? 0 : get_le(page + off, width);
}

static int test_bit(uint64_t flags, int32_t nr)
{
    return nr >= 0 && nr < 64 && (flags >> nr) & 1;
}

static int known(const struct kc_page_rules *r, uint32_t what)
{
    return (r->known & what) != 0;
}

/* page_type and _mapcount share a 32-bit word; makedumpfile compares it as an int. */
static int mapcount_is(const struct kc_page_rules *r, uint32_t what, int64_t value,
                       uint32_t mapcount)
{
    return known(r, what) && (int32_t)mapcount == (int32_t)value;
}

/* isSlab: PG_slab, or page_type PGTY_slab from 6.10 on. */
static int is_slab(const struct kc_page_rules *r, uint64_t flags, uint32_t mapcount)
{
    return mapcount_is(r, KC_KNOW_SLAB_MAPCOUNT, r->slab_mapcount, mapcount) ||
           test_bit(flags, r->pg_slab);
}

/* page_is_buddy_v3 (2.6.38+: PageBuddy in _mapcount/page_type), else v2 (PG_buddy). */
static int is_buddy(const struct kc_page_rules *r, uint64_t flags, uint32_t mapcount)
{
    if (r->off_private < 0)
        return 0;
    if (known(r, KC_KNOW_BUDDY_MAPCOUNT) && r->off_mapcount >= 0)
        return !is_slab(r, flags, mapcount) &&
               mapcount_is(r, KC_KNOW_BUDDY_MAPCOUNT, r->buddy_mapcount, mapcount);
    return test_bit(flags, r->pg_buddy);
}

/* is_cache_page: on an LRU list, or in the swap cache (PG_swapcache means it only
 * with PG_swapbacked, on kernels that have PG_swapbacked). */
static int is_cache(const struct kc_page_rules *r, uint64_t flags)
{
    if (test_bit(flags, r->pg_lru))
        return 1;
    return (r->pg_swapbacked < 0 || test_bit(flags, r->pg_swapbacked)) &&
           test_bit(flags, r->pg_swapcache);
}

static int is_anon(const struct kc_page_rules *r, uint64_t mapping, uint64_t flags,
                   uint32_t mapcount)
{
    return (mapping & PAGE_MAPPING_ANON) && !is_slab(r, flags, mapcount);
}

static int is_offline(const struct kc_page_rules *r, uint64_t flags, uint32_t mapcount)
{
    return !is_slab(r, flags, mapcount) &&
           mapcount_is(r, KC_KNOW_OFFLINE_MAPCOUNT, r->offline_mapcount, mapcount);
}

static int bit_set(const uint8_t *bitmap, uint64_t pfn)
{
    return (bitmap[pfn >> 3] >> (pfn & 7)) & 1;
}

/* Clear the bits of [pfn, end) (clipped to the bitmap); return how many were set. */
static uint64_t clear_range(uint8_t *bitmap, uint64_t bitmap_pfns, uint64_t pfn, uint64_t end)
{
    uint64_t n = 0;

    if (end > bitmap_pfns)
        end = bitmap_pfns;
    for (; pfn < end && (pfn & 7); pfn++) {
        n += bit_set(bitmap, pfn);
        bitmap[pfn >> 3] &= (uint8_t)~(1u << (pfn & 7));
    }
    for (; pfn + 8 <= end; pfn += 8) {
        n += (uint64_t)__builtin_popcount(bitmap[pfn >> 3]);
        bitmap[pfn >> 3] = 0;
    }
    for (; pfn < end; pfn++) {
        n += bit_set(bitmap, pfn);
        bitmap[pfn >> 3] &= (uint8_t)~(1u << (pfn & 7));
    }
    return n;
}

/* The order and whether it is a hugetlb page, of the compound head at page, whose first
 * tail is next (NULL when not at hand). */
static void compound_of(const struct kc_page_rules *r, const unsigned char *next,
                        uint32_t mapcount, uint64_t pfn, unsigned *order_ret, int *hugetlb_ret)
{
    unsigned order = 0;
    int hugetlb = 0;

    if (next != NULL) {
        if (known(r, KC_KNOW_HUGETLB_MAPCOUNT)) {
            /* 6.9+: the order is the low byte of folio._flags_1; hugetlb in page_type */
            order = (unsigned)(field(next, r->off_flags, 8) & 0xff);
            hugetlb = mapcount_is(r, KC_KNOW_HUGETLB_MAPCOUNT, r->hugetlb_mapcount, mapcount);
        } else if (r->pg_hugetlb >= 0) {
            /* 6.6 to 6.8: the same byte; PG_hugetlb in folio._flags_1 */
            uint64_t flags1 = field(next, r->off_flags, 8);

            order = (unsigned)(flags1 & 0xff);
            hugetlb = test_bit(flags1, r->pg_hugetlb);
        } else {
            if (r->off_order >= 0)
                order = (unsigned)field(next, r->off_order, r->order_width);
            if (r->off_dtor >= 0 && known(r, KC_KNOW_HUGETLB_DTOR))
                hugetlb = field(next, r->off_dtor, r->dtor_width) == r->hugetlb_dtor;
        }
        if (order > MAX_COMPOUND_ORDER || (pfn & ((UINT64_C(1) << order) - 1)) != 0)
            order = 0; /* makedumpfile: an invalid order */
    }
    *order_ret = order;
    *hugetlb_ret = hugetlb;
}

static int rules_ok(const struct kc_page_rules *r)
{
    uint32_t need = 8;

    if (r->struct_size < 8 || r->off_flags < 0)
        return 0;
    if (r->order_width < 1 || r->order_width > 8 || r->dtor_width < 1 || r->dtor_width > 8)
        return 0;
    if ((uint32_t)r->off_flags + 8 > r->struct_size)
        return 0;
    /* every field read must lie inside the struct */
    if (r->off_mapping >= 0 && (uint32_t)r->off_mapping + need > r->struct_size)
        return 0;
    if (r->off_mapcount >= 0 && (uint32_t)r->off_mapcount + 4 > r->struct_size)
        return 0;
    if (r->off_private >= 0 && (uint32_t)r->off_private + need > r->struct_size)
        return 0;
    if (r->off_compound_head >= 0 && (uint32_t)r->off_compound_head + need > r->struct_size)
        return 0;
    if (r->off_order >= 0 && (uint32_t)r->off_order + r->order_width > r->struct_size)
        return 0;
    if (r->off_dtor >= 0 && (uint32_t)r->off_dtor + r->dtor_width > r->struct_size)
        return 0;
    return 1;
}

int kc_classify_pages(const struct kc_page_rules *rules, const void *structs,
                      size_t nstructs, uint64_t pfn, uint8_t *bitmap,
                      uint64_t bitmap_pfns, uint64_t *skip_until_pfn,
                      struct kc_page_counts *counts)
{
    const struct kc_page_rules *r = rules;
    const unsigned char *base = structs;
    uint32_t dl;

    if (r == NULL || (structs == NULL && nstructs) || bitmap == NULL || skip_until_pfn == NULL ||
        counts == NULL || !rules_ok(r))
        return -EINVAL;
    dl = r->dump_level;
    for (size_t i = 0; i < nstructs; i++) {
        uint64_t p = pfn + i;
        const unsigned char *page = base + i * r->struct_size;
        const unsigned char *next = NULL;
        uint64_t flags, mapping, private, nr_pages, *counter = NULL;
        uint32_t mapcount;
        unsigned order = 0;
        int hugetlb = 0;

        if (p < *skip_until_pfn)
            continue;
        if (p >= bitmap_pfns)
            break;
        if (!bit_set(bitmap, p))
            continue; /* not in the dump (makedumpfile: !is_in_segs) */
        counts->examined++;
        flags = field(page, r->off_flags, 8);
        mapping = field(page, r->off_mapping, 8);
        mapcount = (uint32_t)field(page, r->off_mapcount, 4);
        private = field(page, r->off_private, 8);
        if (flags & r->head_mask) {
            if (i + 1 < nstructs && (p % PGMM_CACHED) != PGMM_CACHED - 1)
                next = page + r->struct_size;
            compound_of(r, next, mapcount, p, &order, &hugetlb);
        }
        nr_pages = UINT64_C(1) << order;
        /* a tail page: its head decided for it */
        if (field(page, r->off_compound_head, 8) & 1)
            continue;
        if ((dl & KC_DL_FREE) && is_buddy(r, flags, mapcount)) {
            if (r->free_area_length && private >= r->free_area_length) {
                counts->bad_order++;
                continue; /* makedumpfile: "Invalid free page order", kept */
            }
            nr_pages = UINT64_C(1) << private;
            counter = &counts->free;
        } else if ((dl & KC_DL_FREE) &&
                   mapcount_is(r, KC_KNOW_UNACCEPTED_MAPCOUNT, r->unaccepted_mapcount,
                               mapcount)) {
            if (r->free_area_length == 0 || r->free_area_length > 64)
                continue;
            nr_pages = UINT64_C(1) << (r->free_area_length - 1);
            counter = &counts->free;
        } else if ((dl & KC_DL_CACHE) && is_cache(r, flags) && !test_bit(flags, r->pg_private) &&
                   !is_anon(r, mapping, flags, mapcount)) {
            counter = &counts->cache;
        } else if ((dl & KC_DL_CACHE_PRI) && is_cache(r, flags) &&
                   !is_anon(r, mapping, flags, mapcount)) {
            counter = test_bit(flags, r->pg_private) ? &counts->cache_private : &counts->cache;
        } else if ((dl & KC_DL_USER) && (is_anon(r, mapping, flags, mapcount) || hugetlb)) {
            counter = &counts->user;
        } else if (test_bit(flags, r->pg_hwpoison)) {
            counter = &counts->hwpoison;
        } else if (is_offline(r, flags, mapcount)) {
            counter = &counts->offline;
        } else {
            continue;
        }
        *counter += clear_range(bitmap, bitmap_pfns, p, p + nr_pages);
        if (nr_pages > 1 && p + nr_pages > *skip_until_pfn)
            *skip_until_pfn = p + nr_pages;
    }
    return 0;
}

int kc_bitmap_runs(const uint8_t *bitmap, uint64_t start, uint64_t end,
                   uint64_t *runs_ret, size_t max_runs, size_t *nruns_ret,
                   uint64_t *next_ret, uint64_t *set_ret)
{
    size_t n = 0;
    uint64_t pfn = start, set = 0;

    if (bitmap == NULL || nruns_ret == NULL || next_ret == NULL || set_ret == NULL ||
        (runs_ret == NULL && max_runs))
        return -EINVAL;
    while (pfn < end) {
        uint64_t first;

        /* skip clear bits, a byte at a time where aligned */
        while (pfn < end && !bit_set(bitmap, pfn)) {
            if ((pfn & 7) == 0 && pfn + 8 <= end && bitmap[pfn >> 3] == 0)
                pfn += 8;
            else
                pfn++;
        }
        if (pfn >= end)
            break;
        if (n == max_runs)
            break;
        first = pfn;
        while (pfn < end && bit_set(bitmap, pfn)) {
            if ((pfn & 7) == 0 && pfn + 8 <= end && bitmap[pfn >> 3] == 0xff)
                pfn += 8;
            else
                pfn++;
        }
        runs_ret[2 * n] = first;
        runs_ret[2 * n + 1] = pfn - first;
        set += pfn - first;
        n++;
    }
    *nruns_ret = n;
    *next_ret = pfn < end ? pfn : end;
    *set_ret = set;
    return 0;
}
