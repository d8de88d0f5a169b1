/*
 * Fault-safe copies out of memory-mapped sources: a SIGBUS/SIGSEGV guard
 * (sigsetjmp/siglongjmp) around the copy, so that a page that faults (a file
 * truncated under its mapping) is zero-filled and counted instead of killing
 * the process. The guard is per thread; the handler is installed once and
 * passes every fault that is not ours to the handler it replaced.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kcore_api.h"

struct kc_guard {
    sigjmp_buf env;
    const char *lo, *hi;              /* the source range being copied */
    volatile sig_atomic_t armed;
};

/*
 * The only mutable state: this thread's active guard, and the handlers ours
 * replaced (written under kc_lock, before ours is installed).
 */
static __thread struct kc_guard *kc_tls_guard;
static struct sigaction kc_old_bus, kc_old_segv;
static pthread_mutex_t kc_lock = PTHREAD_MUTEX_INITIALIZER;

/*
 * Not our fault: step aside. The replaced handler goes back in place, so the
 * faulting instruction, re-executed on return, reaches it exactly as if the
 * guard had never been there (the default action kills; faulthandler reports).
 * A signal sent with kill() is sent again. The next kc_copy_mem reinstalls us.
 */
static void kc_chain(int sig, siginfo_t *info)
{
    struct sigaction *old = sig == SIGBUS ? &kc_old_bus : &kc_old_segv;

    sigaction(sig, old, NULL);
    /*
     * Handed back: should that handler put ours back in its place (faulthandler
     * does, then raises again), the default action comes next, not a loop.
     */
    memset(old, 0, sizeof(*old));
    old->sa_handler = SIG_DFL;
    if (info->si_code <= 0)
        raise(sig);
}

static void kc_fault_handler(int sig, siginfo_t *info, void *ctx)
{
    struct kc_guard *g = kc_tls_guard;

    if (g && g->armed && info->si_code > 0 &&
        (const char *)info->si_addr >= g->lo && (const char *)info->si_addr < g->hi) {
        g->armed = 0;
        siglongjmp(g->env, 1);
    }
    (void)ctx;
    kc_chain(sig, info);
}

static int kc_is_ours(const struct sigaction *sa)
{
    return (sa->sa_flags & SA_SIGINFO) && sa->sa_sigaction == kc_fault_handler;
}

/*
 * Make ours the first handler of SIGBUS and SIGSEGV. Checked on every call: if
 * someone installed a handler over ours since (faulthandler.enable()), ours goes
 * back on top and passes them everything that is not its own fault.
 */
static int kc_install(void)
{
    static const int sigs[2] = {SIGBUS, SIGSEGV};
    struct sigaction *olds[2] = {&kc_old_bus, &kc_old_segv};
    struct sigaction sa, cur;
    int err = 0;

    if (sigaction(SIGBUS, NULL, &cur) == 0 && kc_is_ours(&cur) &&
        sigaction(SIGSEGV, NULL, &cur) == 0 && kc_is_ours(&cur))
        return 0;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = kc_fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    pthread_mutex_lock(&kc_lock);
    for (int i = 0; i < 2 && !err; i++) {
        if (sigaction(sigs[i], NULL, &cur) < 0) {
            err = errno;
        } else if (!kc_is_ours(&cur)) {
            *olds[i] = cur;
            if (sigaction(sigs[i], &sa, NULL) < 0)
                err = errno;
        }
    }
    pthread_mutex_unlock(&kc_lock);
    return -err;
}

static size_t kc_page_end(size_t p, size_t len, uint64_t base_off, size_t page_size)
{
    size_t pe = (size_t)(((base_off + p) | (page_size - 1)) + 1 - base_off);

    return pe > len ? len : pe;
}

/* Copy [from, len) page by page under the guard; return len, or the offset of the page that faulted. */
static __attribute__((noinline)) size_t
kc_guarded_copy(struct kc_guard *g, const char *s, char *d, size_t from, size_t len,
                uint64_t base_off, size_t page_size)
{
    volatile size_t pos = from;
    size_t p, pe;

    if (sigsetjmp(g->env, 1))
        return pos;             /* the guard disarmed itself */
    g->armed = 1;
    for (p = pos; p < len; p = pe) {
        pe = kc_page_end(p, len, base_off, page_size);
        pos = p;
        memcpy(d + p, s + p, pe - p);
    }
    g->armed = 0;
    return len;
}

int kc_copy_mem(const void *src, void *dst, size_t len, uint64_t base_off,
                size_t page_size, uint32_t flags, struct kc_stats *stats_ret)
{
    struct kc_stats *st = stats_ret;
    const char *s = src;
    char *d = dst;
    struct kc_guard g;
    struct kc_guard *prev;
    size_t pos = 0;
    int rc = 0;

    memset(st, 0, sizeof(*st));
    if (page_size < 512 || (page_size & (page_size - 1)))
        return -EINVAL;
    rc = kc_install();
    if (rc)
        return rc;
    g.lo = s;
    g.hi = s + len;
    g.armed = 0;
    prev = kc_tls_guard;
    kc_tls_guard = &g;
    while (pos < len) {
        size_t bad = kc_guarded_copy(&g, s, d, pos, len, base_off, page_size);
        size_t pe;

        st->bytes_read += bad - pos;
        if (bad == len)
            break;
        /* The page at bad faulted: zeros, counted. */
        pe = kc_page_end(bad, len, base_off, page_size);
        if (!st->first_errno) {
            st->first_errno = EFAULT;
            st->first_error_offset = base_off + bad;
        }
        if (flags & KC_STRICT) {
            st->fail_where = KC_FAIL_FAULT;
            st->fail_offset = base_off + bad;
            rc = -EFAULT;
            break;
        }
        memset(d + bad, 0, pe - bad);
        st->pages_zero_filled++;
        pos = pe;
    }
    kc_tls_guard = prev;
    return rc;
}
