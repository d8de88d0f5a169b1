/*
 * The copy engine: pread in large blocks, page-by-page fallback where a block
 * fails, unreadable pages zero-filled and counted, pwrite (sparse or dense).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "kcore_api.h"

/* Errnos that mean "this part of the source cannot be read", not "the call is wrong". */
static int kc_is_fault(int err)
{
    switch (err) {
    case EIO:    /* /proc/PID/mem on an unmapped page; media errors */
    case EPERM:  /* /dev/mem with STRICT_DEVMEM */
    case EFAULT:
    case ENXIO:
    case EINVAL: /* past the end of some sources; /proc/PID/mem at offsets >= 2^63 */
        return 1;
    default:
        return 0;
    }
}

static int kc_page_ok(size_t page_size)
{
    return page_size >= 512 && (page_size & (page_size - 1)) == 0;
}

/* First page boundary strictly above a. */
static uint64_t kc_next_page(uint64_t a, size_t page_size)
{
    return (a | (page_size - 1)) + 1;
}

static void kc_note_fault(struct kc_stats *st, uint64_t off, int err)
{
    if (!st->first_errno) {
        st->first_errno = err;
        st->first_error_offset = off;
    }
}

/* Two 64-bit lanes: SSE2 on x86-64, so a page is checked 128 bytes at a time. */
typedef uint64_t kc_v2 __attribute__((vector_size(16)));

int kc_is_zero(const void *p, size_t n)
{
    const unsigned char *c = p;

    while (n && ((uintptr_t)c & 15)) {
        if (*c)
            return 0;
        c++;
        n--;
    }
    for (; n >= 128; c += 128, n -= 128) {
        kc_v2 v[8];
        kc_v2 x;

        memcpy(v, c, sizeof(v));
        x = ((v[0] | v[1]) | (v[2] | v[3])) | ((v[4] | v[5]) | (v[6] | v[7]));
        if (x[0] | x[1])
            return 0;
    }
    while (n) {
        if (*c)
            return 0;
        c++;
        n--;
    }
    return 1;
}

/* Calls shorter than this read with pread alone (finding the PID costs a few syscalls). */
enum { KC_FAST_MIN = 256 << 10, KC_PROBE = 256, KC_PROC_SUPER_MAGIC = 0x9fa0 };

/*
 * A source: its fd, the PID whose memory it is when process_vm_readv may read it,
 * and for a regular file whose holes lseek(SEEK_DATA/SEEK_HOLE) reports (a sparse
 * VM RAM file), the last hole and data extent found, so holes read as zeros unread.
 */
struct kc_src {
    int fd;
    pid_t pid;
    size_t page_size;
    int holes;
    uint64_t size;
    uint64_t hole_from, hole_to, data_from, data_to;
    dev_t dev;
    ino_t ino;
};

/*
 * Data extents SEEK_HOLE found, remembered across calls (a dump reads a source in 2 MiB
 * batches, one call each). On tmpfs SEEK_HOLE walks the page cache from off to the next
 * hole, so asking once per batch costs the square of a data run's length (a 4.6 GB core
 * whose holes had filled: 4,969 calls, 2.6 ms each); asked once per run, it costs the file
 * once. Only data is remembered: a hole may fill since (a running guest's RAM file), data
 * stays data or reads as zeros anyway, so a stale or reused entry costs a read, never bytes.
 */
enum { KC_DATA_SLOTS = 16 };

struct kc_data_ext {
    dev_t dev;
    ino_t ino;
    uint64_t from, to;
};

static struct kc_data_ext kc_data_seen[KC_DATA_SLOTS];
static unsigned int kc_data_next;
static pthread_mutex_t kc_data_lock = PTHREAD_MUTEX_INITIALIZER;

/* A remembered data extent of src's file holding off, into src->data_from/to: 1, else 0. */
static int kc_data_recall(struct kc_src *src, uint64_t off)
{
    int found = 0;

    pthread_mutex_lock(&kc_data_lock);
    for (unsigned int i = 0; i < KC_DATA_SLOTS && !found; i++) {
        const struct kc_data_ext *e = &kc_data_seen[i];

        if (e->to > e->from && e->dev == src->dev && e->ino == src->ino &&
            off >= e->from && off < e->to) {
            src->data_from = e->from;
            src->data_to = e->to;
            found = 1;
        }
    }
    pthread_mutex_unlock(&kc_data_lock);
    return found;
}

/* Remember [from, to) as data of src's file: grow an entry it overlaps, else take a slot. */
static void kc_data_remember(const struct kc_src *src, uint64_t from, uint64_t to)
{
    struct kc_data_ext *e = NULL;

    pthread_mutex_lock(&kc_data_lock);
    for (unsigned int i = 0; i < KC_DATA_SLOTS && !e; i++) {
        struct kc_data_ext *c = &kc_data_seen[i];

        if (c->to > c->from && c->dev == src->dev && c->ino == src->ino &&
            from <= c->to && c->from <= to)
            e = c;
    }
    if (e) {
        e->from = from < e->from ? from : e->from;
        e->to = to > e->to ? to : e->to;
    } else {
        e = &kc_data_seen[kc_data_next++ % KC_DATA_SLOTS];
        *e = (struct kc_data_ext){src->dev, src->ino, from, to};
    }
    pthread_mutex_unlock(&kc_data_lock);
}

/*
 * The PID of fd when it is /proc/PID/mem, in this process's /proc (same inode,
 * same PID namespace), and process_vm_readv reads the same bytes at off as
 * pread does (so the fd still holds that process's memory: no exec since).
 * 0 otherwise, and for calls too short to gain.
 */
static struct kc_src kc_src_of(int fd, uint64_t off, uint64_t len, size_t page_size)
{
    struct kc_src src = {fd, 0, page_size, 0, 0, 0, 0, 0, 0, 0, 0};
    char link[64], path[64], tail;
    unsigned char by_pread[KC_PROBE], by_pvm[KC_PROBE];
    struct iovec local = {by_pvm, KC_PROBE}, remote = {(void *)(uintptr_t)off, KC_PROBE};
    struct statfs fs;
    struct stat a, b;
    long pid;
    ssize_t n;

    /* One cheap call rules out everything but procfs files. */
    if (len < KC_FAST_MIN || fstatfs(fd, &fs) < 0)
        return src;
    if (fs.f_type != KC_PROC_SUPER_MAGIC) {
        /* only a file with fewer blocks than bytes has holes: on a dense one (tmpfs
         * above all) SEEK_HOLE walks every page from off to the end, on every call */
        if (fstat(fd, &a) == 0 && S_ISREG(a.st_mode) &&
            (uint64_t)a.st_blocks * 512 < (uint64_t)a.st_size) {
            src.holes = 1;
            src.size = (uint64_t)a.st_size;
            src.dev = a.st_dev;
            src.ino = a.st_ino;
        }
        return src;
    }
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof(path) - 1);
    if (n <= 0)
        return src;
    path[n] = '\0';
    if (sscanf(path, "/proc/%ld/mem%c", &pid, &tail) != 1 || pid <= 0)
        return src;
    /* That /proc must count PIDs as process_vm_readv does: /proc/self is this process. */
    n = readlink("/proc/self", link, sizeof(link) - 1);
    if (n <= 0)
        return src;
    link[n] = '\0';
    if (strtol(link, NULL, 10) != (long)getpid())
        return src;
    if (fstat(fd, &a) < 0 || stat(path, &b) < 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino)
        return src;
    if (pread(fd, by_pread, KC_PROBE, (off_t)off) != KC_PROBE ||
        process_vm_readv((pid_t)pid, &local, 1, &remote, 1, 0) != KC_PROBE ||
        memcmp(by_pread, by_pvm, KC_PROBE) != 0)
        return src;
    src.pid = (pid_t)pid;
    return src;
}

/*
 * Bytes of [off, off + len) from off on that the source file holds as a hole
 * (SEEK_DATA/SEEK_HOLE), cut to end on a page boundary unless they reach off + len;
 * 0 where off holds data or holes are unknown. Holes read as zeros without a read.
 */
static uint64_t kc_hole_at(struct kc_src *src, uint64_t off, uint64_t len)
{
    uint64_t end;
    off_t d, h;

    if (!src->holes || off >= src->size)
        return 0;
    if (off >= src->data_from && off < src->data_to)
        return 0;
    if (!(off >= src->hole_from && off < src->hole_to)) {
        if (kc_data_recall(src, off))
            return 0;
        d = lseek(src->fd, (off_t)off, SEEK_DATA);
        if (d < 0 && errno != ENXIO) {
            src->holes = 0;     /* the filesystem cannot say: read everything */
            return 0;
        }
        if (d >= 0 && (uint64_t)d == off) {
            h = lseek(src->fd, (off_t)off, SEEK_HOLE);
            if (h < 0 || (uint64_t)h <= off) {
                src->holes = 0;
                return 0;
            }
            src->data_from = off;
            src->data_to = (uint64_t)h;
            kc_data_remember(src, off, (uint64_t)h);
            return 0;
        }
        src->hole_from = off;   /* ENXIO: no data from off to the end of the file */
        src->hole_to = d < 0 ? src->size : (uint64_t)d;
    }
    end = src->hole_to < off + len ? src->hole_to : off + len;
    if (end < off + len)
        end &= ~(uint64_t)(src->page_size - 1);
    return end > off ? end - off : 0;
}

/* Pages (page_size-aligned in source offsets) that [off, off + n) touches. */
static uint64_t kc_pages_of(uint64_t off, uint64_t n, size_t page_size)
{
    uint64_t first = off & ~(uint64_t)(page_size - 1);

    return n ? (off + n - first + page_size - 1) / page_size : 0;
}

/*
 * Read up to n bytes at off into p: retry EINTR, continue after short reads.
 * Returns the bytes read; fewer than n when the source failed at off + that
 * count (*err_ret: its errno, EIO for EOF). -errno for a real error.
 */
static ssize_t kc_pread_some(const struct kc_src *src, char *p, size_t n, uint64_t off,
                             int *err_ret, struct kc_stats *st)
{
    size_t got = 0;

    *err_ret = 0;
    while (got < n) {
        size_t want;
        ssize_t r;

        if (src->pid) {
            struct iovec local = {p + got, n - got};
            struct iovec remote = {(void *)(uintptr_t)(off + got), n - got};

            r = process_vm_readv(src->pid, &local, 1, &remote, 1, 0);
            if (r > 0) {
                got += (size_t)r;
                st->bytes_fast += (uint64_t)r;
                continue;
            }
        }
        /* After a process_vm_readv failure, pread says what this page really holds. */
        want = n - got;
        if (src->pid) {
            uint64_t page_end = ((off + got) | (src->page_size - 1)) + 1;

            if (page_end - (off + got) < want)
                want = (size_t)(page_end - (off + got));
        }
        r = pread(src->fd, p + got, want, (off_t)(off + got));
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        if (r == 0) {           /* EOF inside the range is not success */
            *err_ret = EIO;
            break;
        }
        if (errno == EINTR)
            continue;
        if (!kc_is_fault(errno))
            return -errno;
        *err_ret = errno;
        break;
    }
    return (ssize_t)got;
}

/*
 * Fill buf with [off, off + len) of fd. Large reads first; where one fails,
 * the page at the failure is read alone: if it fails too it is zero-filled
 * and large reads resume after it (the source ends reads exactly at bad
 * pages, as /proc/PID/mem does); if it reads, the source fails whole requests
 * and the rest of this block goes page by page.
 */
static int kc_read_block(const struct kc_src *src, char *buf, uint64_t off, size_t len,
                         size_t page_size, uint32_t flags, struct kc_stats *st)
{
    size_t pos = 0;
    int page_mode = 0;

    while (pos < len) {
        size_t pe;
        ssize_t n;
        int err;

        if (!page_mode) {
            n = kc_pread_some(src, buf + pos, len - pos, off + pos, &err, st);
            if (n < 0)
                goto fail;
            pos += (size_t)n;
            st->bytes_read += (uint64_t)n;
            if (!err)
                continue;
        }
        pe = (size_t)(kc_next_page(off + pos, page_size) - off);
        if (pe > len)
            pe = len;
        /* With process_vm_readv, the failing pread was already this page alone. */
        if (page_mode || !src->pid) {
            n = kc_pread_some(src, buf + pos, pe - pos, off + pos, &err, st);
            if (n < 0)
                goto fail;
            pos += (size_t)n;
            st->bytes_read += (uint64_t)n;
        }
        if (err) {
            kc_note_fault(st, off + pos, err);
            if (flags & KC_STRICT) {
                st->fail_where = KC_FAIL_FAULT;
                st->fail_offset = off + pos;
                return -err;
            }
            memset(buf + pos, 0, pe - pos);
            st->pages_zero_filled++;
        } else {
            page_mode = 1;
        }
        pos = pe;
        continue;
fail:
        st->fail_where = KC_FAIL_SOURCE;
        st->fail_offset = off + pos;
        return (int)n;
    }
    return 0;
}

/* Length of the next block at a: at most max, ending on an align boundary unless it is the last. */
static size_t kc_block_len(uint64_t a, uint64_t left, size_t max, size_t align)
{
    uint64_t end;

    if (left <= max)
        return (size_t)left;
    end = (a + max) & ~(uint64_t)(align - 1);
    if (end <= a)
        return max;
    return (size_t)(end - a);
}

/* Write all n bytes at dst_off (or sequentially when dst_off < 0). */
static int kc_write_all(int fd, const char *p, size_t n, int64_t dst_off, struct kc_stats *st)
{
    size_t done = 0;

    while (done < n) {
        ssize_t r;

        if (dst_off < 0)
            r = write(fd, p + done, n - done);
        else
            r = pwrite(fd, p + done, n - done, (off_t)(dst_off + (int64_t)done));
        if (r > 0) {
            done += (size_t)r;
            st->bytes_written += (uint64_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        st->fail_where = KC_FAIL_OUTPUT;
        st->fail_offset = dst_off < 0 ? st->bytes_written : (uint64_t)dst_off + done;
        return r < 0 ? -errno : -EIO;
    }
    return 0;
}

/* A sparse output file, and what is known about its holes. */
struct kc_sparse_out {
    int fd;
    uint64_t old_size;              /* its size before the call: stale data may lie below */
    uint64_t hole_from, hole_to;    /* [hole_from, hole_to) is known to hold no data */
};

/* Where the next data at or after at is (SEEK_DATA), without moving the file position. */
static int kc_next_data(int fd, uint64_t at, uint64_t *data_ret)
{
    off_t cur = lseek(fd, 0, SEEK_CUR);
    off_t d;
    int err;

    if (cur < 0)
        return -1;
    d = lseek(fd, (off_t)at, SEEK_DATA);
    err = errno;
    if (lseek(fd, cur, SEEK_SET) < 0)
        return -1;
    if (d < 0 && err != ENXIO) {
        errno = err;
        return -1;
    }
    *data_ret = d < 0 ? UINT64_MAX : (uint64_t)d;
    return 0;
}

/*
 * An all-zero run [at, at + n) of the output: nothing to do where the file has
 * no data (above its old size, or a known hole); over stale data, punch a hole,
 * or write the zeros where punching is unsupported.
 */
static int kc_zero_run(struct kc_sparse_out *o, const char *p, size_t n, uint64_t at,
                       struct kc_stats *st)
{
    uint64_t end = at + n, data;

    if (at >= o->old_size)
        return 0;
    if (end > o->old_size)
        end = o->old_size;
    if (at >= o->hole_from && end <= o->hole_to)
        return 0;
    if (kc_next_data(o->fd, at, &data) == 0) {
        o->hole_from = at;
        o->hole_to = data;
        if (end <= data)
            return 0;
    }
    if (fallocate(o->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)at,
                  (off_t)(end - at)) == 0)
        return 0;
    return kc_write_all(o->fd, p, (size_t)(end - at), (int64_t)at, st);
}

/*
 * Write block b (n bytes from source offset a) to the sparse output at out:
 * runs of non-zero pages in one write each, runs of zero pages as holes.
 * *tail_hole_ret: whether the block ends with a zero page.
 */
static int kc_write_sparse(struct kc_sparse_out *o, const char *b, size_t n, uint64_t a,
                           uint64_t out, size_t page_size, int *tail_hole_ret,
                           struct kc_stats *st)
{
    size_t p = 0, run = 0;
    int run_zero = 0, rc;

    while (p < n) {
        size_t pe = (size_t)(kc_next_page(a + p, page_size) - a);
        int zero;

        if (pe > n)
            pe = n;
        zero = kc_is_zero(b + p, pe - p);
        st->pages_sparse += (uint64_t)zero;
        if (p > run && zero != run_zero) {
            rc = run_zero ? kc_zero_run(o, b + run, p - run, out + run, st)
                          : kc_write_all(o->fd, b + run, p - run, (int64_t)(out + run), st);
            if (rc)
                return rc;
            run = p;
        }
        run_zero = zero;
        p = pe;
    }
    *tail_hole_ret = run_zero;
    if (n > run)
        return run_zero ? kc_zero_run(o, b + run, n - run, out + run, st)
                        : kc_write_all(o->fd, b + run, n - run, (int64_t)(out + run), st);
    return 0;
}

int kc_copy_fd(int src_fd, uint64_t src_off, int dst_fd, int64_t dst_off,
               uint64_t len, void *buf, size_t buf_len, size_t page_size,
               uint32_t flags, struct kc_stats *stats_ret)
{
    struct kc_stats *st = stats_ret;
    struct kc_sparse_out o = {dst_fd, 0, 0, 0};
    struct kc_src src;
    char *b = buf;
    uint64_t done = 0;
    int sparse = (flags & KC_SPARSE) && dst_off >= 0;
    int tail_hole = 0;
    int rc;

    memset(st, 0, sizeof(*st));
    if (!kc_page_ok(page_size) || buf_len < page_size)
        return -EINVAL;
    src = kc_src_of(src_fd, src_off, len, page_size);
    if (sparse) {
        struct stat sb;

        if (fstat(dst_fd, &sb) < 0) {
            st->fail_where = KC_FAIL_OUTPUT;
            st->fail_offset = (uint64_t)dst_off;
            return -errno;
        }
        if (S_ISREG(sb.st_mode))
            o.old_size = (uint64_t)sb.st_size;
        else
            sparse = 0;         /* holes only exist in regular files */
    }
    while (done < len) {
        uint64_t a = src_off + done;
        size_t n = kc_block_len(a, len - done, buf_len, page_size);
        int64_t out = dst_off < 0 ? -1 : dst_off + (int64_t)done;
        uint64_t hole = kc_hole_at(&src, a, len - done);

        /*
         * Only whole blocks are taken from holes: the buffer then holds each block's
         * bytes at its start (copy_through hashes a one-block call's buffer after).
         */
        if (hole >= n) {
            memset(b, 0, n);
            if (sparse && (uint64_t)out >= o.old_size) {
                /* A hole of the source over the new part of a sparse output: no writes. */
                st->bytes_read += hole;
                st->pages_sparse += kc_pages_of(a, hole, page_size);
                tail_hole = 1;
                done += hole;
                continue;
            }
            st->bytes_read += n;
        } else {
            rc = kc_read_block(&src, b, a, n, page_size, flags, st);
            if (rc)
                return rc;
        }
        if (sparse)
            rc = kc_write_sparse(&o, b, n, a, (uint64_t)out, page_size, &tail_hole, st);
        else
            rc = kc_write_all(dst_fd, b, n, out, st);
        if (rc)
            return rc;
        done += n;
    }
    if (sparse && tail_hole && (uint64_t)dst_off + len > o.old_size) {
        /* The last pages were holes: the file must still reach the end of the range. */
        struct stat sb;

        if (fstat(dst_fd, &sb) < 0 ||
            ((uint64_t)sb.st_size < (uint64_t)dst_off + len &&
             ftruncate(dst_fd, (off_t)((uint64_t)dst_off + len)) < 0)) {
            st->fail_where = KC_FAIL_OUTPUT;
            st->fail_offset = (uint64_t)dst_off + len;
            return -errno;
        }
    }
    return 0;
}

int kc_read_fd(int fd, uint64_t off, void *buf, size_t len, size_t block,
               size_t page_size, uint32_t flags, struct kc_stats *stats_ret)
{
    struct kc_stats *st = stats_ret;
    char *b = buf;
    struct kc_src src;
    size_t done = 0;

    memset(st, 0, sizeof(*st));
    if (!kc_page_ok(page_size) || block < page_size)
        return -EINVAL;
    src = kc_src_of(fd, off, len, page_size);
    while (done < len) {
        size_t n = kc_block_len(off + done, len - done, block, page_size);
        uint64_t hole = kc_hole_at(&src, off + done, len - done);
        int rc;

        if (hole) {             /* a hole of the source file: zeros, unread */
            memset(b + done, 0, (size_t)hole);
            st->bytes_read += hole;
            done += (size_t)hole;
            continue;
        }
        rc = kc_read_block(&src, b + done, off + done, n, page_size, flags, st);
        if (rc)
            return rc;
        done += n;
    }
    return 0;
}

static uint64_t kc_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int kc_read_spans(int fd, const uint64_t *spans, size_t n, void *buf, size_t block,
                  size_t page_size, uint32_t flags, uint64_t *times_ns,
                  struct kc_stats *stats_ret)
{
    struct kc_stats *st = stats_ret, one;
    char *b = buf;
    uint64_t total = 0;

    memset(st, 0, sizeof(*st));
    if (!kc_page_ok(page_size) || block < page_size)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (spans[2 * i + 1] % page_size || spans[2 * i + 1] > SIZE_MAX - total)
            return -EINVAL;
        total += spans[2 * i + 1];
    }
    memset(buf, 0, (size_t)total);  /* fault the buffer in before the first read */
    if (times_ns)
        times_ns[0] = kc_now_ns();
    for (size_t i = 0; i < n; i++) {
        uint64_t off = spans[2 * i], len = spans[2 * i + 1];
        int rc = kc_read_fd(fd, off, b, (size_t)len, block, page_size, flags, &one);

        st->bytes_read += one.bytes_read;
        st->bytes_fast += one.bytes_fast;
        st->pages_zero_filled += one.pages_zero_filled;
        if (one.first_errno && !st->first_errno) {
            st->first_errno = one.first_errno;
            st->first_error_offset = one.first_error_offset;
        }
        if (rc) {
            st->fail_where = one.fail_where;
            st->fail_offset = one.fail_offset;
            return rc;
        }
        if (times_ns)
            times_ns[i + 1] = kc_now_ns();
        b += len;
    }
    return 0;
}

int kc_data_runs(int fd, uint64_t off, uint64_t len, size_t granule,
                 size_t page_size, void *buf, size_t buf_len, uint32_t flags,
                 uint64_t *runs_ret, size_t max_runs, size_t *nruns_ret,
                 struct kc_stats *stats_ret)
{
    struct kc_stats *st = stats_ret;
    char *b = buf;
    uint64_t done = 0;
    size_t nruns = 0;
    struct kc_src src;

    memset(st, 0, sizeof(*st));
    *nruns_ret = 0;
    if (!kc_page_ok(page_size) || granule < page_size || granule % page_size ||
        buf_len < granule)
        return -EINVAL;
    src = kc_src_of(fd, off, len, page_size);
    while (done < len) {
        uint64_t a = off + done;
        size_t n = kc_block_len(a, len - done, buf_len, granule);
        size_t g = 0;
        uint64_t hole = kc_hole_at(&src, a, len - done);
        int rc;

        if (hole) {
            /* Whole granules in a hole of the source file are zero: skip them unread. */
            uint64_t skip = hole == len - done ? hole : (a + hole) / granule * granule;

            skip = hole == len - done ? hole : (skip > a ? skip - a : 0);
            if (skip) {
                st->bytes_read += skip;
                st->pages_sparse += kc_pages_of(a, skip, page_size);
                done += skip;
                continue;
            }
        }
        rc = kc_read_block(&src, b, a, n, page_size, flags, st);
        if (rc)
            return rc;
        while (g < n) {
            uint64_t ga = a + g;
            uint64_t gend = ga - ga % granule + granule;
            size_t ge = gend - a > n ? n : (size_t)(gend - a);

            if (kc_is_zero(b + g, ge - g)) {
                uint64_t first = ga & ~(uint64_t)(page_size - 1);

                st->pages_sparse += (a + ge - first + page_size - 1) / page_size;
            } else if (nruns && runs_ret[2 * nruns - 2] + runs_ret[2 * nruns - 1] == ga) {
                runs_ret[2 * nruns - 1] += ge - g;
            } else {
                if (nruns == max_runs) {
                    *nruns_ret = nruns;
                    return -ENOSPC;
                }
                runs_ret[2 * nruns] = ga;
                runs_ret[2 * nruns + 1] = ge - g;
                nruns++;
            }
            g = ge;
        }
        done += n;
    }
    *nruns_ret = nruns;
    return 0;
}

/* Bytes from a to the next granule boundary (boundaries at offsets = phase mod granule). */
static uint64_t kc_to_granule_end(uint64_t a, size_t granule, size_t phase)
{
    uint64_t into = (a % granule + granule - phase) % granule;

    return granule - into;
}

/* Where kc_copy_packed writes: the output, and with KC_SPARSE what kc_write_sparse needs. */
struct kc_packed_out {
    struct kc_sparse_out o;
    uint64_t dst_off, written;
    int sparse, tail_hole;
};

/*
 * Write the kept bytes [from, to) of block b (source offset a) at dst_off + written:
 * densely, or with KC_SPARSE its zero pages (aligned on source offsets) as holes.
 */
static int kc_packed_flush(struct kc_packed_out *p, const char *b, uint64_t a, size_t from,
                           size_t to, size_t page_size, struct kc_stats *st)
{
    uint64_t at = p->dst_off + p->written;
    int rc;

    if (to <= from)
        return 0;
    if (p->sparse)
        rc = kc_write_sparse(&p->o, b + from, to - from, a + from, at, page_size,
                             &p->tail_hole, st);
    else
        rc = kc_write_all(p->o.fd, b + from, to - from, (int64_t)at, st);
    if (rc)
        return rc;
    p->written += to - from;
    return 0;
}

int kc_copy_packed(int src_fd, uint64_t src_off, int dst_fd, uint64_t dst_off,
                   uint64_t len, size_t granule, size_t phase, size_t page_size,
                   void *buf, size_t buf_len, uint32_t flags,
                   uint64_t *runs_ret, size_t max_runs, size_t *nruns_ret,
                   uint64_t *written_ret, struct kc_stats *stats_ret)
{
    struct kc_stats *st = stats_ret;
    struct kc_packed_out p = {{dst_fd, 0, 0, 0}, dst_off, 0, 0, 0};
    char *b = buf;
    uint64_t done = 0;
    size_t nruns = 0, span;
    struct kc_src src;
    int rc = 0;

    memset(st, 0, sizeof(*st));
    *nruns_ret = 0;
    *written_ret = 0;
    if (!kc_page_ok(page_size) || granule < page_size || granule % page_size ||
        buf_len < granule || phase >= granule || dst_off > (uint64_t)INT64_MAX)
        return -EINVAL;
    if (flags & KC_SPARSE) {
        struct stat sb;

        if (fstat(dst_fd, &sb) < 0) {
            st->fail_where = KC_FAIL_OUTPUT;
            st->fail_offset = dst_off;
            return -errno;
        }
        p.sparse = S_ISREG(sb.st_mode);  /* holes only exist in regular files */
        p.o.old_size = (uint64_t)sb.st_size;
    }
    span = buf_len - buf_len % granule;
    src = kc_src_of(src_fd, src_off, len, page_size);
    while (done < len) {
        uint64_t a = src_off + done;
        uint64_t n64 = kc_to_granule_end(a, granule, phase) + (span - granule);
        size_t n, g = 0, pend = 0, pend_end = 0;

        uint64_t hole = kc_hole_at(&src, a, len - done);

        if (hole) {
            /* Whole granules in a hole of the source file are zero: left out, unread. */
            uint64_t e = a + hole, skip = hole;

            if (hole < len - done) {
                e -= kc_to_granule_end(e, granule, phase) % granule ?
                     granule - kc_to_granule_end(e, granule, phase) : 0;
                skip = e > a ? e - a : 0;
            }
            if (skip) {
                st->bytes_read += skip;
                done += skip;
                continue;
            }
        }
        if (n64 > len - done)
            n64 = len - done;
        n = (size_t)n64;
        rc = kc_read_block(&src, b, a, n, page_size, flags, st);
        if (rc)
            goto out;
        while (g < n) {
            uint64_t ga = a + g;
            uint64_t step = kc_to_granule_end(ga, granule, phase);
            size_t ge = step > n - g ? n : g + (size_t)step;

            if (kc_is_zero(b + g, ge - g)) {
                rc = kc_packed_flush(&p, b, a, pend, pend_end, page_size, st);
                if (rc)
                    goto out;
                pend = pend_end = ge;
            } else {
                if (nruns && runs_ret[2 * nruns - 2] + runs_ret[2 * nruns - 1] == ga) {
                    runs_ret[2 * nruns - 1] += ge - g;
                } else {
                    if (nruns == max_runs) {
                        rc = kc_packed_flush(&p, b, a, pend, pend_end, page_size, st);
                        if (!rc)
                            rc = -ENOSPC;
                        goto out;
                    }
                    runs_ret[2 * nruns] = ga;
                    runs_ret[2 * nruns + 1] = ge - g;
                    nruns++;
                }
                pend_end = ge;
            }
            g = ge;
        }
        rc = kc_packed_flush(&p, b, a, pend, pend_end, page_size, st);
        if (rc)
            goto out;
        done += n;
    }
    if (p.sparse && p.tail_hole && p.written && dst_off + p.written > p.o.old_size) {
        /* The last pages were holes: the file must still reach the end of what was placed. */
        struct stat sb;

        if (fstat(dst_fd, &sb) < 0 ||
            ((uint64_t)sb.st_size < dst_off + p.written &&
             ftruncate(dst_fd, (off_t)(dst_off + p.written)) < 0)) {
            st->fail_where = KC_FAIL_OUTPUT;
            st->fail_offset = dst_off + p.written;
            rc = -errno;
        }
    }
out:
    *nruns_ret = nruns;
    *written_ret = p.written;
    return rc;
}
