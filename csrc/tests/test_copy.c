/*
 * Unit tests of the C copy engine, built with -fsanitize=address,undefined by
 * tests/test_c_sanitizers.py. Real faults only: holes in this process's
 * own memory read through /proc/self/mem, a memfd truncated under its mapping,
 * /dev/full as the output.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kcore_api.h"
#include "check.h"

enum { PAGE = 4096, BLOCK = 1 << 20 };


static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (unsigned char)(seed >> 16) | 1; /* never zero */
    }
}

static int memfd_with(const void *data, size_t n)
{
    int fd = memfd_create("kc-test", 0);

    if (fd < 0 || write(fd, data, n) != (ssize_t)n) {
        perror("memfd");
        exit(2);
    }
    return fd;
}

static void test_is_zero(void)
{
    static unsigned char buf[3 * PAGE + 64];

    memset(buf, 0, sizeof(buf));
    CHECK(kc_is_zero(buf, 0));
    for (size_t off = 0; off < 17; off++) {
        for (size_t n = 0; n < 300; n += 7) {
            CHECK(kc_is_zero(buf + off, n));
            if (n) {
                buf[off + n - 1] = 1;
                CHECK(!kc_is_zero(buf + off, n));
                buf[off + n - 1] = 0;
                buf[off] = 1;
                CHECK(!kc_is_zero(buf + off, n));
                buf[off] = 0;
            }
        }
    }
}

static void test_read_past_eof(void)
{
    size_t n = 2 * PAGE + 10;
    unsigned char *src = malloc(n), *out = malloc(4 * PAGE);
    struct kc_stats st;
    int fd;

    fill(src, n, 1);
    fd = memfd_with(src, n);
    memset(out, 0xAA, 4 * PAGE);
    CHECK(kc_read_fd(fd, PAGE, out, 4 * PAGE, BLOCK, PAGE, 0, &st) == 0);
    CHECK(memcmp(out, src + PAGE, n - PAGE) == 0);
    CHECK(kc_is_zero(out + (n - PAGE), 4 * PAGE - (n - PAGE)));
    CHECK(st.bytes_read == n - PAGE);
    CHECK(st.pages_zero_filled == 3);
    CHECK(st.first_errno == EIO && st.first_error_offset == n);

    CHECK(kc_read_fd(fd, 0, out, 4 * PAGE, BLOCK, PAGE, KC_STRICT, &st) == -EIO);
    CHECK(st.fail_where == KC_FAIL_FAULT && st.fail_offset == n);
    CHECK(kc_read_fd(fd, 0, out, PAGE, BLOCK, 1000, 0, &st) == -EINVAL);
    close(fd);
    free(src);
    free(out);
}

static void test_read_spans(void)
{
    size_t n = 8 * PAGE + 10;
    unsigned char *src = malloc(n), *out = malloc(6 * PAGE);
    /* page 1, pages 5-6, then past the end (page 8: 10 bytes; page 9: none) */
    uint64_t spans[] = {PAGE, PAGE, 5 * PAGE, 2 * PAGE, 8 * PAGE, 2 * PAGE};
    uint64_t ends[4] = {0, 0, 0, 0}, odd[] = {0, PAGE + 1};
    struct kc_stats st;
    int fd;

    fill(src, n, 3);
    fd = memfd_with(src, n);
    memset(out, 0xAA, 6 * PAGE);
    CHECK(kc_read_spans(fd, spans, 3, out, BLOCK, PAGE, 0, ends, &st) == 0);
    CHECK(memcmp(out, src + PAGE, PAGE) == 0);
    CHECK(memcmp(out + PAGE, src + 5 * PAGE, 2 * PAGE) == 0);
    CHECK(memcmp(out + 3 * PAGE, src + 8 * PAGE, 10) == 0);
    CHECK(kc_is_zero(out + 3 * PAGE + 10, 2 * PAGE - 10));
    CHECK(ends[0] > 0 && ends[0] <= ends[1] && ends[1] <= ends[2] && ends[2] <= ends[3]);
    CHECK(st.bytes_read == 3 * PAGE + 10);
    CHECK(st.pages_zero_filled == 2);
    CHECK(st.first_errno == EIO && st.first_error_offset == n);
    CHECK(kc_read_spans(fd, spans, 3, out, BLOCK, PAGE, KC_STRICT, NULL, &st) == -EIO);
    CHECK(st.fail_where == KC_FAIL_FAULT && st.fail_offset == n);
    CHECK(kc_read_spans(fd, odd, 1, out, BLOCK, PAGE, 0, NULL, &st) == -EINVAL);
    CHECK(kc_read_spans(fd, spans, 0, out, BLOCK, PAGE, 0, NULL, &st) == 0);
    CHECK(st.bytes_read == 0);
    close(fd);
    free(src);
    free(out);
}

static void test_proc_self_mem_holes(void)
{
    enum { NP = 600 };
    static const int holes[] = {0, 1, 255, 256, 300, 511, 512, NP - 1};
    size_t nh = sizeof(holes) / sizeof(holes[0]);
    unsigned char *map = mmap(NULL, NP * PAGE, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *want = malloc(NP * PAGE), *out = malloc(NP * PAGE);
    struct kc_stats st;
    int fd = open("/proc/self/mem", O_RDONLY);
    uint64_t runs[2 * NP];
    size_t nruns;

    CHECK(map != MAP_FAILED && fd >= 0);
    fill(map, NP * PAGE, 2);
    memset(map + 100 * PAGE, 0, 50 * PAGE);
    memcpy(want, map, NP * PAGE);
    for (size_t i = 0; i < nh; i++) {
        munmap(map + (size_t)holes[i] * PAGE, PAGE);
        memset(want + (size_t)holes[i] * PAGE, 0, PAGE);
    }
    CHECK(kc_read_fd(fd, (uintptr_t)map, out, NP * PAGE, BLOCK, PAGE, 0, &st) == 0);
    CHECK(memcmp(out, want, NP * PAGE) == 0);
    CHECK(st.pages_zero_filled == nh);
    CHECK(st.bytes_read == (NP - nh) * PAGE);
    CHECK(st.first_errno == EIO && st.first_error_offset == (uintptr_t)map);

    /* Small blocks, unaligned start: same bytes. */
    CHECK(kc_read_fd(fd, (uintptr_t)map + 77, out, NP * PAGE - 77, 3 * PAGE + 5, PAGE, 0,
                     &st) == 0);
    CHECK(memcmp(out, want + 77, NP * PAGE - 77) == 0);
    CHECK(st.pages_zero_filled == nh);

    /*
     * Starting on a readable page, process_vm_readv reads most of it; PROT_NONE
     * pages (which /proc/PID/mem reads, FOLL_FORCE) and holes go through pread.
     */
    CHECK(mprotect(map + 400 * PAGE, 3 * PAGE, PROT_NONE) == 0);
    CHECK(kc_read_fd(fd, (uintptr_t)map + 2 * PAGE, out, (NP - 2) * PAGE, BLOCK, PAGE, 0,
                     &st) == 0);
    CHECK(memcmp(out, want + 2 * PAGE, (NP - 2) * PAGE) == 0);
    CHECK(st.pages_zero_filled == nh - 2);
    CHECK(st.bytes_fast > 0 && st.bytes_fast <= st.bytes_read - 3 * PAGE);
    /* Short calls do not look for the PID. */
    CHECK(kc_read_fd(fd, (uintptr_t)map + 2 * PAGE, out, 8 * PAGE, BLOCK, PAGE, 0, &st) == 0);
    CHECK(st.bytes_fast == 0 && st.bytes_read == 8 * PAGE);

    CHECK(kc_read_fd(fd, (uintptr_t)map + 2 * PAGE, out, 400 * PAGE, BLOCK, PAGE, KC_STRICT,
                     &st) == -EIO);
    CHECK(st.fail_where == KC_FAIL_FAULT && st.fail_offset == (uintptr_t)map + 255 * PAGE);

    /* Runs of non-zero pages: [2,100) [150,255) [257,300) [301,511) [513,599). */
    CHECK(kc_data_runs(fd, (uintptr_t)map, NP * PAGE, PAGE, PAGE, out, BLOCK, 0, runs, NP,
                       &nruns, &st) == 0);
    CHECK(nruns == 5);
    if (nruns == 5) {
        CHECK(runs[0] == (uintptr_t)map + 2 * PAGE && runs[1] == 98 * PAGE);
        CHECK(runs[2] == (uintptr_t)map + 150 * PAGE && runs[3] == 105 * PAGE);
        CHECK(runs[8] == (uintptr_t)map + 513 * PAGE && runs[9] == 86 * PAGE);
    }
    CHECK(st.pages_sparse == 50 + nh);
    CHECK(kc_data_runs(fd, (uintptr_t)map, NP * PAGE, PAGE, PAGE, out, BLOCK, 0, runs, 2,
                       &nruns, &st) == -ENOSPC);
    CHECK(nruns == 2);

    /* Sparse copy into a memfd: holes where the pages are zero. */
    int dst = memfd_create("kc-out", 0);
    CHECK(kc_copy_fd(fd, (uintptr_t)map, dst, 0, NP * PAGE, out, BLOCK, PAGE, KC_SPARSE,
                     &st) == 0);
    CHECK(st.pages_sparse == 50 + nh);
    CHECK(st.bytes_written == (NP - 50 - nh) * PAGE);
    struct stat sb;
    CHECK(fstat(dst, &sb) == 0 && sb.st_size == NP * PAGE);
    CHECK(lseek(dst, 0, SEEK_DATA) == 2 * PAGE);
    CHECK(lseek(dst, 2 * PAGE, SEEK_HOLE) == 100 * PAGE);
    CHECK(pread(dst, out, NP * PAGE, 0) == NP * PAGE && memcmp(out, want, NP * PAGE) == 0);

    /* Again over stale bytes: the zero runs become holes again, the file position stays. */
    memset(out, 0xEE, NP * PAGE);
    CHECK(pwrite(dst, out, NP * PAGE, 0) == NP * PAGE);
    CHECK(lseek(dst, 77, SEEK_SET) == 77);
    CHECK(kc_copy_fd(fd, (uintptr_t)map, dst, 0, NP * PAGE, out, BLOCK, PAGE, KC_SPARSE,
                     &st) == 0);
    CHECK(lseek(dst, 0, SEEK_CUR) == 77);
    CHECK(lseek(dst, 0, SEEK_DATA) == 2 * PAGE);
    CHECK(lseek(dst, 2 * PAGE, SEEK_HOLE) == 100 * PAGE);
    CHECK(pread(dst, out, NP * PAGE, 0) == NP * PAGE && memcmp(out, want, NP * PAGE) == 0);
    close(dst);

    munmap(map, NP * PAGE);
    close(fd);
    free(want);
    free(out);
}

static void test_output_errors(void)
{
    unsigned char src[4 * PAGE], buf[2 * PAGE];
    struct kc_stats st;
    int fd, full = open("/dev/full", O_WRONLY);

    fill(src, sizeof(src), 3);
    fd = memfd_with(src, sizeof(src));
    CHECK(kc_copy_fd(fd, 0, full, -1, sizeof(src), buf, sizeof(buf), PAGE, 0, &st) == -ENOSPC);
    CHECK(st.fail_where == KC_FAIL_OUTPUT);
    CHECK(kc_copy_fd(-1, 0, full, -1, sizeof(src), buf, sizeof(buf), PAGE, 0, &st) == -EBADF);
    CHECK(st.fail_where == KC_FAIL_SOURCE);
    close(full);
    close(fd);
}

struct mem_job {
    int fd;
    size_t keep_pages;
    int ok;
};

static void *mem_copy_job(void *arg)
{
    struct mem_job *job = arg;
    enum { NP = 64 };
    unsigned char *map = mmap(NULL, NP * PAGE, PROT_READ, MAP_SHARED, job->fd, 0);
    unsigned char *out = malloc(NP * PAGE);
    struct kc_stats st;

    job->ok = map != MAP_FAILED;
    for (int round = 0; round < 50 && job->ok; round++) {
        memset(out, 0xAA, NP * PAGE);
        job->ok = kc_copy_mem(map, out, NP * PAGE, 0, PAGE, 0, &st) == 0 &&
                  st.pages_zero_filled == NP - job->keep_pages &&
                  st.bytes_read == job->keep_pages * PAGE &&
                  st.first_error_offset == job->keep_pages * PAGE &&
                  kc_is_zero(out + job->keep_pages * PAGE, (NP - job->keep_pages) * PAGE);
    }
    munmap(map, NP * PAGE);
    free(out);
    return NULL;
}

static void test_mem_sigbus(void)
{
    enum { NP = 64 };
    unsigned char *src = malloc(NP * PAGE), *out = malloc(NP * PAGE);
    struct kc_stats st;
    int fd;
    unsigned char *map;

    fill(src, NP * PAGE, 4);
    fd = memfd_with(src, NP * PAGE);
    map = mmap(NULL, NP * PAGE, PROT_READ, MAP_SHARED, fd, 0);
    CHECK(map != MAP_FAILED);
    CHECK(ftruncate(fd, 10 * PAGE + 100) == 0);
    CHECK(kc_copy_mem(map, out, NP * PAGE, 0, PAGE, 0, &st) == 0);
    CHECK(memcmp(out, src, 10 * PAGE + 100) == 0);
    CHECK(kc_is_zero(out + 10 * PAGE + 100, (NP - 10) * PAGE - 100));
    CHECK(st.pages_zero_filled == NP - 11);
    CHECK(st.bytes_read == 11 * PAGE);
    CHECK(st.first_errno == EFAULT && st.first_error_offset == 11 * PAGE);
    CHECK(kc_copy_mem(map + PAGE, out, 20 * PAGE, PAGE, PAGE, KC_STRICT, &st) == -EFAULT);
    CHECK(st.fail_where == KC_FAIL_FAULT && st.fail_offset == 11 * PAGE);
    munmap(map, NP * PAGE);
    close(fd);

    /* Two threads, each with its own truncated mapping, at the same time. */
    struct mem_job jobs[2];
    pthread_t th[2];
    for (int t = 0; t < 2; t++) {
        jobs[t].fd = memfd_with(src, NP * PAGE);
        jobs[t].keep_pages = 8 + 16 * (size_t)t;
        CHECK(ftruncate(jobs[t].fd, (off_t)(jobs[t].keep_pages * PAGE)) == 0);
        pthread_create(&th[t], NULL, mem_copy_job, &jobs[t]);
    }
    for (int t = 0; t < 2; t++) {
        pthread_join(th[t], NULL);
        CHECK(jobs[t].ok);
        close(jobs[t].fd);
    }
    free(src);
    free(out);
}

/*
 * kc_copy_packed: pages Z D D Z Z D Z D (granule one page), then coarser
 * granules, a phase, too few runs, /dev/full, and a hole in /proc/self/mem.
 */
static void test_copy_packed(void)
{
    enum { NP = 8 };
    static const int data_page[NP] = {0, 1, 1, 0, 0, 1, 0, 1};
    unsigned char *src = calloc(NP, PAGE), *out = malloc(NP * PAGE), *buf = malloc(4 * PAGE);
    uint64_t runs[2 * NP], written;
    size_t nruns;
    struct kc_stats st;
    int fd, dst, full = open("/dev/full", O_WRONLY);

    for (int i = 0; i < NP; i++)
        if (data_page[i])
            fill(src + i * PAGE, PAGE, 10 + (unsigned)i);
    fd = memfd_with(src, NP * PAGE);
    dst = memfd_create("kc-packed", 0);

    /* Granule = page, blocks of 2 pages: runs merge across blocks. */
    CHECK(kc_copy_packed(fd, 0, dst, 100, NP * PAGE, PAGE, 0, PAGE, buf, 2 * PAGE, 0, runs, NP,
                         &nruns, &written, &st) == 0);
    CHECK(nruns == 3 && written == 4 * PAGE && st.bytes_written == 4 * PAGE);
    CHECK(runs[0] == PAGE && runs[1] == 2 * PAGE && runs[2] == 5 * PAGE && runs[3] == PAGE &&
          runs[4] == 7 * PAGE && runs[5] == PAGE);
    CHECK(st.pages_sparse == 0 && st.bytes_read == NP * PAGE && st.pages_zero_filled == 0);
    CHECK(pread(dst, out, 4 * PAGE, 100) == 4 * PAGE);
    CHECK(memcmp(out, src + PAGE, 2 * PAGE) == 0);
    CHECK(memcmp(out + 2 * PAGE, src + 5 * PAGE, PAGE) == 0);
    CHECK(memcmp(out + 3 * PAGE, src + 7 * PAGE, PAGE) == 0);

    /* Granule of 2 pages with phase one page: granules [1,3) [3,5) [5,7) [7,8). */
    CHECK(kc_copy_packed(fd, 0, dst, 0, NP * PAGE, 2 * PAGE, PAGE, PAGE, buf, 4 * PAGE, 0,
                         runs, NP, &nruns, &written, &st) == 0);
    CHECK(nruns == 2 && written == 5 * PAGE);
    CHECK(runs[0] == PAGE && runs[1] == 2 * PAGE && runs[2] == 5 * PAGE && runs[3] == 3 * PAGE);

    /* KC_SPARSE: the zero page 6 inside the kept run [5, 8) becomes a hole, over stale data. */
    CHECK(ftruncate(dst, 0) == 0);
    memset(out, 0xee, 8 * PAGE);
    CHECK(pwrite(dst, out, 8 * PAGE, 0) == 8 * PAGE);
    CHECK(kc_copy_packed(fd, 0, dst, 0, NP * PAGE, 2 * PAGE, PAGE, PAGE, buf, 4 * PAGE,
                         KC_SPARSE, runs, NP, &nruns, &written, &st) == 0);
    CHECK(nruns == 2 && written == 5 * PAGE && st.pages_sparse == 1);
    CHECK(pread(dst, out, 5 * PAGE, 0) == 5 * PAGE);
    CHECK(memcmp(out, src + PAGE, 2 * PAGE) == 0);
    CHECK(memcmp(out + 2 * PAGE, src + 5 * PAGE, 3 * PAGE) == 0);
    /* A run ending in a zero page (a hole) still reaches dst_off + written. */
    CHECK(ftruncate(dst, 0) == 0);
    CHECK(kc_copy_packed(fd, 5 * PAGE, dst, 0, 2 * PAGE, 2 * PAGE, PAGE, PAGE, buf, 4 * PAGE,
                         KC_SPARSE, runs, NP, &nruns, &written, &st) == 0);
    CHECK(nruns == 1 && runs[0] == 5 * PAGE && runs[1] == 2 * PAGE && written == 2 * PAGE);
    CHECK(lseek(dst, 0, SEEK_END) == 2 * PAGE && st.pages_sparse == 1 && st.bytes_written == PAGE);

    /* Too few runs: -ENOSPC, not an output failure; what fits is reported and written. */
    CHECK(kc_copy_packed(fd, 0, dst, 0, NP * PAGE, PAGE, 0, PAGE, buf, 2 * PAGE, 0, runs, 2,
                         &nruns, &written, &st) == -ENOSPC);
    CHECK(st.fail_where == KC_FAIL_NONE && nruns == 2 && written == 3 * PAGE);

    /* Bad arguments. */
    CHECK(kc_copy_packed(fd, 0, dst, 0, PAGE, PAGE, PAGE, PAGE, buf, 2 * PAGE, 0, runs, NP,
                         &nruns, &written, &st) == -EINVAL);
    CHECK(kc_copy_packed(fd, 0, dst, 0, PAGE, 4 * PAGE, 0, PAGE, buf, 2 * PAGE, 0, runs, NP,
                         &nruns, &written, &st) == -EINVAL);

    /* A full output fails on the output side. */
    CHECK(kc_copy_packed(fd, 0, full, 0, NP * PAGE, PAGE, 0, PAGE, buf, 2 * PAGE, 0, runs, NP,
                         &nruns, &written, &st) == -ENOSPC);
    CHECK(st.fail_where == KC_FAIL_OUTPUT);

    /* A hole in this process's memory reads as zeros (elided, counted), or fails strictly. */
    {
        unsigned char *m = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        int mem = open("/proc/self/mem", O_RDONLY);

        fill(m, 4 * PAGE, 99);
        CHECK(munmap(m + PAGE, PAGE) == 0);
        CHECK(kc_copy_packed(mem, (uint64_t)(uintptr_t)m, dst, 0, 4 * PAGE, PAGE, 0, PAGE, buf,
                             4 * PAGE, 0, runs, NP, &nruns, &written, &st) == 0);
        CHECK(nruns == 2 && written == 3 * PAGE && st.pages_zero_filled == 1);
        CHECK(st.first_error_offset == (uint64_t)(uintptr_t)(m + PAGE));
        CHECK(pread(dst, out, 3 * PAGE, 0) == 3 * PAGE);
        CHECK(memcmp(out, m, PAGE) == 0 && memcmp(out + PAGE, m + 2 * PAGE, 2 * PAGE) == 0);
        CHECK(kc_copy_packed(mem, (uint64_t)(uintptr_t)m, dst, 0, 4 * PAGE, PAGE, 0, PAGE, buf,
                             4 * PAGE, KC_STRICT, runs, NP, &nruns, &written, &st) == -EIO);
        CHECK(st.fail_where == KC_FAIL_FAULT && nruns == 0 && written == 0);
        munmap(m, PAGE);
        munmap(m + 2 * PAGE, 2 * PAGE);
        close(mem);
    }
    close(full);
    close(dst);
    close(fd);
    free(src);
    free(out);
    free(buf);
}

int main(void)
{
    test_is_zero();
    test_read_past_eof();
    test_read_spans();
    test_proc_self_mem_holes();
    test_output_errors();
    test_mem_sigbus();
    test_copy_packed();
    return check_report("kcore C engine");
}
