/*
 * memcpy-window.c: counts, per call site, the large copies that fall in the slow case of
 * glibc's memcpy on AMD Zen (destination 1 to 31 bytes past the source, modulo 4 KiB: about
 * 2 GB/s instead of 40; see docs/architecture.md, "Where the relay's bytes sit in its buffer").
 * A diagnostic for whoever changes a copy path; not built by CI.
 *
 *   gcc -O2 -shared -fPIC scripts/memcpy-window.c -o /tmp/memcpy-window.so -ldl -lpthread
 *   LD_PRELOAD=/tmp/memcpy-window.so target/release/forward ...   # run a transfer through it
 *   cat /tmp/memcpy-window.PID    # every 2 s and at exit: offset  binary  slow N (MB)  fast N (MB)
 *   addr2line -f -C -i -e target/release/forward OFFSET            # which copy that is
 *
 * Only copies of 2 KiB and more are counted: below that glibc uses its vector loop, which has
 * no such case.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define SITES 64
static struct {
    uintptr_t ra;
    unsigned long slow, fast, slow_bytes, fast_bytes;
} sites[SITES];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *(*real_memcpy)(void *, const void *, size_t);
static void *(*real_memmove)(void *, const void *, size_t);

static void count(uintptr_t ra, void *dst, const void *src, size_t n) {
    if (n < 2048)
        return;
    size_t d = ((uintptr_t)dst - (uintptr_t)src) & 4095;
    int slow = d >= 1 && d <= 31;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < SITES; i++) {
        if (sites[i].ra != ra && sites[i].ra != 0)
            continue;
        sites[i].ra = ra;
        if (slow) {
            sites[i].slow++;
            sites[i].slow_bytes += n;
        } else {
            sites[i].fast++;
            sites[i].fast_bytes += n;
        }
        break;
    }
    pthread_mutex_unlock(&lock);
}

static void dump(void) {
    char path[64];
    snprintf(path, sizeof path, "/tmp/memcpy-window.%d", getpid());
    FILE *f = fopen(path, "w");
    if (!f)
        return;
    for (int i = 0; i < SITES && sites[i].ra; i++) {
        Dl_info info = {0};
        uintptr_t off = sites[i].ra;
        if (dladdr((void *)off, &info) && info.dli_fbase)
            off -= (uintptr_t)info.dli_fbase;
        fprintf(f, "%#lx %s slow %lu (%lu MB) fast %lu (%lu MB)\n", (unsigned long)off,
                info.dli_fname ? info.dli_fname : "?", sites[i].slow, sites[i].slow_bytes >> 20,
                sites[i].fast, sites[i].fast_bytes >> 20);
    }
    fclose(f);
}

static void *dumper(void *unused) {
    (void)unused;
    for (;;) {
        sleep(2);
        dump();
    }
    return 0;
}

/* Until dlsym has answered (it may copy too). */
static void *bytewise(void *dst, const void *src, size_t n) {
    char *d = dst;
    const char *s = src;
    if (d < s)
        for (size_t i = 0; i < n; i++)
            d[i] = s[i];
    else
        for (size_t i = n; i > 0; i--)
            d[i - 1] = s[i - 1];
    return dst;
}

__attribute__((destructor)) static void fini(void) { dump(); }

__attribute__((constructor)) static void init(void) {
    real_memcpy = dlsym(RTLD_NEXT, "memcpy");
    real_memmove = dlsym(RTLD_NEXT, "memmove");
    pthread_t t;
    pthread_create(&t, 0, dumper, 0);
}

void *memcpy(void *dst, const void *src, size_t n) {
    if (!real_memcpy)
        return bytewise(dst, src, n);
    count((uintptr_t)__builtin_return_address(0), dst, src, n);
    return real_memcpy(dst, src, n);
}

void *memmove(void *dst, const void *src, size_t n) {
    if (!real_memmove)
        return bytewise(dst, src, n);
    count((uintptr_t)__builtin_return_address(0), dst, src, n);
    return real_memmove(dst, src, n);
}
