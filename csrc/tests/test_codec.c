/*
 * Unit tests of the page codecs (csrc/codec.c), built with -fsanitize=address,undefined by
 * tests/test_c_sanitizers.py: every codec's pages compressed, written as a kdump data
 * area and unpacked back through a file (memfd); corrupt and truncated data refused;
 * snappy framing decoded in pieces; CRC-32C against its catalogue check value.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kcore_api.h"
#include "check.h"

enum { PAGE = 4096, NPAGES = 64 };


/* Pages of four kinds: zero, text (shrinks), random (does not), one byte set. */
static void pages(unsigned char *p)
{
    unsigned seed = 7;

    memset(p, 0, NPAGES * PAGE);
    for (int i = 0; i < NPAGES; i++) {
        unsigned char *pg = p + (size_t)i * PAGE;

        switch (i % 4) {
        case 1:
            for (int k = 0; k < PAGE; k++)
                pg[k] = "kernel memory "[k % 14];
            break;
        case 2:
            for (int k = 0; k < PAGE; k++) {
                seed = seed * 1103515245u + 12345u;
                pg[k] = (unsigned char)(seed >> 16);
            }
            break;
        case 3:
            pg[PAGE - 1] = 1;
            break;
        }
    }
}

static void roundtrip(int codec)
{
    unsigned char *src = malloc(NPAGES * PAGE), *back = malloc(NPAGES * PAGE);
    size_t cap = NPAGES * kc_compress_bound(codec, PAGE) + PAGE;
    unsigned char *data = malloc(cap), *window = malloc(16 * PAGE);
    struct kc_page_desc descs[NPAGES];
    uint64_t used;
    size_t bad;
    int fd, out, rc;

    pages(src);
    /* the data area as a file: the shared zero page at 0, the batch after it */
    memset(data, 0, PAGE);
    rc = kc_compress_pages(codec, 1, src, NPAGES, PAGE, data + PAGE, cap - PAGE, descs, &used);
    if (rc == -ENOENT) {
        printf("codec %d: library missing, skipped\n", codec);
        goto out;
    }
    CHECK(rc == 0);
    CHECK(descs[0].offset == KC_ZERO_PAGE);
    CHECK(descs[2].flags == 0 && descs[2].size == PAGE);  /* random: stored raw */
    if (codec != KC_CODEC_NONE)
        CHECK(descs[1].flags == (uint32_t)kc_codec_flag(codec) && descs[1].size < PAGE);
    kc_rebase_descs(descs, NPAGES, PAGE, 0);
    fd = memfd_create("kdump", 0);
    out = memfd_create("unpacked", 0);
    CHECK(fd >= 0 && out >= 0);
    CHECK(write(fd, data, PAGE + used) == (ssize_t)(PAGE + used));
    CHECK(ftruncate(out, NPAGES * PAGE) == 0);
    rc = kc_kdump_unpack(fd, descs, NPAGES, PAGE, window, 16 * PAGE, back, out, 0, &bad);
    CHECK(rc == 0);
    CHECK(memcmp(back, src, NPAGES * PAGE) == 0);
    CHECK(pread(out, back, NPAGES * PAGE, 0) == NPAGES * PAGE);
    CHECK(memcmp(back, src, NPAGES * PAGE) == 0);
    /* cut the file inside the last page's data: -ERANGE at that page */
    CHECK(ftruncate(fd, (off_t)(descs[NPAGES - 1].offset + 1)) == 0);
    rc = kc_kdump_unpack(fd, descs, NPAGES, PAGE, window, 16 * PAGE, back, out, 0, &bad);
    CHECK(rc == -ERANGE && bad == NPAGES - 1);
    /* garbage in a compressed page: -EINVAL at that page */
    if (codec != KC_CODEC_NONE) {
        CHECK(ftruncate(fd, 0) == 0);
        memset(data + descs[1].offset, 0xff, descs[1].size);
        CHECK(pwrite(fd, data, PAGE + used, 0) == (ssize_t)(PAGE + used));
        rc = kc_kdump_unpack(fd, descs, NPAGES, PAGE, window, 16 * PAGE, back, out, 0, &bad);
        CHECK(rc == -EINVAL && bad == 1);
    }
    close(fd);
    close(out);
out:
    free(src);
    free(back);
    free(data);
    free(window);
}

static void snappy_framing(void)
{
    size_t n = 5 * KC_SNAPPY_CHUNK + 1000;
    unsigned char *src = malloc(n), *frame = malloc(kc_snappy_frame_bound(n)), *back = malloc(n);
    uint64_t written, got, used, pos = 0, total = 0;
    int rc;

    for (size_t i = 0; i < n; i++)
        src[i] = (unsigned char)(i * 7 / 4096);
    rc = kc_snappy_frame(src, n, frame, kc_snappy_frame_bound(n), &written);
    if (rc == -ENOENT) {
        puts("snappy: library missing, skipped");
        goto out;
    }
    CHECK(rc == 0);
    /* decoded 100000 bytes at a time, as a reader with a small buffer does */
    while (total < n) {
        size_t want = n - total < 100000 ? n - total : 100000;

        rc = kc_snappy_unframe(frame + pos, written - pos, back + total, want, &got, &used);
        CHECK(rc == 0 && got > 0);
        if (rc || !got)
            break;
        total += got;
        pos += used;
    }
    CHECK(total == n && pos == written && memcmp(src, back, n) == 0);
    frame[4] ^= 1; /* the first chunk's CRC */
    rc = kc_snappy_unframe(frame, written, back, n, &got, &used);
    CHECK(rc == -EBADMSG && used == 0);
    rc = kc_snappy_unframe(frame, 3, back, n, &got, &used); /* cut inside a header */
    CHECK(rc == 0 && got == 0 && used == 0);
out:
    free(src);
    free(frame);
    free(back);
}

int main(void)
{
    CHECK(kc_crc32c(0, "123456789", 9) == 0xe3069283u); /* CRC-32C/ISCSI check value */
    CHECK(kc_codec_load(99) == -EINVAL);
    for (int codec = KC_CODEC_NONE; codec <= KC_CODEC_ZSTD; codec++)
        roundtrip(codec);
    snappy_framing();
    return check_report("kcore codec");
}
