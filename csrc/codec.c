/*
 * Page compression for compressed dumps: the codec libraries (zstd, lzo, snappy,
 * zlib) are loaded at run time with dlopen, so building kcore needs none of
 * their -dev packages and a missing one is reported, not a build failure.
 *
 * kc_compress_pages() fills makedumpfile's page descriptors for a batch of
 * pages (diskdump_mod.h: struct page_desc); kc_snappy_frame() writes snappy's
 * framing format (chunks of at most 64 KiB, masked CRC-32C), as AVML stores
 * each memory range. Both run without the GIL (cffi) and touch no shared state
 * but the library handles, which are resolved once under a mutex.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kcore_api.h"

/* diskdump_mod.h: DUMP_DH_COMPRESSED_* (a page descriptor's flags, the header's status). */
enum {
    KC_DH_ZLIB = 0x1,
    KC_DH_LZO = 0x2,
    KC_DH_SNAPPY = 0x4,
    KC_DH_ZSTD = 0x20
};

/*
 * LZO1X-1(12): LZO1X-1 with a 4096-entry dictionary, which each call clears. lzo1x_1_compress
 * (makedumpfile's) clears 16384 entries, 32 KiB, for every 4 KiB page: 5% of a dump's time.
 * Both write the LZO1X format lzo1x_decompress_safe reads; on the fixtures' RAM pages the
 * output is 0.3% larger. Work memory: LZO1X_1_12_MEM_COMPRESS, 4096 dictionary pointers.
 */
enum { KC_LZO_WORK = 4096 * sizeof(void *) };

typedef size_t (*zstd_compress_fn)(void *, void *, size_t, const void *, size_t, int);
typedef void *(*zstd_create_fn)(void);
typedef size_t (*zstd_free_fn)(void *);
typedef size_t (*zstd_decompress_fn)(void *, size_t, const void *, size_t);
typedef unsigned (*zstd_iserror_fn)(size_t);
typedef int (*lzo_compress_fn)(const unsigned char *, unsigned long, unsigned char *,
                               unsigned long *, void *);
typedef int (*lzo_decompress_fn)(const unsigned char *, unsigned long, unsigned char *,
                                 unsigned long *, void *);
typedef int (*snappy_compress_fn)(const char *, size_t, char *, size_t *);
typedef int (*snappy_uncompress_fn)(const char *, size_t, char *, size_t *);
typedef int (*snappy_ulen_fn)(const char *, size_t, size_t *);
typedef int (*zlib_compress2_fn)(unsigned char *, unsigned long *, const unsigned char *,
                                 unsigned long, int);
typedef int (*zlib_uncompress_fn)(unsigned char *, unsigned long *, const unsigned char *,
                                  unsigned long);

struct kc_lib {
    const char *soname;
    int loaded;          /* 1 loaded, -1 missing, 0 not tried */
    void *fn[5];         /* compress, decompress, helpers (zstd: isError, create/free CCtx) */
    const char *names[5];
};

static pthread_mutex_t kc_lib_lock = PTHREAD_MUTEX_INITIALIZER;
static struct kc_lib kc_libs[] = {
    [KC_CODEC_NONE] = {NULL, 1, {NULL}, {NULL}},
    [KC_CODEC_ZLIB] = {"libz.so.1", 0, {NULL}, {"compress2", "uncompress"}},
    [KC_CODEC_LZO] = {"liblzo2.so.2", 0, {NULL},
                      {"lzo1x_1_12_compress", "lzo1x_decompress_safe"}},
    [KC_CODEC_SNAPPY] = {"libsnappy.so.1", 0, {NULL},
                         {"snappy_compress", "snappy_uncompress",
                          "snappy_uncompressed_length"}},
    /* one compression context a batch: ZSTD_compress() makes and frees one per call */
    [KC_CODEC_ZSTD] = {"libzstd.so.1", 0, {NULL},
                       {"ZSTD_compressCCtx", "ZSTD_decompress", "ZSTD_isError",
                        "ZSTD_createCCtx", "ZSTD_freeCCtx"}},
};

/*
 * libdeflate, where it loads: zlib streams (RFC 1950) made 2-3x faster than zlib's compress2
 * at the same level, a percent or two larger; zlib's uncompress (crash, makedumpfile) reads
 * them as its own. Only --compress zlib's compression uses it; without it, zlib does.
 */
typedef void *(*deflate_alloc_fn)(int);
typedef size_t (*deflate_zlib_fn)(void *, const void *, size_t, void *, size_t);
typedef void (*deflate_free_fn)(void *);
static struct kc_lib kc_deflate = {"libdeflate.so.0", 0, {NULL},
                                   {"libdeflate_alloc_compressor", "libdeflate_zlib_compress",
                                    "libdeflate_free_compressor"}};

static int kc_lib_load(struct kc_lib *lib)
{
    void *h;
    int i, rc = 0;

    pthread_mutex_lock(&kc_lib_lock);
    if (lib->loaded == 0) {
        h = dlopen(lib->soname, RTLD_NOW | RTLD_LOCAL);
        lib->loaded = h ? 1 : -1;
        for (i = 0; h && i < 5; i++) {
            if (!lib->names[i])
                continue;
            lib->fn[i] = dlsym(h, lib->names[i]);
            if (!lib->fn[i])
                lib->loaded = -1;
        }
    }
    if (lib->loaded < 0)
        rc = -ENOENT;
    pthread_mutex_unlock(&kc_lib_lock);
    return rc;
}

int kc_zlib_fast(void)
{
    return kc_lib_load(&kc_deflate) == 0;
}

static int kc_codec_ok(int codec)
{
    return codec >= KC_CODEC_NONE && codec <= KC_CODEC_ZSTD;
}

int kc_codec_load(int codec)
{
    if (!kc_codec_ok(codec))
        return -EINVAL;
    return kc_lib_load(&kc_libs[codec]);
}

int kc_codec_flag(int codec)
{
    static const int flags[] = {
        [KC_CODEC_NONE] = 0, [KC_CODEC_ZLIB] = KC_DH_ZLIB, [KC_CODEC_LZO] = KC_DH_LZO,
        [KC_CODEC_SNAPPY] = KC_DH_SNAPPY, [KC_CODEC_ZSTD] = KC_DH_ZSTD,
    };
    return kc_codec_ok(codec) ? flags[codec] : -EINVAL;
}

/*
 * Compress n bytes into dst, which has room for kc_compress_bound(n) bytes
 * (lzo and snappy write their worst case whatever they are told). Returns the
 * compressed size, or -errno.
 */
static long kc_compress_one(int codec, int level, const void *src, size_t n, void *dst,
                            size_t cap, void *work)
{
    struct kc_lib *lib = &kc_libs[codec];

    switch (codec) {
    case KC_CODEC_ZSTD: {
        size_t r = ((zstd_compress_fn)lib->fn[0])(work, dst, cap, src, n, level);

        return ((zstd_iserror_fn)lib->fn[2])(r) ? -EIO : (long)r;
    }
    case KC_CODEC_LZO: {
        unsigned long out = cap;

        if (((lzo_compress_fn)lib->fn[0])(src, n, dst, &out, work) != 0)
            return -EIO;
        return (long)out;
    }
    case KC_CODEC_SNAPPY: {
        size_t out = cap;

        if (((snappy_compress_fn)lib->fn[0])(src, n, dst, &out) != 0)
            return -EIO;
        return (long)out;
    }
    case KC_CODEC_ZLIB: {
        unsigned long out = cap;

        if (work)  /* libdeflate's compressor; 0: it did not fit, so it is stored raw */
            return (long)((deflate_zlib_fn)kc_deflate.fn[1])(work, src, n, dst, cap);
        if (((zlib_compress2_fn)lib->fn[0])(dst, &out, src, n, level) != 0)
            return -EIO;
        return (long)out;
    }
    default:
        return -EINVAL;
    }
}

static void kc_free_work(int codec, void *work)
{
    if (codec == KC_CODEC_ZSTD && work)
        ((zstd_free_fn)kc_libs[codec].fn[4])(work);
    else if (codec == KC_CODEC_ZLIB && work)
        ((deflate_free_fn)kc_deflate.fn[2])(work);
    else
        free(work);
}

size_t kc_compress_bound(int codec, size_t n)
{
    /* room for any codec's worst case on n bytes (lzo: n + n/16 + 67; snappy: 32 + n + n/6) */
    (void)codec;
    return n + n / 6 + 128;
}

int kc_compress_pages(int codec, int level, const void *src, size_t npages,
                      size_t page_size, void *dst, size_t dst_cap,
                      struct kc_page_desc *descs_ret, uint64_t *written_ret)
{
    const unsigned char *s = src;
    unsigned char *d = dst;
    uint64_t pos = 0;
    void *work = NULL;
    uint32_t flag;
    size_t i;
    int rc;

    *written_ret = 0;
    if (!kc_codec_ok(codec) || page_size < 512 || (page_size & (page_size - 1)))
        return -EINVAL;
    rc = kc_codec_load(codec);
    if (rc)
        return rc;
    flag = (uint32_t)kc_codec_flag(codec);
    if (codec == KC_CODEC_LZO) {
        work = malloc(KC_LZO_WORK);
        if (!work)
            return -ENOMEM;
    } else if (codec == KC_CODEC_ZSTD) {
        work = ((zstd_create_fn)kc_libs[codec].fn[3])();
        if (!work)
            return -ENOMEM;
    } else if (codec == KC_CODEC_ZLIB && kc_zlib_fast()) {
        work = ((deflate_alloc_fn)kc_deflate.fn[0])(level);
        if (!work)
            return -ENOMEM;
    }
    for (i = 0; i < npages; i++, s += page_size) {
        struct kc_page_desc *pd = &descs_ret[i];
        long n = 0;

        pd->page_flags = 0;
        if (kc_is_zero(s, page_size)) {
            pd->offset = KC_ZERO_PAGE;
            pd->size = (uint32_t)page_size;
            pd->flags = 0;
            continue;
        }
        if (dst_cap - pos < kc_compress_bound(codec, page_size)) {
            kc_free_work(codec, work);
            return -ENOSPC;
        }
        if (codec != KC_CODEC_NONE) {
            /* a page is stored compressed only when that makes it smaller */
            n = kc_compress_one(codec, level, s, page_size, d + pos,
                                kc_compress_bound(codec, page_size), work);
            if (n < 0) {
                kc_free_work(codec, work);
                return (int)n;
            }
        }
        pd->offset = pos;
        if (n > 0 && (size_t)n < page_size) {
            pd->size = (uint32_t)n;
            pd->flags = flag;
        } else {
            memcpy(d + pos, s, page_size);
            pd->size = (uint32_t)page_size;
            pd->flags = 0;
        }
        pos += pd->size;
    }
    kc_free_work(codec, work);
    *written_ret = pos;
    return 0;
}

void kc_rebase_descs(struct kc_page_desc *descs, size_t n, uint64_t base, uint64_t zero_offset)
{
    size_t i;

    for (i = 0; i < n; i++)
        descs[i].offset = descs[i].offset == KC_ZERO_PAGE ? zero_offset : descs[i].offset + base;
}

int kc_decompress(int codec, const void *src, size_t n, void *dst, size_t dst_len,
                  size_t *out_ret)
{
    struct kc_lib *lib;
    int rc;

    *out_ret = 0;
    rc = kc_codec_load(codec);
    if (rc)
        return rc;
    lib = &kc_libs[codec];
    switch (codec) {
    case KC_CODEC_NONE:
        if (n > dst_len)
            return -EINVAL;
        memcpy(dst, src, n);
        *out_ret = n;
        return 0;
    case KC_CODEC_ZSTD: {
        size_t r = ((zstd_decompress_fn)lib->fn[1])(dst, dst_len, src, n);

        if (((zstd_iserror_fn)lib->fn[2])(r))
            return -EINVAL;
        *out_ret = r;
        return 0;
    }
    case KC_CODEC_LZO: {
        unsigned long out = dst_len;

        if (((lzo_decompress_fn)lib->fn[1])(src, n, dst, &out, NULL) != 0)
            return -EINVAL;
        *out_ret = out;
        return 0;
    }
    case KC_CODEC_SNAPPY: {
        size_t out = dst_len;

        if (((snappy_uncompress_fn)lib->fn[1])(src, n, dst, &out) != 0)
            return -EINVAL;
        *out_ret = out;
        return 0;
    }
    case KC_CODEC_ZLIB: {
        unsigned long out = dst_len;

        if (((zlib_uncompress_fn)lib->fn[1])(dst, &out, src, n) != 0)
            return -EINVAL;
        *out_ret = out;
        return 0;
    }
    default:
        return -EINVAL;
    }
}

/* CRC-32C (Castagnoli), reflected, as snappy's framing format checksums each chunk. */
static uint32_t kc_crc_table[8][256];
static pthread_once_t kc_crc_once = PTHREAD_ONCE_INIT;

static void kc_crc_init(void)
{
    uint32_t c;
    int i, j;

    for (i = 0; i < 256; i++) {
        c = (uint32_t)i;
        for (j = 0; j < 8; j++)
            c = (c >> 1) ^ (c & 1 ? 0x82f63b78u : 0);
        kc_crc_table[0][i] = c;
    }
    for (i = 0; i < 256; i++)
        for (j = 1; j < 8; j++)
            kc_crc_table[j][i] = (kc_crc_table[j - 1][i] >> 8) ^
                                 kc_crc_table[0][kc_crc_table[j - 1][i] & 0xff];
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t kc_crc32c_hw(uint32_t crc, const unsigned char *p,
                                                               size_t n)
{
    uint64_t c = crc;

    for (; n >= 8; n -= 8, p += 8) {
        uint64_t v;

        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
    }
    crc = (uint32_t)c;
    for (; n; n--, p++)
        crc = __builtin_ia32_crc32qi(crc, *p);
    return crc;
}
#endif

uint32_t kc_crc32c(uint32_t crc, const void *data, size_t n)
{
    const unsigned char *p = data;

    crc = ~crc;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2"))
        return ~kc_crc32c_hw(crc, p, n);
#endif
    pthread_once(&kc_crc_once, kc_crc_init);
    for (; n >= 8; n -= 8, p += 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                             (uint32_t)p[3] << 24);

        crc = kc_crc_table[7][lo & 0xff] ^ kc_crc_table[6][(lo >> 8) & 0xff] ^
              kc_crc_table[5][(lo >> 16) & 0xff] ^ kc_crc_table[4][lo >> 24] ^
              kc_crc_table[3][p[4]] ^ kc_crc_table[2][p[5]] ^ kc_crc_table[1][p[6]] ^
              kc_crc_table[0][p[7]];
    }
    for (; n; n--, p++)
        crc = (crc >> 8) ^ kc_crc_table[0][(crc ^ *p) & 0xff];
    return ~crc;
}

/* framing_format.txt: the CRC stored in a chunk is masked (rotated, plus a constant). */
static uint32_t kc_masked_crc(const void *p, size_t n)
{
    uint32_t c = kc_crc32c(0, p, n);

    return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

static void kc_put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

size_t kc_snappy_frame_bound(size_t n)
{
    size_t chunks = n / KC_SNAPPY_CHUNK + 1;

    return n + chunks * (8 + 32 + KC_SNAPPY_CHUNK / 6);
}

/* Zero *written_ret and load libsnappy: 0, or -errno when it cannot be had. */
static int kc_snappy_begin(uint64_t *written_ret)
{
    *written_ret = 0;
    return kc_codec_load(KC_CODEC_SNAPPY);
}

int kc_snappy_frame(const void *src, size_t n, void *dst, size_t dst_cap, uint64_t *written_ret)
{
    const unsigned char *s = src;
    unsigned char *d = dst;
    size_t pos = 0, out = 0;
    int rc = kc_snappy_begin(written_ret);

    if (rc)
        return rc;
    if (dst_cap < kc_snappy_frame_bound(n))
        return -ENOSPC;
    while (pos < n) {
        size_t len = n - pos < KC_SNAPPY_CHUNK ? n - pos : KC_SNAPPY_CHUNK;
        size_t clen = dst_cap - out - 8;
        unsigned char *chunk = d + out;
        uint32_t crc = kc_masked_crc(s + pos, len);

        rc = ((snappy_compress_fn)kc_libs[KC_CODEC_SNAPPY].fn[0])(
            (const char *)s + pos, len, (char *)chunk + 8, &clen);
        if (rc != 0)
            return -EIO;
        if (clen < len) {  /* chunk type 0x00: compressed data */
            kc_put_le32(chunk, (uint32_t)(clen + 4) << 8 | 0x00);
        } else {           /* chunk type 0x01: uncompressed data */
            memcpy(chunk + 8, s + pos, len);
            clen = len;
            kc_put_le32(chunk, (uint32_t)(clen + 4) << 8 | 0x01);
        }
        kc_put_le32(chunk + 4, crc);
        out += 8 + clen;
        pos += len;
    }
    *written_ret = out;
    return 0;
}

int kc_snappy_unframe(const void *src, size_t n, void *dst, size_t dst_cap,
                      uint64_t *written_ret, uint64_t *consumed_ret)
{
    int rc = kc_snappy_begin(written_ret);
    const unsigned char *s = src;
    unsigned char *d = dst;
    size_t pos = 0, out = 0;

    *consumed_ret = 0;
    if (rc)
        return rc;
    while (out < dst_cap && pos + 4 <= n) {
        unsigned type = s[pos];
        size_t len = (size_t)s[pos + 1] | (size_t)s[pos + 2] << 8 | (size_t)s[pos + 3] << 16;
        const unsigned char *body = s + pos + 4;
        size_t got;

        if (len > n - pos - 4)
            break;  /* a chunk cut by the end of src: the caller reads on from here */
        if (type == 0x00 || type == 0x01) {
            uint32_t want;

            if (len < 4)
                goto corrupt;
            want = (uint32_t)body[0] | (uint32_t)body[1] << 8 | (uint32_t)body[2] << 16 |
                   (uint32_t)body[3] << 24;
            got = dst_cap - out;
            if (type == 0x00) {
                size_t ulen;

                if (((snappy_ulen_fn)kc_libs[KC_CODEC_SNAPPY].fn[2])(
                        (const char *)body + 4, len - 4, &ulen) != 0)
                    goto corrupt;
                if (ulen > got) {
                    if (out)
                        break;  /* dst is full up to this chunk: the caller goes on later */
                    goto corrupt;
                }
                if (((snappy_uncompress_fn)kc_libs[KC_CODEC_SNAPPY].fn[1])(
                        (const char *)body + 4, len - 4, (char *)d + out, &got) != 0)
                    goto corrupt;  /* corrupt, or more than dst has room for */
            } else {
                if (len - 4 > got) {
                    if (out)
                        break;
                    goto corrupt;
                }
                got = len - 4;
                memcpy(d + out, body + 4, got);
            }
            if (kc_masked_crc(d + out, got) != want) {
                *consumed_ret = pos;
                *written_ret = out;
                return -EBADMSG;
            }
            out += got;
        } else if (type >= 0x02 && type <= 0x7f) {
            goto corrupt;  /* a reserved unskippable chunk */
        }
        /* 0xff stream identifier, 0x80-0xfe skippable: nothing to keep */
        pos += 4 + len;
    }
    *consumed_ret = pos;
    *written_ret = out;
    return 0;
corrupt:
    *consumed_ret = pos;
    *written_ret = out;
    return -EINVAL;
}

static int kc_pread_full(int fd, void *buf, size_t len, uint64_t off, size_t *got_ret)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));

        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            break;
        done += (size_t)n;
    }
    *got_ret = done;
    return 0;
}

static int kc_pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));

        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        done += (size_t)n;
    }
    return 0;
}

int kc_kdump_unpack(int fd, const struct kc_page_desc *descs, size_t n, size_t page_size,
                    void *window, size_t window_len, void *dst, int out_fd, uint64_t out_off,
                    size_t *bad_ret)
{
    unsigned char *win = window, *out = dst;
    unsigned char *stray = win + window_len - page_size;  /* the last page: one stray page */
    uint64_t win_lo = 0, stray_off = UINT64_MAX;
    size_t win_n = 0, stray_size = 0, i, got, run;
    int rc, codec;

    *bad_ret = 0;
    if (window_len < 2 * page_size || page_size < 512 || (page_size & (page_size - 1)))
        return -EINVAL;
    window_len -= page_size;
    for (i = 0; i < n; i++) {
        const struct kc_page_desc *pd = &descs[i];
        const unsigned char *data;

        *bad_ret = i;
        if (pd->size == 0 || pd->size > page_size)
            return -EINVAL;
        switch (pd->flags & (KC_DH_ZLIB | KC_DH_LZO | KC_DH_SNAPPY | KC_DH_ZSTD)) {
        case 0: codec = KC_CODEC_NONE; break;
        case KC_DH_ZLIB: codec = KC_CODEC_ZLIB; break;
        case KC_DH_LZO: codec = KC_CODEC_LZO; break;
        case KC_DH_SNAPPY: codec = KC_CODEC_SNAPPY; break;
        case KC_DH_ZSTD: codec = KC_CODEC_ZSTD; break;
        default: return -EINVAL;
        }
        if (codec == KC_CODEC_NONE && pd->size != page_size)
            return -EINVAL;
        if (pd->offset >= win_lo && pd->offset - win_lo + pd->size <= win_n) {
            data = win + (pd->offset - win_lo);
        } else if (pd->offset == stray_off && pd->size == stray_size) {
            data = stray;
        } else if (pd->offset < win_lo && win_n) {
            /* behind the window (makedumpfile's shared zero page): read it alone */
            rc = kc_pread_full(fd, stray, pd->size, pd->offset, &got);
            if (rc)
                return rc;
            if (got < pd->size)
                return -ERANGE;
            stray_off = pd->offset;
            stray_size = pd->size;
            data = stray;
        } else {
            rc = kc_pread_full(fd, win, window_len, pd->offset, &got);
            if (rc)
                return rc;
            if (got < pd->size)
                return -ERANGE;
            win_lo = pd->offset;
            win_n = got;
            data = win;
        }
        rc = kc_decompress(codec, data, pd->size, out + i * page_size, page_size, &got);
        if (rc == -ENOENT)
            return rc;
        if (rc || got != page_size)
            return -EINVAL;
    }
    /* write the non-zero pages; zero pages stay holes of the (pre-sized) output */
    for (i = 0; i < n; i += run) {
        int zero = kc_is_zero(out + i * page_size, page_size);

        for (run = 1; i + run < n &&
             kc_is_zero(out + (i + run) * page_size, page_size) == zero; run++)
            ;
        if (!zero) {
            rc = kc_pwrite_full(out_fd, out + i * page_size, run * page_size,
                                out_off + i * page_size);
            if (rc) {
                *bad_ret = n;  /* the output failed, not a page */
                return rc;
            }
        }
    }
    return 0;
}
