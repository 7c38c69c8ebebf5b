/*
 * malloccount.so: counts the heap allocations of a process tree, for bench.py.
 *
 * Loaded with LD_PRELOAD into a tunnel's processes. Every malloc, calloc, realloc, posix_memalign,
 * aligned_alloc and memalign adds one to a counter kept in a shared file, $NPBENCH_MALLOC_DIR/PID (8 bytes),
 * which bench.py reads before and after a measurement. Forked children without exec share their parent's
 * counter. A statically linked program (the Go original) ignores LD_PRELOAD: no file, no figure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static unsigned long unshared;
static unsigned long *counter = &unshared;

__attribute__((constructor)) static void open_counter(void) {
    const char *dir = getenv("NPBENCH_MALLOC_DIR");
    if (!dir) return;
    char path[4096];
    if (snprintf(path, sizeof path, "%s/%d", dir, (int)getpid()) >= (int)sizeof path) return;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return;
    if (ftruncate(fd, sizeof *counter) == 0) {
        void *shared = mmap(NULL, sizeof *counter, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (shared != MAP_FAILED) counter = shared;
    }
    close(fd);
}

#define COUNT() __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED)

void *malloc(size_t size) { COUNT(); return __libc_malloc(size); }
void *calloc(size_t count, size_t size) { COUNT(); return __libc_calloc(count, size); }
void *realloc(void *old, size_t size) { COUNT(); return __libc_realloc(old, size); }
void *aligned_alloc(size_t alignment, size_t size) { COUNT(); return __libc_memalign(alignment, size); }
void *memalign(size_t alignment, size_t size) { COUNT(); return __libc_memalign(alignment, size); }

int posix_memalign(void **out, size_t alignment, size_t size) {
    COUNT();
    if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0) return EINVAL;
    void *block = __libc_memalign(alignment, size);
    if (!block) return ENOMEM;
    *out = block;
    return 0;
}
