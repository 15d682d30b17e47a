/*
 * pyqcow_copy.c - bulk byte moving for pyqcow: range copies between file
 * descriptors and zero detection.  No Python.h: every function returns 0 or a
 * non-negative count on success, -errno on failure.  Arguments have been
 * checked by pyqcow/fastcopy.py before any call.
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

#include "pyqcow_copy.h"

#define COPY_BUFFER_SIZE ((size_t)1 << 20) /* pread/pwrite buffer */
#define ZERO_CHUNK_SIZE ((size_t)4096)     /* skip_zero granularity */
#define MAX_CFR_SIZE ((size_t)1 << 30)     /* one copy_file_range request */

/* State shared by the runs of one call. */
struct copier {
    char *buffer;         /* COPY_BUFFER_SIZE bytes, allocated on first use */
    int no_cfr;           /* copy_file_range refused: use pread/pwrite */
    int64_t written;      /* bytes written to the destination so far */
};

/* Read up to len bytes; fewer only at end of file.  Returns bytes or -errno. */
static int64_t pread_full(int fd, char *buf, size_t len, int64_t offset)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(offset + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    return (int64_t)done;
}

/* Write all len bytes.  Returns 0 or -errno. */
static int pwrite_full(int fd, const char *buf, size_t len, int64_t offset)
{
    while (len > 0) {
        ssize_t n = pwrite(fd, buf, len, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        buf += n;
        len -= (size_t)n;
        offset += n;
    }
    return 0;
}

/* Fill c->buffer with len source bytes, zeros past the source's end of file.
 * Returns the number of bytes that came from the file, or -errno. */
static int64_t fill_buffer(struct copier *c, int fd, size_t len, int64_t offset)
{
    int64_t got;

    if (c->buffer == NULL) {
        c->buffer = malloc(COPY_BUFFER_SIZE);
        if (c->buffer == NULL)
            return -ENOMEM;
    }
    got = pread_full(fd, c->buffer, len, offset);
    if (got >= 0 && (size_t)got < len)
        memset(c->buffer + got, 0, len - (size_t)got);
    return got;
}

/* Errors after which copy_file_range is given up for pread/pwrite. */
static int cfr_unsupported(int err)
{
    return err == EXDEV || err == EINVAL || err == ENOSYS || err == EOPNOTSUPP;
}

/* One copy_file_range call: bytes copied (0 at end of file) or -errno. */
static int64_t try_copy_file_range(int src_fd, int64_t src_offset, int dst_fd,
                                   int64_t dst_offset, size_t len)
{
#ifdef __linux__
    off_t in = (off_t)src_offset, out = (off_t)dst_offset;
    ssize_t n = copy_file_range(src_fd, &in, dst_fd, &out, len, 0);
    return n < 0 ? -errno : (int64_t)n;
#else
    (void)src_fd; (void)src_offset; (void)dst_fd; (void)dst_offset; (void)len;
    return -ENOSYS;
#endif
}

/* pread/pwrite copy of every byte (zeros past the source's end). */
static int copy_plain(struct copier *c, int src_fd, int64_t src_offset,
                      int dst_fd, int64_t dst_offset, int64_t length)
{
    while (length > 0) {
        size_t n = (uint64_t)length < COPY_BUFFER_SIZE ? (size_t)length
                                                        : COPY_BUFFER_SIZE;
        int64_t got = fill_buffer(c, src_fd, n, src_offset);
        int rc;

        if (got < 0)
            return (int)got;
        rc = pwrite_full(dst_fd, c->buffer, n, dst_offset);
        if (rc < 0)
            return rc;
        c->written += (int64_t)n;
        src_offset += (int64_t)n;
        dst_offset += (int64_t)n;
        length -= (int64_t)n;
    }
    return 0;
}

/* pread/pwrite copy that leaves out destination chunks of zeros.  Chunks are
 * aligned to destination offsets, so skipped chunks are whole file blocks. */
static int copy_sparse(struct copier *c, int src_fd, int64_t src_offset,
                       int dst_fd, int64_t dst_offset, int64_t length)
{
    while (length > 0) {
        /* After the first buffer, buffers start on a chunk boundary. */
        size_t n = COPY_BUFFER_SIZE - (size_t)dst_offset % ZERO_CHUNK_SIZE;
        size_t pos = 0, data_start = 0;
        int in_data = 0;
        int64_t got;

        if ((uint64_t)length < n)
            n = (size_t)length;
        got = fill_buffer(c, src_fd, n, src_offset);
        if (got < 0)
            return (int)got;

        while (pos < n) {
            size_t chunk = ZERO_CHUNK_SIZE -
                           (size_t)(dst_offset + (int64_t)pos) % ZERO_CHUNK_SIZE;
            int zero;

            if (chunk > n - pos)
                chunk = n - pos;
            zero = pyqcow_is_zero(c->buffer + pos, chunk);
            if (!zero && !in_data) {
                data_start = pos;
                in_data = 1;
            }
            pos += chunk;
            if (in_data && (zero || pos == n)) {
                size_t end = zero ? pos - chunk : pos;
                int rc = pwrite_full(dst_fd, c->buffer + data_start,
                                     end - data_start,
                                     dst_offset + (int64_t)data_start);
                if (rc < 0)
                    return rc;
                c->written += (int64_t)(end - data_start);
                in_data = 0;
            }
        }
        if ((size_t)got < n)
            return 0; /* the rest of the run lies past the source's end: zeros */
        src_offset += (int64_t)n;
        dst_offset += (int64_t)n;
        length -= (int64_t)n;
    }
    return 0;
}

/*
 * copy_file_range while it works: advances *src_offset, *dst_offset and
 * *length past what it copied (c->written counts it), and stops early at the
 * source's end (0), or for good (c->no_cfr) where the kernel or the file
 * system refuses it.  0 or -errno; the caller copies what is left its own way.
 */
static int copy_file_range_part(struct copier *c, int src_fd, int64_t *src_offset,
                                int dst_fd, int64_t *dst_offset, int64_t *length)
{
    while (*length > 0 && !c->no_cfr) {
        size_t n = (uint64_t)*length < MAX_CFR_SIZE ? (size_t)*length : MAX_CFR_SIZE;
        int64_t done = try_copy_file_range(src_fd, *src_offset, dst_fd, *dst_offset, n);
        if (done == -EINTR)
            continue;
        if (done < 0 && cfr_unsupported((int)-done)) {
            c->no_cfr = 1;
            break;
        }
        if (done < 0)
            return (int)done;
        /* 0 is end of file, or a file system that cannot tell (procfs, some
         * FUSE): the caller's reads decide, and write zeros past the end. */
        if (done == 0)
            break;
        c->written += done;
        *src_offset += done;
        *dst_offset += done;
        *length -= done;
    }
    return 0;
}

/* Copy one run: copy_file_range while it works, then pread/pwrite. */
static int copy_run(struct copier *c, int src_fd, int64_t src_offset,
                    int dst_fd, int64_t dst_offset, int64_t length,
                    int skip_zero)
{
    int rc;

    if (skip_zero)
        return copy_sparse(c, src_fd, src_offset, dst_fd, dst_offset, length);
    rc = copy_file_range_part(c, src_fd, &src_offset, dst_fd, &dst_offset, &length);
    if (rc < 0)
        return rc;
    return copy_plain(c, src_fd, src_offset, dst_fd, dst_offset, length);
}

int pyqcow_copy_range(int src_fd, int64_t src_offset, int dst_fd,
                      int64_t dst_offset, int64_t length)
{
    int64_t runs[3] = {src_offset, dst_offset, length};
    int64_t rc = pyqcow_copy_runs(src_fd, dst_fd, runs, 1, 0);

    return rc < 0 ? (int)rc : 0;
}

int64_t pyqcow_copy_runs(int src_fd, int dst_fd, const int64_t *runs,
                         size_t run_count, int skip_zero)
{
    struct copier c = {NULL, 0, 0};
    int rc = 0;

    for (size_t i = 0; i < run_count && rc == 0; i++)
        rc = copy_run(&c, src_fd, runs[3 * i], dst_fd, runs[3 * i + 1],
                      runs[3 * i + 2], skip_zero);
    free(c.buffer);
    return rc < 0 ? rc : c.written;
}

int pyqcow_is_zero(const void *buf, size_t length)
{
    const unsigned char *p = buf;
    size_t head = length < 16 ? length : 16;

    for (size_t i = 0; i < head; i++)
        if (p[i] != 0)
            return 0;
    /* The first 16 bytes are zero; the rest is zero iff every byte equals the
     * one 16 bytes before it, which memcmp checks at full speed. */
    return length <= 16 || memcmp(p, p + 16, length - 16) == 0;
}

int64_t pyqcow_zero_runs(const void *buf, size_t length, size_t granularity,
                         int64_t *out, size_t out_capacity)
{
    const unsigned char *p = buf;
    size_t count = 0;

    if (granularity == 0)
        return -EINVAL;
    for (size_t offset = 0; offset < length; offset += granularity) {
        size_t n = length - offset < granularity ? length - offset : granularity;
        int zero = pyqcow_is_zero(p + offset, n);

        if (count > 0 && out[3 * (count - 1) + 2] == zero) {
            out[3 * (count - 1) + 1] += (int64_t)n;
            continue;
        }
        if (count == out_capacity)
            return -ENOSPC;
        out[3 * count] = (int64_t)offset;
        out[3 * count + 1] = (int64_t)n;
        out[3 * count + 2] = zero;
        count++;
    }
    return (int64_t)count;
}

/* ------------------------------------------------------------------------
 * mmap-backed guest reads (pyqcow_map_*)
 * ---------------------------------------------------------------------- */

#define L1E_OFFSET_MASK UINT64_C(0x00FFFFFFFFFFFE00)
#define L2E_OFFSET_MASK UINT64_C(0x00FFFFFFFFFFFE00)
#define L2E_RESERVED_MASK UINT64_C(0x3F000000000001FE)
#define OFLAG_COMPRESSED (UINT64_C(1) << 62)
#define OFLAG_ZERO UINT64_C(1)
#define MAP_FALLBACK 1

struct guest_map {
    const unsigned char *base; /* the whole file, PROT_READ */
    uint64_t map_size;         /* bytes mapped (the file size at open) */
    int cluster_bits;
    int l2_bits;
    int version;
    uint64_t virtual_size;
    uint64_t *l1;
    size_t l1_len;
    uint64_t error_mask;       /* reserved bits and unaligned offset bits */
    struct guest_map *backing;
    int has_backing;
};

/* SIGBUS guard: a fault inside a guarded copy jumps back to its caller. */
static __thread sigjmp_buf *guard_jump;
static __thread volatile sig_atomic_t guard_active;

/*
 * Arm the guard in the calling function's own frame (sigsetjmp must be, so this
 * is a macro): a SIGBUS inside returns -EFAULT from that function.  `jump` is
 * its local sigjmp_buf; savemask 0: no system call (SA_NODEFER keeps SIGBUS
 * unblocked).  Disarm with guard_active = 0 before returning.
 */
#define GUARD_ENTER(jump)                \
    do {                                 \
        if (sigsetjmp((jump), 0)) {      \
            guard_active = 0;            \
            return -EFAULT;              \
        }                                \
        guard_jump = &(jump);            \
        guard_active = 1;                \
    } while (0)
static struct sigaction previous_bus_action;

static void bus_handler(int sig, siginfo_t *info, void *context)
{
    if (guard_active) {
        guard_active = 0;
        siglongjmp(*guard_jump, 1);
    }
    /* Not ours: put the previous disposition back; returning re-runs the
     * faulting instruction, which then gets the previous treatment. */
    (void)sig;
    (void)info;
    (void)context;
    sigaction(SIGBUS, &previous_bus_action, NULL);
}

static int install_bus_handler(void)
{
    struct sigaction current, action;

    if (sigaction(SIGBUS, NULL, &current) < 0)
        return -errno;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == bus_handler)
        return 0;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = bus_handler;
    /* SA_NODEFER: SIGBUS stays unblocked after the long jump. */
    action.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    previous_bus_action = current;
    if (sigaction(SIGBUS, &action, NULL) < 0)
        return -errno;
    return 0;
}

static inline uint64_t load_be64(const unsigned char *p)
{
    uint64_t v;

    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

int pyqcow_map_open(int fd, int64_t file_size, int cluster_bits, int version,
                    int64_t virtual_size, const uint64_t *l1, size_t l1_len,
                    void **out)
{
    struct guest_map *m;
    void *base;
    int rc;

    if (cluster_bits < 9 || cluster_bits > 21 || file_size <= 0)
        return -EINVAL;
    rc = install_bus_handler();
    if (rc < 0)
        return rc;
    m = calloc(1, sizeof(*m));
    if (m == NULL)
        return -ENOMEM;
    m->l1 = malloc(l1_len ? l1_len * sizeof(uint64_t) : 1);
    if (m->l1 == NULL) {
        free(m);
        return -ENOMEM;
    }
    if (l1_len)
        memcpy(m->l1, l1, l1_len * sizeof(uint64_t));
    base = mmap(NULL, (size_t)file_size, PROT_READ, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = -errno;
        free(m->l1);
        free(m);
        return rc;
    }
    m->base = base;
    m->map_size = (uint64_t)file_size;
    m->cluster_bits = cluster_bits;
    m->l2_bits = cluster_bits - 3;
    m->version = version;
    m->virtual_size = (uint64_t)virtual_size;
    m->l1_len = l1_len;
    m->error_mask = (L2E_RESERVED_MASK & ~UINT64_C(1)) |
                    (L2E_OFFSET_MASK & ((UINT64_C(1) << cluster_bits) - 1));
    *out = m;
    return 0;
}

void pyqcow_map_set_backing(void *map, void *backing, int has_backing)
{
    struct guest_map *m = map;

    m->backing = backing;
    m->has_backing = has_backing || backing != NULL;
}

void pyqcow_map_close(void *map)
{
    struct guest_map *m = map;

    if (m == NULL)
        return;
    munmap((void *)m->base, (size_t)m->map_size);
    free(m->l1);
    free(m);
}

static int map_read(const struct guest_map *m, unsigned char *dst,
                    uint64_t length, uint64_t offset);

/* Unallocated guest range: the backing file's bytes, or zeros. */
static int read_unallocated(const struct guest_map *m, unsigned char *dst,
                            uint64_t length, uint64_t offset)
{
    const struct guest_map *b = m->backing;
    uint64_t inside = 0;
    int rc;

    if (m->has_backing) {
        if (b == NULL)
            return MAP_FALLBACK;
        if (offset < b->virtual_size)
            inside = b->virtual_size - offset < length ? b->virtual_size - offset : length;
        if (inside) {
            rc = map_read(b, dst, inside, offset);
            if (rc)
                return rc;
        }
    }
    memset(dst + inside, 0, length - inside);
    return 0;
}

static int map_read(const struct guest_map *m, unsigned char *dst,
                    uint64_t length, uint64_t offset)
{
    const int cb = m->cluster_bits;
    const uint64_t cs = UINT64_C(1) << cb;
    const uint64_t cmask = cs - 1;
    const int l2_shift = cb + m->l2_bits;
    const uint64_t l2_mask = (UINT64_C(1) << m->l2_bits) - 1;
    const uint64_t end = offset + length;
    uint64_t pos = offset;
    int rc;

    if (length > m->virtual_size || offset > m->virtual_size - length)
        return MAP_FALLBACK;
    while (pos < end) {
        uint64_t l1_index = pos >> l2_shift;
        uint64_t span_end = (l1_index + 1) << l2_shift;
        uint64_t l2_offset = l1_index < m->l1_len ? m->l1[l1_index] & L1E_OFFSET_MASK : 0;

        if (span_end > end)
            span_end = end;
        if (l2_offset == 0) {
            rc = read_unallocated(m, dst + (pos - offset), span_end - pos, pos);
            if (rc)
                return rc;
            pos = span_end;
            continue;
        }
        if ((l2_offset & cmask) || l2_offset > m->map_size - cs || m->map_size < cs)
            return MAP_FALLBACK;
        while (pos < span_end) {
            uint64_t cl_end = (pos | cmask) + 1;
            uint64_t e = load_be64(m->base + l2_offset + 8 * ((pos >> cb) & l2_mask));
            uint64_t host = e & L2E_OFFSET_MASK;
            uint64_t n;
            unsigned char *d = dst + (pos - offset);

            if (cl_end > span_end)
                cl_end = span_end;
            n = cl_end - pos;
            if ((e & OFLAG_COMPRESSED) || (e & m->error_mask))
                return MAP_FALLBACK;
            if (e & OFLAG_ZERO) {
                if (m->version < 3)
                    return MAP_FALLBACK;
                if (host && host > m->map_size - cs)
                    return MAP_FALLBACK;
                memset(d, 0, n);
            } else if (host) {
                if (m->map_size < cs || host > m->map_size - cs)
                    return MAP_FALLBACK;
                memcpy(d, m->base + host + (pos & cmask), n);
            } else {
                rc = read_unallocated(m, d, n, pos);
                if (rc)
                    return rc;
            }
            pos = cl_end;
        }
    }
    return 0;
}

int pyqcow_map_read(void *map, char *dst, int64_t length, int64_t offset)
{
    sigjmp_buf jump;
    volatile int rc;

    if (length < 0 || offset < 0)
        return -EINVAL;
    GUARD_ENTER(jump);
    rc = map_read(map, (unsigned char *)dst, (uint64_t)length, (uint64_t)offset);
    guard_active = 0;
    return rc;
}

/* --- added by h-copy: write-back start and buffer comparison ------------- */
#include <fcntl.h>

int pyqcow_start_writeback(int fd, int64_t offset, int64_t length)
{
    if (sync_file_range(fd, (off64_t)offset, (off64_t)length, SYNC_FILE_RANGE_WRITE) < 0)
        return -errno;
    return 0;
}

int64_t pyqcow_diff_runs(const void *a, const void *b, size_t length, size_t first,
                         size_t block, int64_t *out, size_t capacity)
{
    const unsigned char *pa = a, *pb = b;
    size_t pos = 0, count = 0;
    int64_t start = -1;
    if (block == 0)
        return -EINVAL;
    while (pos < length) {
        size_t n = pos == 0 && first ? first : block;
        if (n > length - pos)
            n = length - pos;
        int differ = memcmp(pa + pos, pb + pos, n) != 0;
        if (differ && start < 0)
            start = (int64_t)pos;
        if (!differ && start >= 0) {
            if (count == capacity)
                return -ENOSPC;
            out[2 * count] = start;
            out[2 * count + 1] = (int64_t)pos - start;
            count++;
            start = -1;
        }
        pos += n;
    }
    if (start >= 0) {
        if (count == capacity)
            return -ENOSPC;
        out[2 * count] = start;
        out[2 * count + 1] = (int64_t)length - start;
        count++;
    }
    return (int64_t)count;
}

/* --- added by h-scale */
/*
 * Nonzero entries of a metadata table (L1, L2, refcount table): the scans that
 * skip a sparse image's empty entries in bulk instead of one Python int each.
 */
int64_t pyqcow_nonzero_entries(const void *buf, size_t count, size_t width, size_t start,
                               int64_t *out, size_t out_capacity)
{
    const unsigned char *p = (const unsigned char *)buf;
    size_t n = 0, i = start, w;
    uint64_t word, acc;

    if (width == 0)
        return -EINVAL;
    while (i < count && n < out_capacity) {
        /* eight entries at a time while they are all zero */
        if (width == 1 && (i & 7) == 0 && i + 8 <= count) {
            acc = 0;
            for (w = 0; w < 8; w++) {
                memcpy(&word, p + (i + w) * 8, 8);
                acc |= word;
            }
            if (!acc) {
                i += 8;
                continue;
            }
        }
        acc = 0;
        for (w = 0; w < width; w++) {
            memcpy(&word, p + (i * width + w) * 8, 8);
            acc |= word;
        }
        if (acc)
            out[n++] = (int64_t)i;
        i++;
    }
    return (int64_t)n;
}

/* --- added by h-convert */
/*
 * Copy runs of a mapped source file, leaving out the ZERO_CHUNK_SIZE blocks
 * (aligned to destination offsets) that are all zeros: the zero scan reads the
 * page cache in place through the read-only mapping src_map (map_size bytes of
 * src_fd), and the data goes file to file (copy_file_range: one in-kernel copy
 * on ext4, shared extents on a reflink file system), or is written from the
 * mapping where copy_file_range is refused.  runs: (source offset, destination
 * offset, length) triples, each inside the mapping.  The destination must read
 * as zeros where nothing is written.  A fault on the mapping (the file shrank)
 * returns -EFAULT.  Returns the bytes written or -errno.
 */
static int copy_mapped_data(struct copier *c, int src_fd, const unsigned char *src_map,
                            int64_t src_offset, int dst_fd, int64_t dst_offset,
                            int64_t length)
{
    int rc = copy_file_range_part(c, src_fd, &src_offset, dst_fd, &dst_offset, &length);

    if (rc < 0)
        return rc;
    if (length > 0) {
        rc = pwrite_full(dst_fd, (const char *)src_map + src_offset, (size_t)length,
                         dst_offset);
        if (rc < 0)
            return rc;
        c->written += length;
    }
    return 0;
}

static int copy_mapped_run(struct copier *c, int src_fd, const unsigned char *src_map,
                           int64_t src_offset, int dst_fd, int64_t dst_offset,
                           int64_t length)
{
    int64_t pos = 0, start = -1;

    while (pos < length) {
        int64_t chunk = (int64_t)ZERO_CHUNK_SIZE -
                        (dst_offset + pos) % (int64_t)ZERO_CHUNK_SIZE;
        int zero;

        if (chunk > length - pos)
            chunk = length - pos;
        zero = pyqcow_is_zero(src_map + src_offset + pos, (size_t)chunk);
        if (!zero && start < 0)
            start = pos;
        if (zero && start >= 0) {
            int rc = copy_mapped_data(c, src_fd, src_map, src_offset + start, dst_fd,
                                      dst_offset + start, pos - start);
            if (rc < 0)
                return rc;
            start = -1;
        }
        pos += chunk;
    }
    if (start >= 0)
        return copy_mapped_data(c, src_fd, src_map, src_offset + start, dst_fd,
                                dst_offset + start, length - start);
    return 0;
}

int64_t pyqcow_copy_mapped_runs(int src_fd, const void *src_map, int64_t map_size,
                                int dst_fd, const int64_t *runs, size_t run_count)
{
    struct copier c = {NULL, 0, 0};
    sigjmp_buf jump;
    volatile int rc;
    volatile size_t i;

    for (i = 0; i < run_count; i++)
        if (runs[3 * i] < 0 || runs[3 * i + 1] < 0 || runs[3 * i + 2] < 0 ||
            runs[3 * i] + runs[3 * i + 2] > map_size)
            return -EINVAL;
    rc = install_bus_handler();
    if (rc < 0)
        return rc;
    GUARD_ENTER(jump);
    rc = 0;
    for (i = 0; i < run_count && rc == 0; i++)
        rc = copy_mapped_run(&c, src_fd, (const unsigned char *)src_map, runs[3 * i],
                             dst_fd, runs[3 * i + 1], runs[3 * i + 2]);
    guard_active = 0;
    return rc < 0 ? rc : c.written;
}

/* --- added by h-xfs */
/*
 * pyqcow_diff_runs over memory that may lie in file mappings (a safe rebase
 * compares the two chains in place): a SIGBUS (a file shrank under its
 * mapping) returns -EFAULT instead of killing the process.  a_zero (room for
 * `capacity`): for each run, 1 if a's bytes there are all zero.
 */
int64_t pyqcow_diff_runs_mapped(const void *a, const void *b, size_t length, size_t first,
                                size_t block, int64_t *out, size_t capacity,
                                signed char *a_zero)
{
    sigjmp_buf jump;
    volatile int64_t count;
    int rc = install_bus_handler();

    if (rc < 0)
        return rc;
    GUARD_ENTER(jump);
    count = pyqcow_diff_runs(a, b, length, first, block, out, capacity);
    for (int64_t i = 0; i < count; i++)
        a_zero[i] = (signed char)pyqcow_is_zero((const unsigned char *)a + out[2 * i],
                                                (size_t)out[2 * i + 1]);
    guard_active = 0;
    return count;
}

/* --- added by h-copier: space reservation before O_DIRECT copies ---------- */
int pyqcow_fallocate(int fd, int mode, int64_t offset, int64_t length)
{
#ifdef __linux__
    if (fallocate(fd, mode, (off_t)offset, (off_t)length) < 0)
        return -errno;
    return 0;
#else
    (void)fd; (void)mode; (void)offset; (void)length;
    return -EOPNOTSUPP;
#endif
}
