/*
 * The C API of kcore's copy engine: declarations only.
 * csrc/build_ffi.py reads this file verbatim as the cffi cdef, so it must stay
 * plain C that cffi's parser accepts (no #include, no preprocessor logic).
 */

/* Flags for the kc_* calls. */
enum kc_flags {
    KC_STRICT = 1,  /* the first unreadable byte is an error, not zeros */
    KC_SPARSE = 2   /* kc_copy_fd: do not write all-zero pages (leave holes) */
};

/* Which side made a call fail (kc_stats.fail_where). */
enum kc_fail_where {
    KC_FAIL_NONE = 0,
    KC_FAIL_SOURCE = 1,  /* reading the source failed (not a fault: EBADF, ENOMEM...) */
    KC_FAIL_OUTPUT = 2,  /* writing the output failed (ENOSPC, EPIPE...) */
    KC_FAIL_FAULT = 3    /* KC_STRICT: the source is unreadable at fail_offset */
};

/*
 * What one call did. Every kc_* call clears *stats_ret first, then fills it.
 * Pages are page_size-aligned in source offsets, clipped to the range.
 */
struct kc_stats {
    uint64_t bytes_read;         /* bytes that came from the source */
    uint64_t bytes_written;      /* bytes written to the output */
    uint64_t pages_zero_filled;  /* pages with at least one unreadable byte */
    uint64_t pages_sparse;       /* all-zero pages not written (holes) */
    uint64_t first_error_offset; /* source offset of the first unreadable byte */
    int32_t first_errno;         /* its errno (EIO for EOF inside the range); 0: none */
    int32_t fail_where;          /* enum kc_fail_where: side of the error returned */
    uint64_t fail_offset;        /* offset on that side where the call failed */
    uint64_t bytes_fast;         /* of bytes_read, those read with process_vm_readv */
};

/*
 * Every kc_*_fd call reads its source with pread. When the source is
 * /proc/PID/mem and the call covers at least 256 KiB, the same bytes are read
 * with process_vm_readv instead (no bounce page in the kernel: ~1.6x faster),
 * and pread stays the authority wherever that fails (holes, PROT_NONE pages).
 *
 * Read len bytes at source offset off into buf: pread in blocks of at most
 * block bytes, unreadable pages zero-filled and counted.
 * Returns 0, or -errno (with KC_STRICT, -errno of the first unreadable byte).
 */
int kc_read_fd(int fd, uint64_t off, void *buf, size_t len, size_t block,
               size_t page_size, uint32_t flags, struct kc_stats *stats_ret);

/*
 * Read n spans of fd one after another, as kc_read_fd reads each: span i
 * starts at source offset spans[2i] and is spans[2i+1] bytes long (a multiple
 * of page_size). Their bytes go back to back into buf, which is touched
 * whole first (its page faults come before the first read). times_ns, if not
 * NULL, has n + 1 slots: CLOCK_MONOTONIC ns when the first read began, then
 * when each span's read ended. One call for a scattered set of pages: nothing
 * but the reads between the first and the last. The stats add up over the
 * spans. Returns 0, or -errno.
 */
int kc_read_spans(int fd, const uint64_t *spans, size_t n, void *buf, size_t block,
                  size_t page_size, uint32_t flags, uint64_t *times_ns,
                  struct kc_stats *stats_ret);

/*
 * Copy len bytes from src_fd at src_off to dst_fd at dst_off, through the
 * caller's buffer buf of buf_len bytes (one pread block at a time).
 * dst_off < 0: sequential write() (pipes, stdout; KC_SPARSE is ignored).
 * With KC_SPARSE the output file is extended to dst_off + len even when the
 * last pages are holes. Returns 0 or -errno (ENOSPC on the output is an error).
 */
int kc_copy_fd(int src_fd, uint64_t src_off, int dst_fd, int64_t dst_off,
               uint64_t len, void *buf, size_t buf_len, size_t page_size,
               uint32_t flags, struct kc_stats *stats_ret);

/*
 * Find the runs of non-zero granules in [off, off + len) of fd (unreadable
 * pages count as zero). granule is a multiple of page_size; granules are
 * aligned on source offsets. Runs go to runs_ret as (offset, length) pairs,
 * merged; at most max_runs of them (-ENOSPC if more are needed).
 */
int kc_data_runs(int fd, uint64_t off, uint64_t len, size_t granule,
                 size_t page_size, void *buf, size_t buf_len, uint32_t flags,
                 uint64_t *runs_ret, size_t max_runs, size_t *nruns_ret,
                 struct kc_stats *stats_ret);

/*
 * Copy len bytes of mapped memory at src to dst, surviving SIGBUS/SIGSEGV on
 * the source (a file truncated under its mapping): faulting pages are
 * zero-filled and counted. base_off is the source offset of src, for pages
 * and for the offsets reported. Thread-safe. Returns 0 or -EFAULT (KC_STRICT).
 */
int kc_copy_mem(const void *src, void *dst, size_t len, uint64_t base_off,
                size_t page_size, uint32_t flags, struct kc_stats *stats_ret);

/* Non-zero when all n bytes at p are zero. */
int kc_is_zero(const void *p, size_t n);

/*
 * A single-pass zero-eliding copy to a seekable output: read [src_off,
 * src_off + len) of src_fd in blocks of at most buf_len bytes (as kc_copy_fd:
 * unreadable pages zero-filled and counted, KC_STRICT, EINTR), and pwrite only
 * its non-zero granules, packed one after another from dst_off (consecutive
 * non-zero granules of a block in one write). Granule boundaries lie at the
 * source offsets congruent to phase modulo granule (granule: a multiple of
 * page_size, buf_len >= granule, phase < granule). The kept runs go to
 * runs_ret as merged (source offset, length) pairs, *written_ret is the bytes
 * placed from dst_off. With KC_SPARSE (a regular file), zero pages inside the
 * kept runs become holes (pages_sparse), as in kc_copy_fd, and the file reaches
 * dst_off + *written_ret. Returns 0 or -errno. -ENOSPC with fail_where KC_FAIL_NONE: more than
 * max_runs runs are needed (what was written so far stays; redo the range
 * with a coarser granule, which keeps a superset and so overwrites it).
 */
int kc_copy_packed(int src_fd, uint64_t src_off, int dst_fd, uint64_t dst_off,
                   uint64_t len, size_t granule, size_t phase, size_t page_size,
                   void *buf, size_t buf_len, uint32_t flags,
                   uint64_t *runs_ret, size_t max_runs, size_t *nruns_ret,
                   uint64_t *written_ret, struct kc_stats *stats_ret);

/*
 * Compressed dumps (csrc/codec.c): the codec libraries are loaded with dlopen
 * on first use; a missing one makes the calls return -ENOENT.
 */
enum kc_codec {
    KC_CODEC_NONE = 0,
    KC_CODEC_ZLIB = 1,
    KC_CODEC_LZO = 2,
    KC_CODEC_SNAPPY = 3,
    KC_CODEC_ZSTD = 4
};

enum { KC_SNAPPY_CHUNK = 65536 };  /* snappy framing: uncompressed bytes a chunk holds */

/* The offset kc_compress_pages gives an all-zero page (kc_rebase_descs replaces it). */
#define KC_ZERO_PAGE 0xffffffffffffffff

/* makedumpfile's struct page_desc (diskdump_mod.h), little-endian on x86-64: 24 bytes. */
struct kc_page_desc {
    uint64_t offset;      /* file offset of the page's data */
    uint32_t size;        /* bytes stored (the page size when stored raw) */
    uint32_t flags;       /* DUMP_DH_COMPRESSED_*: the codec, 0 for a raw page */
    uint64_t page_flags;  /* unused (0) */
};

/* Load a codec's library: 0, -ENOENT when it is missing, -EINVAL for no such codec. */
int kc_codec_load(int codec);

/* The DUMP_DH_COMPRESSED_* flag of a codec (0 for none). */
int kc_codec_flag(int codec);

/* 1 when --compress zlib compresses with libdeflate (libdeflate.so.0 loads), else 0 (zlib). */
int kc_zlib_fast(void);

/* Bytes of dst kc_compress_pages may need per page of page_size bytes. */
size_t kc_compress_bound(int codec, size_t page_size);

/*
 * Compress npages pages at src one by one into dst (dst_cap bytes, at least
 * npages * kc_compress_bound()), packed; descs_ret[i] gets page i's offset in
 * dst, size and flags. A page that does not shrink is stored raw (flags 0); an
 * all-zero page stores nothing and gets offset KC_ZERO_PAGE. *written_ret is
 * the bytes used in dst. level: zstd's or zlib's level (ignored by the others).
 */
int kc_compress_pages(int codec, int level, const void *src, size_t npages,
                      size_t page_size, void *dst, size_t dst_cap,
                      struct kc_page_desc *descs_ret, uint64_t *written_ret);

/* Turn kc_compress_pages offsets into file offsets: + base, zero pages to zero_offset. */
void kc_rebase_descs(struct kc_page_desc *descs, size_t n, uint64_t base,
                     uint64_t zero_offset);

/* Decompress n bytes of one codec's data into dst (dst_len bytes); *out_ret: bytes out. */
int kc_decompress(int codec, const void *src, size_t n, void *dst, size_t dst_len,
                  size_t *out_ret);

/*
 * Read and decompress the n pages descs describe from a kdump-compressed file
 * at fd into dst (n * page_size bytes), then pwrite its non-zero pages to
 * out_fd at out_off (zero pages left as holes). window (window_len bytes, at
 * least two pages) holds the file's bytes as they are read. -ERANGE: a page's
 * data lie past the end of the file; -EINVAL: corrupt data, size or flags;
 * -ENOENT: a codec missing. *bad_ret: the index of the page that failed (n when
 * writing the output did).
 */
int kc_kdump_unpack(int fd, const struct kc_page_desc *descs, size_t n, size_t page_size,
                    void *window, size_t window_len, void *dst, int out_fd, uint64_t out_off,
                    size_t *bad_ret);

/* CRC-32C of n bytes, continuing crc (0 to start). */
uint32_t kc_crc32c(uint32_t crc, const void *data, size_t n);

/* Bytes of dst kc_snappy_frame may need for n bytes. */
size_t kc_snappy_frame_bound(size_t n);

/*
 * snappy's framing format without the stream identifier: n bytes at src as
 * chunks of at most KC_SNAPPY_CHUNK bytes, each compressed (type 0x00) or, when
 * that does not shrink it, stored (0x01), with its masked CRC-32C.
 */
int kc_snappy_frame(const void *src, size_t n, void *dst, size_t dst_cap,
                    uint64_t *written_ret);

/*
 * Decode the chunks of a framed snappy stream (identifier and skippable chunks
 * allowed) from src (n bytes) into dst until the next chunk would not fit in
 * dst_cap or is cut by the end of src. *consumed_ret: where decoding stopped (read on from
 * there); *written_ret: bytes out. -EINVAL: a corrupt chunk (or more data than
 * dst_cap); -EBADMSG: a CRC mismatch; *consumed_ret is then that chunk's offset.
 */
int kc_snappy_unframe(const void *src, size_t n, void *dst, size_t dst_cap,
                      uint64_t *written_ret, uint64_t *consumed_ret);

/*
 * Page classes: makedumpfile's dump-level bits (-d), which pages to leave out.
 * csrc/pageclass.c applies makedumpfile's rules (__exclude_unnecessary_pages)
 * to the kernel's own struct pages.
 */
enum kc_dump_level {
    KC_DL_ZERO = 1,       /* pages of zeros (found by the zero-run scan, not here) */
    KC_DL_CACHE = 2,      /* page cache without private data */
    KC_DL_CACHE_PRI = 4,  /* page cache with private data */
    KC_DL_USER = 8,       /* user data: anonymous pages, hugetlbfs pages */
    KC_DL_FREE = 16       /* free pages (buddy allocator) */
};

/* Which of the optional kernel numbers in struct kc_page_rules are known. */
enum kc_rule_known {
    KC_KNOW_BUDDY_MAPCOUNT = 1,       /* NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE) */
    KC_KNOW_OFFLINE_MAPCOUNT = 2,     /* NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE) */
    KC_KNOW_SLAB_MAPCOUNT = 4,        /* NUMBER(PAGE_SLAB_MAPCOUNT_VALUE), 6.10+ */
    KC_KNOW_HUGETLB_MAPCOUNT = 8,     /* NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE), 6.9+ */
    KC_KNOW_UNACCEPTED_MAPCOUNT = 16, /* NUMBER(PAGE_UNACCEPTED_MAPCOUNT_VALUE) */
    KC_KNOW_HUGETLB_DTOR = 32         /* NUMBER(HUGETLB_PAGE_DTOR) */
};

/*
 * The layout of struct page and the page-flag numbers, from VMCOREINFO.
 * Offsets and bit numbers are -1 where the kernel does not have them.
 */
struct kc_page_rules {
    uint32_t dump_level;      /* enum kc_dump_level bits */
    uint32_t known;           /* enum kc_rule_known bits */
    uint32_t struct_size;     /* SIZE(page) */
    int32_t off_flags;        /* OFFSET(page.flags) */
    int32_t off_mapping;      /* OFFSET(page.mapping) */
    int32_t off_mapcount;     /* OFFSET(page._mapcount) (page_type shares it) */
    int32_t off_private;      /* OFFSET(page.private) */
    int32_t off_compound_head;/* OFFSET(page.compound_head) */
    int32_t off_order;        /* compound order, in the first tail page; -1: none */
    int32_t off_dtor;         /* compound destructor, in the first tail page; -1: none */
    uint32_t order_width;     /* bytes of the order: 1 (>= 4.16) or 2 */
    uint32_t dtor_width;      /* bytes of the destructor: 1 (>= 4.16), 2 (>= 4.4) or 8 */
    int32_t pg_lru, pg_private, pg_swapcache, pg_swapbacked, pg_slab, pg_hwpoison;
    int32_t pg_buddy;         /* NUMBER(PG_buddy): kernels before 2.6.38 only */
    int32_t pg_hugetlb;       /* NUMBER(PG_hugetlb): 6.6 to 6.8 */
    uint64_t head_mask;       /* NUMBER(PG_head_mask) */
    int64_t buddy_mapcount, offline_mapcount, slab_mapcount, hugetlb_mapcount;
    int64_t unaccepted_mapcount;
    uint64_t hugetlb_dtor;
    uint32_t free_area_length; /* LENGTH(zone.free_area) (MAX_ORDER + 1); 0: unknown */
};

/* Pages left out, per class, by the kc_classify_pages calls that share one. */
struct kc_page_counts {
    uint64_t free;           /* buddy pages (and unaccepted ones) */
    uint64_t cache;          /* page cache without private data */
    uint64_t cache_private;  /* page cache with private data */
    uint64_t user;           /* anonymous and hugetlbfs pages */
    uint64_t hwpoison;       /* pages with a hardware memory error */
    uint64_t offline;        /* logically offline pages (balloons, hot-unplug) */
    uint64_t examined;       /* struct pages looked at */
    uint64_t bad_order;      /* buddy pages with an order past the free areas: kept */
};

/*
 * Classify the nstructs struct pages at structs, those of pfns pfn, pfn+1...,
 * and clear the bit of each page to leave out in bitmap (bit n of byte n/8
 * stands for pfn n; bitmap_pfns bits). A page whose bit is already clear is
 * not looked at (not in the dump). A free block or a compound page covers
 * several pages: all their bits are cleared, and *skip_until_pfn is raised
 * past them (pages below it are not looked at: pass the same variable to the
 * next call). A compound head whose first tail is not in this call (or that
 * ends a 512-page group, as in makedumpfile) counts as order 0.
 * Counts are added to *counts. Returns 0, or -EINVAL for bad rules.
 */
int kc_classify_pages(const struct kc_page_rules *rules, const void *structs,
                      size_t nstructs, uint64_t pfn, uint8_t *bitmap,
                      uint64_t bitmap_pfns, uint64_t *skip_until_pfn,
                      struct kc_page_counts *counts);

/*
 * The runs of set bits of bitmap in [start, end) (pfns), as (first pfn, count)
 * pairs in runs_ret, at most max_runs; *next_ret is where to go on from (end
 * when all were found). *set_ret is the number of set bits up to *next_ret.
 */
int kc_bitmap_runs(const uint8_t *bitmap, uint64_t start, uint64_t end,
                   uint64_t *runs_ret, size_t max_runs, size_t *nruns_ret,
                   uint64_t *next_ret, uint64_t *set_ret);
