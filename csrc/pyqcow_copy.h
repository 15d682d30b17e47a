/*
 * pyqcow_copy.h - the C helper's interface.
 *
 * This file is read verbatim as the cffi cdef by build_native.py, so it holds
 * plain declarations only: no #include, no #define, no #ifdef.  Whoever
 * includes it from C must include <stdint.h> and <stddef.h> first.
 *
 * Conventions: every function returns 0 or a non-negative count on success and
 * -errno on failure.  The caller (pyqcow/fastcopy.py) has already checked every
 * argument: fds are open, offsets and lengths are non-negative and
 * offset + length fits in an int64_t, buffers are as large as stated.
 */

/*
 * Copy `length` bytes from src_fd at src_offset to dst_fd at dst_offset.
 * Uses copy_file_range(2) where the kernel allows, pread/pwrite otherwise.
 * Source bytes past its end of file are written as zeros.  The fds may name
 * the same file if the two ranges do not overlap.  Returns 0 or -errno.
 */
int pyqcow_copy_range(int src_fd, int64_t src_offset, int dst_fd,
                      int64_t dst_offset, int64_t length);

/*
 * Copy each run (src_offset, dst_offset, length) of the flat array `runs`
 * (3 * run_count values), in order.  With skip_zero != 0 the source is read
 * and destination chunks (4 KiB, aligned to destination offsets) whose data is
 * all zeros are not written.  Returns the number of bytes written, or -errno.
 */
int64_t pyqcow_copy_runs(int src_fd, int dst_fd, const int64_t *runs,
                         size_t run_count, int skip_zero);

/* 1 if all `length` bytes at buf are zero (also for length 0), else 0. */
int pyqcow_is_zero(const void *buf, size_t length);

/*
 * Split buf into maximal runs of blocks of `granularity` bytes (the last block
 * may be short) that are all zero or not.  Writes (offset, length, is_zero)
 * triples to out, which has room for out_capacity triples.  Returns the number
 * of triples, -EINVAL for granularity 0, -ENOSPC if out is too small.
 */
int64_t pyqcow_zero_runs(const void *buf, size_t length, size_t granularity,
                         int64_t *out, size_t out_capacity);

/*
 * mmap-backed guest reads of a read-only qcow2 image (standard 64-bit L2
 * entries, no external data file).  The C side maps the whole file read-only
 * and resolves guest offsets through a copy of the L1 table and the L2 tables
 * read from the mapping.  Anything it does not handle (compressed clusters,
 * malformed or out-of-file entries, unallocated ranges whose backing file is
 * not mapped) makes pyqcow_map_read return PYQCOW_MAP_FALLBACK (1) and the
 * caller reads the whole range in Python instead.
 *
 * pyqcow_map_open maps `file_size` bytes of fd and copies `l1` (l1_len
 * native-order entries).  version is the qcow2 header version (2 or 3).
 * Stores the handle in *out.  Returns 0 or -errno.
 */
int pyqcow_map_open(int fd, int64_t file_size, int cluster_bits, int version,
                    int64_t virtual_size, const uint64_t *l1, size_t l1_len,
                    void **out);

/*
 * Reads of unallocated ranges go to `backing` (a handle from pyqcow_map_open,
 * guest bytes past its virtual size read as zeros).  has_backing != 0 with
 * backing NULL: the image has a backing file that is not mapped, so such
 * reads fall back.  The caller keeps the backing handle open while `map` is.
 */
void pyqcow_map_set_backing(void *map, void *backing, int has_backing);

/*
 * Copy guest bytes [offset, offset + length) into dst.  Returns 0 when done,
 * 1 (fall back: dst may be partly written) or -errno; -EFAULT means a SIGBUS
 * hit the copy (the file shrank under the mapping).
 */
int pyqcow_map_read(void *map, char *dst, int64_t length, int64_t offset);

/* Unmap and free a handle from pyqcow_map_open (NULL: nothing). */
void pyqcow_map_close(void *map);

/* --- added by h-copy ---------------------------------------------------------
 * Start the write-back of fd's dirty pages in [offset, offset+length)
 * (sync_file_range SYNC_FILE_RANGE_WRITE: no wait, no durability). 0 or -errno. */
int pyqcow_start_writeback(int fd, int64_t offset, int64_t length);

/* Maximal runs of blocks where a and b (length bytes each) differ: blocks of
 * `block` bytes, the first one `first` bytes (0: `block`).  Writes (offset,
 * length) pairs to out (room for `capacity` pairs); returns the count, or
 * -ENOSPC, -EINVAL. */
int64_t pyqcow_diff_runs(const void *a, const void *b, size_t length, size_t first,
                         size_t block, int64_t *out, size_t capacity);

/* --- added by h-scale */
/*
 * Indices of the entries that are not all zero among `count` entries of `width`
 * 64-bit words each at buf (either byte order: only zero-ness is tested), from
 * entry `start` on, in order, written to out (room for out_capacity).  Returns
 * how many were written (out_capacity: there may be more after the last one),
 * -EINVAL for width 0.
 */
int64_t pyqcow_nonzero_entries(const void *buf, size_t count, size_t width, size_t start,
                               int64_t *out, size_t out_capacity);

/* --- added by h-convert */
int64_t pyqcow_copy_mapped_runs(int src_fd, const void *src_map, int64_t map_size,
                                int dst_fd, const int64_t *runs, size_t run_count);

/* --- added by h-xfs */
/*
 * pyqcow_diff_runs for buffers that may lie in file mappings: -EFAULT if a
 * SIGBUS hit the comparison (a file shrank under its mapping).  a_zero (room
 * for `capacity`): 1 for each run where a's bytes are all zero, else 0.
 */
int64_t pyqcow_diff_runs_mapped(const void *a, const void *b, size_t length, size_t first,
                                size_t block, int64_t *out, size_t capacity,
                                signed char *a_zero);

/* --- added by h-copier */
/*
 * fallocate(2) of [offset, offset + length) with `mode` (0: allocate, extending
 * the file size).  0 or -errno (-EOPNOTSUPP where the file system or the
 * platform cannot; never emulated by writing zeros, unlike posix_fallocate).
 */
int pyqcow_fallocate(int fd, int mode, int64_t offset, int64_t length);
