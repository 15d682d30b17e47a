"""The write state of one open QcowImage: allocation, the metadata door, the flush.

A ``Writer`` is composed into every QcowImage (``img.writer``); the image's
write methods delegate to it.  Guest writes (pyqcow/guestwrite.py) and the
layer reshaping operations (pyqcow/reshape.py) work through it.

Durable-write order (DESIGN.md section 4), enforced only in ``Writer.flush()``:
  1. data clusters (written immediately with pwrite) and
  2. refcount blocks (increments only) -> one fsync (no order between 1 and 2:
     either alone on disk is at worst a leak)
  3. refcount table; if it moved: header switch -> fsync
  4. L2 tables -> fsync
  5. L1 table; if it moved: header switch -> fsync
  6. other header fields -> fsync
  7. deferred decrements (freed clusters) -> refcount blocks -> fsync
Metadata is kept dirty in memory between flushes, so a crash before a flush
leaves the on-disk image exactly as after the previous flush (plus leaked or
unreferenced data clusters, never a dangling reference).  The table caches
(pyqcow/cache.py) never write by themselves: a cache over its bound is
flushed here, at a safe point (the end of a guest write, the start of a
prepare_write, the filling of the last prepared range), never while a range
handed out by ``prepare_write`` is still unfilled.
"""

from __future__ import annotations

from array import array

from . import entries, guestwrite, reshape, spec
from .cache import L2_CACHE_TABLES, MAX_DIRTY_L2  # noqa: F401 (the L2 cache's sizes)
from .errors import FormatError, OperationError, UnsupportedFeatureError
from .header import build_cluster0
from .hostfile import check_range

# (the refcount block cache's sizes: pyqcow.refcount.CACHE_BLOCKS, MAX_DIRTY_BLOCKS)
#: Kept for pyqcow.create (metadata preallocation); entries.data_entry says it.
COPIED = entries.COPIED_BIT


class PreparedWrite(list):
    """What ``prepare_write`` returns: the ``(guest_offset, host_offset, length)``
    runs (a list, as before) that the caller must fill with data.

    Until ``filled()`` is called the writer does not flush by itself (so no L2
    entry pointing at an unfilled cluster can reach the disk); a caller need not
    know any batch size or table count.  Older callers that never call
    ``filled()`` keep their contract: they fill, then call ``flush()`` (an
    explicit flush publishes everything and settles every handle).
    """

    __slots__ = ("_epoch", "_writer")

    def __init__(self, writer, runs=()) -> None:
        super().__init__(runs)
        self._writer = writer
        self._epoch = writer.epoch
        writer.unfilled += 1

    @property
    def pending(self) -> bool:
        return self._writer is not None

    def filled(self) -> None:
        """Every run has its data (written with pwrite or copied): the mapping
        may be published by the next flush.  Flushes now if the caches ask for it
        and nothing else is unfilled."""
        w, self._writer = self._writer, None
        if w is None:
            return
        w.data_written = True  # the next flush makes the data durable before the mapping
        if w.epoch != self._epoch:
            return
        w.unfilled -= 1
        w.flush_if_needed()


class Writer:
    """Write state and write operations of one image (``img.writer``)."""

    def __init__(self, img) -> None:
        self.img = img
        #: the image's L2 table cache (pyqcow.cache.TableCache), shared with the read path
        self.l2_cache = img.l2_cache
        self.refcounts = None
        self.l1_dirty = False
        self.l1_moved_from: tuple[int, int] | None = None
        self.header_dirty = False
        self.write_started = False
        self.data_written = False
        self.bitmaps: list | None = None  # pyqcow.bitmaps.Bitmap, loaded on the first write
        # compressed-cluster packing: next free byte (sector aligned) in the
        # host clusters last allocated for compressed data, and their end
        self.cpos = 0
        self.cend = 0
        # prepare_write handles not yet filled, counted per flush epoch
        self.unfilled = 0
        self.epoch = 0
        # prepare_writes(relocate=True) moved private clusters: their old clusters
        # are punched once freed (step 7 of flush)
        self.relocated = False
        if img.writable:
            from .refcount import Refcounts

            self.refcounts = Refcounts(img)

    def check_writable(self) -> None:
        img = self.img
        if not img.writable:
            raise OperationError(img.path, "image is open read-only")
        if img._closed:
            raise OperationError(img.path, "image is closed")

    # ------------------------------------------------------------------ first write
    def begin_write(self) -> None:
        """Before the first change: load the persistent bitmaps and mark them in use
        on disk (so a crash invalidates them instead of leaving them wrong), and
        drop the autoclear bits we do not maintain."""
        if self.write_started:
            return
        self.write_started = True
        img = self.img
        keep = spec.Autoclear.DATA_FILE_RAW
        h = img.header
        if h.version == 3 and h.autoclear_features & spec.Autoclear.BITMAPS:
            from .bitmaps import load_bitmaps

            try:
                self.bitmaps = load_bitmaps(img)
            except FormatError:
                self.bitmaps = None  # unreadable directory: flagged in use (below) or dropped
            if self.mark_bitmaps_in_use():
                keep |= spec.Autoclear.BITMAPS
            else:
                self.bitmaps = None
        if h.version == 3 and h.autoclear_features & ~keep:
            img.header = h.replace(autoclear_features=h.autoclear_features & keep)
            self.write_header()
            img.hf.fsync()

    def mark_dirty(self, offset: int, length: int) -> None:
        """Guest bytes [offset, offset+length) may change: set their bits in every
        enabled persistent bitmap (before the data changes)."""
        for b in self.bitmaps or ():
            if b.enabled:
                b.set_range(offset, length)

    def list_bitmaps(self) -> list:
        """The persistent bitmaps as they are in memory once the image was written;
        read from the file otherwise."""
        if self.bitmaps is not None:
            return list(self.bitmaps)
        from .bitmaps import load_bitmaps

        return load_bitmaps(self.img) or []

    def store_bitmaps(self) -> None:
        """On a clean close: store the updated bitmaps, in_use cleared (copy-then-switch)."""
        if not self.bitmaps or self.refcounts is None or not self.img.writable:
            return
        from .bitmaps import store_bitmaps

        store_bitmaps(self.img, self.bitmaps)
        self.bitmaps = None

    def mark_bitmaps_in_use(self) -> bool:
        """Persistent bitmaps: flag every one "in use" before the first change.

        Their stored contents go stale with our first change; a clean close
        stores them again with the flag cleared (``store_bitmaps``).  QEMU
        marks a bitmap in use (BME_FLAG_IN_USE) while it has the image open
        read-write and treats an in-use bitmap found on open as inconsistent: it
        is never used for incremental backups again, only removed.  Setting the
        flag (an in-place write of the flags fields, then fsync, before any data)
        invalidates the bitmaps exactly as a QEMU crash would, while the bitmap
        directory, tables and data clusters stay referenced, so ``qemu-img
        check`` stays clean (clearing the autoclear bit instead would make qemu
        ignore the extension and report all its clusters as leaked).  False if
        the directory cannot be read: then the autoclear bit is cleared.
        """
        from . import layout
        from .bitmaps import BME_FLAG_IN_USE

        img = self.img
        ext = img.header.bitmaps
        if ext is None:
            return False
        size, offset = ext.bitmap_directory_size, ext.bitmap_directory_offset
        if not 0 < size <= 1024 * 65535 or offset % img.cluster_size or (
            offset + size > img.file_size
        ):
            return False
        data = bytearray(img.hf.pread(size, offset))
        fixed = layout.BITMAP_DIR_FIXED_SIZE
        pos = count = 0
        while pos + fixed <= size:
            e = dict(layout.parse(layout.BitmapDirectoryEntryFixed, bytes(data[pos : pos + fixed])))
            name_size, extra_size = e["name_size"], e["extra_data_size"]
            e["flags"] |= BME_FLAG_IN_USE
            data[pos : pos + fixed] = layout.build(layout.BitmapDirectoryEntryFixed, e)
            entry = fixed + extra_size + name_size
            pos += entry + (-entry % 8)
            count += 1
        if pos != size or count != ext.nb_bitmaps:
            return False
        img.hf.pwrite(data, offset)
        img.hf.fsync()
        return True

    # ------------------------------------------------------------------ metadata door
    # The only code that writes the header, the active L1 table or the refcount
    # table (the flush path below and these methods).  snapshot, check/repair,
    # create, bitmaps and the ops call these; what the header points at must be
    # durable before a switch (DESIGN.md section 4).
    def switch_header(self, new=None, /, **fields):
        """Make ``new`` (or the current header with ``fields`` replaced) the header
        on disk: one pwrite of cluster 0, then fsync.  Returns the new header."""
        img = self.img
        hdr = img.header if new is None else new
        if fields:
            hdr = hdr.replace(**fields)
        img.header = hdr
        self.write_header()
        img.hf.fsync()
        return hdr

    def write_new_clusters(self, data) -> int:
        """Allocate clusters for ``data`` and write it there; returns the host offset
        (0 for no data).  Durable with the next flush, like guest data."""
        if not len(data):
            return 0
        img = self.img
        n = (len(data) + img.cluster_size - 1) >> img.cluster_bits
        off = self.refcounts.alloc(n)
        self.note_alloc()
        img.hf.pwrite(data, off)
        self.data_written = True
        return off

    def replace_active_l1(self, table: array, **fields) -> tuple[int, int]:
        """copy-then-switch of the active L1: ``table`` goes to new clusters, is made
        durable with everything pending (flush), then one header write switches
        to it (with ``fields``, e.g. ``size``).  Returns the old table's (offset,
        size); freeing it is the caller's job (after its own decrements)."""
        img = self.img
        old = (img.header.l1_table_offset, img.header.l1_size)
        offset = self.write_new_clusters(entries.encode_u64_table(table))
        if not len(table):  # a 0-byte disk: keep the (empty) table where it is
            offset = old[0]
        self.flush()
        self.switch_header(l1_table_offset=offset, l1_size=len(table), **fields)
        img.l1 = table
        self.l1_dirty = False
        if "size" in fields:
            img.virtual_size = fields["size"]
        return old

    def write_l1_entry(self, l1_index: int, value: int) -> None:
        """Repair: one active L1 entry rewritten in place, durable on return."""
        img = self.img
        img.hf.pwrite(value.to_bytes(8, "big"), img.header.l1_table_offset + 8 * l1_index)
        img.hf.fsync()
        if l1_index < len(img.l1):
            img.l1[l1_index] = value

    def update_l1_entries(self, changes) -> None:
        """Active L1 entries changed in place, e.g. their COPIED flags: ``changes`` is
        (index, value) pairs; written by the next flush at its L1 step, after the
        L2 tables."""
        l1 = self.img.l1
        for l1_index, value in changes:
            l1[l1_index] = value
            self.l1_dirty = True

    def write_refcount_table(self, table_offset: int, data) -> None:
        """Repair/rebuild: a refcount table written at ``table_offset`` (clusters the
        caller allocated), durable on return; ``switch_header`` then points at it."""
        self.img.hf.pwrite(data, table_offset)
        self.img.hf.fsync()

    def reload(self) -> None:
        """Forget cached metadata and read the header and the active L1 again (after
        a rewrite of the structures, e.g. a refcount rebuild)."""
        img = self.img
        img.forget_cached_metadata()
        img.file_size = img.hf.size()
        img._load_header(_repair=True)
        if self.refcounts is not None:
            from .refcount import Refcounts

            self.refcounts = Refcounts(img)

    def write_header(self) -> None:
        self.img.hf.pwrite(build_cluster0(self.img.header), 0)
        self.header_dirty = False

    def abandon(self) -> None:
        """Forget every change not yet flushed (after a failed copy): the file stays
        as after the last flush, and nothing is written from now on."""
        self.l2_cache.clear()
        self.l1_dirty = False
        self.header_dirty = False
        self.refcounts = None

    # ------------------------------------------------------------------ allocation
    def note_alloc(self) -> None:
        img = self.img
        end = self.refcounts.end_cluster << img.cluster_bits
        img.file_size = max(img.file_size, end)

    def l2_for_write(self, cluster: int) -> tuple[array, int]:
        """The L2 table holding ``cluster``, private to the active L1 (COW if shared)."""
        img = self.img
        l1 = img.l1
        l1_index = cluster >> img.l2_bits
        if l1_index >= len(l1):
            raise OperationError(img.path, "write beyond the L1 table")
        e = l1[l1_index]
        off = entries.l1_private_table(e)
        if off:
            return img.l2_table(off), off
        off = entries.l1_l2_offset(e)
        rc = self.refcounts
        if off and rc.get(off >> img.cluster_bits) == 1:
            l1[l1_index] = entries.data_entry(off)
            self.l1_dirty = True
            return img.l2_table(off), off
        if off:
            table = array("Q", img.l2_table(off))
            rc.free_later(off)
            self.l2_cache.drop(off)
        else:
            table = array("Q", bytes(img.cluster_size))
        new = rc.alloc(1)
        self.note_alloc()
        self.l2_cache.put(new, table, dirty=True)
        l1[l1_index] = entries.data_entry(new)
        self.l1_dirty = True
        return table, new

    def free_entry_allocation(self, e: int) -> None:
        """Drop the host allocation an L2 entry holds (deferred)."""
        if not e or self.img.has_data_file:
            return
        if entries.is_compressed(e):
            host, nbytes = entries.decode_compressed(e, self.img.cluster_bits)
            self.refcounts.free_bytes_later(host, nbytes)
        else:
            host = entries.l2_host_offset(e)
            if host:
                self.refcounts.free_later(host)

    def free_entry_allocations(self, table_entries: list[int]) -> None:
        """``free_entry_allocation`` of each of ``table_entries`` (L2 entries): the
        plain clusters' frees queued in one step (make_empty drops tens of
        thousands), the compressed ones one by one."""
        if self.img.has_data_file:
            return
        compressed, off_mask, cb = entries.COMPRESSED_BIT, entries.L2_HOST_MASK, self.img.cluster_bits
        self.refcounts.pending_free.extend(
            [((e & off_mask) >> cb, 1) for e in table_entries if e & off_mask and not e & compressed])
        for e in table_entries:
            if e & compressed:
                self.free_entry_allocation(e)

    # the historical names (tests patch these on the class)
    _free_entry_allocation = free_entry_allocation

    def alloc_for_entries(self, table, first: int, count: int, step: int = 1) -> list[int]:
        """Host clusters for the ``count`` L2 entries of ``table`` from index
        ``first`` (``step`` words per entry): a private cluster (COPIED, not
        compressed) keeps its host, every run of others gets new clusters in one
        allocation where possible (their old allocations freed, deferred).  The
        entries themselves are left for the caller to set."""
        cb = self.img.cluster_bits
        rc = self.refcounts
        private = entries.l2_private
        hosts = [0] * count
        k = 0
        while k < count:
            e = table[(first + k) * step]
            if private(e):
                hosts[k] = entries.l2_host_offset(e)  # private already: overwrite in place
                k += 1
                continue
            j = k + 1
            while j < count and not private(table[(first + j) * step]):
                j += 1
            while k < j:
                # contiguous when nothing below the used area is free (alloc(n)
                # would otherwise rescan the file for a long enough free run)
                n_alloc = j - k if rc.free_hint >= rc.end_cluster else 1
                host = rc.alloc(n_alloc)
                for m in range(n_alloc):
                    self._free_entry_allocation(table[(first + k + m) * step])
                    hosts[k + m] = host + (m << cb)
                k += n_alloc
        return hosts

    # ------------------------------------------------------------------ prepare_write
    def prepare_write(self, offset: int, length: int) -> PreparedWrite:
        """Allocate private host clusters for a cluster-aligned guest range.

        Returns a ``PreparedWrite``: ``(guest_offset, host_offset, length)`` runs
        (host offsets in the data file) that the caller must fill with data,
        then call ``filled()`` on it (or fill them before its next explicit
        ``flush()``).  The mapping is changed in memory only; a flush makes it
        durable after the data (ordering rule 1 before 4).
        """
        img = self.img
        self.check_writable()
        check_range(img.path, offset, length, img.virtual_size)
        cs, cb = img.cluster_size, img.cluster_bits
        if offset & (cs - 1) or (length & (cs - 1) and offset + length != img.virtual_size):
            raise ValueError("prepare_write needs a cluster-aligned range")
        self.begin_write()
        self.mark_dirty(offset, length)
        self.flush_if_needed()  # a safe point: nothing of this call is in memory yet
        out = PreparedWrite(self)
        end = offset + length
        pos = offset
        step = 2 if img.extended_l2 else 1
        l2_mask = img.l2_entries - 1
        while pos < end:
            # one L2 table at a time: the clusters of [pos, seg_end) share it
            cluster = pos >> cb
            table, l2_off = self.l2_for_write(cluster)
            seg_end = min(end, ((cluster | l2_mask) + 1) << cb)
            count = (seg_end - pos + cs - 1) >> cb
            i0 = cluster & l2_mask
            self.l2_cache.mark_dirty(l2_off)
            if img.has_data_file:
                hosts = [pos + (k << cb) for k in range(count)]
            else:
                hosts = self.alloc_for_entries(table, i0, count, step)
            for k, host in enumerate(hosts):
                table[(i0 + k) * step] = entries.data_entry(host)
                if step == 2:
                    table[2 * (i0 + k) + 1] = entries.ALL_ALLOC_BITS
                g = pos + (k << cb)
                n = min(cs, end - g)
                if out and out[-1][0] + out[-1][2] == g and out[-1][1] + out[-1][2] == host:
                    gg, h, ln = out[-1]
                    out[-1] = (gg, h, ln + n)
                else:
                    out.append((g, host, n))
            pos = seg_end
        self.note_alloc()
        self.data_written = True
        return out

    def prepare_writes(self, ranges, sources=None, relocate: bool = False) -> PreparedWrite:
        """``prepare_write`` for many sorted, cluster-aligned ``(offset, length)``
        guest ranges at once: one handle, the clusters that need new host
        clusters allocated together (one contiguous run where nothing below the
        used area is free), so that their data is copied in long runs.
        ``sources`` and ``relocate``: see ``guestwrite.fill_prepared`` (new
        clusters in the order of the data's origin; private ones moved too)."""
        self.check_writable()
        guestwrite.check_prepare(self, ranges)
        if sources is not None and len(sources) != len(ranges):
            raise ValueError("prepare_writes: one source per range")
        self.flush_if_needed()  # a safe point: nothing of this call is in memory yet
        out = PreparedWrite(self)
        guestwrite.fill_prepared(self, out, ranges, sources, relocate)
        self.data_written = True
        return out

    # ------------------------------------------------------------------ flush
    def flush_if_needed(self) -> None:
        """A safe point: flush if a cache is over its bound and no prepared range
        is waiting for its data."""
        rc = self.refcounts
        if self.unfilled or rc is None:
            return
        l2, blocks = self.l2_cache, rc.blocks  # (TableCache.needs_flush, inlined: hot)
        if len(l2.dirty) > l2.dirty_limit or len(blocks.dirty) > blocks.dirty_limit:
            self.flush()

    def needs_flush(self) -> bool:
        """A cache is over its bound: the next safe point (the filling of the last
        prepared range) will flush."""
        rc = self.refcounts
        return rc is not None and (self.l2_cache.needs_flush or rc.blocks.needs_flush)

    def flush(self) -> None:
        """Make every change durable, in the order of the module docstring (the
        one place that states and applies it)."""
        img = self.img
        rc = self.refcounts
        if not img.writable or rc is None:
            return
        # an explicit flush publishes every prepared range: its caller filled them
        self.unfilled = 0
        self.epoch += 1
        l2 = self.l2_cache
        if not (l2.dirty or self.l1_dirty or rc.dirty or self.header_dirty or self.data_written):
            return
        hf = img.hf
        # 1. data and 2. refcount blocks (increments only): no order is needed
        # between the two (either one on disk without the other is at worst a
        # leak), so one fsync makes both durable before anything points at them
        rc.write_blocks()
        if img.data_hf is not hf:
            img.data_hf.fsync()
        hf.fsync()
        self.data_written = False
        # 3. refcount table
        if rc.table_dirty:
            moved = rc.write_table()
            hf.fsync()
            if moved:
                img.header = img.header.replace(
                    refcount_table_offset=rc.table_offset,
                    refcount_table_clusters=rc.table_clusters,
                )
                self.write_header()
                hf.fsync()
                rc.table_switched()
        # 4. L2 tables
        if l2.write_dirty(lambda off, table: hf.pwrite(entries.encode_u64_table(table), off)):
            hf.fsync()
        # 5. L1 table
        if self.l1_dirty:
            hf.pwrite(entries.encode_u64_table(img.l1), img.header.l1_table_offset)
            hf.fsync()
            self.l1_dirty = False
            if self.l1_moved_from is not None:
                self.write_header()
                hf.fsync()
                off, size = self.l1_moved_from
                if size:
                    rc.free_later(off, (size * 8 + img.cluster_size - 1) >> img.cluster_bits)
                self.l1_moved_from = None
        # 6. header
        if self.header_dirty:
            self.write_header()
            hf.fsync()
        # 7. deferred frees
        if rc.pending_free:
            # a freed cluster may be the compressed tail: never pack into it again
            self.cpos = self.cend = 0
            freed = rc.apply_pending_frees()
            if rc.write_blocks():
                hf.fsync()
            if self.relocated:
                # the clusters a relocation left: nothing maps them any more (the
                # L2 tables are durable), so their blocks go back to the file
                # system (a crash before this leaves them allocated: only space)
                self.relocated = False
                _punch_clusters(hf, freed, img.cluster_bits)
        img.file_size = max(img.file_size, hf.size())

    # ------------------------------------------------------------------ operations
    # The functions of pyqcow/guestwrite.py (their first argument is the writer)
    # and thin entry points over pyqcow/reshape.py.
    write = guestwrite.write
    write_compressed = guestwrite.write_compressed
    write_zeroes = guestwrite.write_zeroes
    discard = guestwrite.discard

    def resize(self, new_size: int) -> None:
        reshape.resize(self, new_size)

    def shrink(self, new_size: int) -> None:
        reshape.shrink(self, new_size)

    def make_empty(self) -> None:
        reshape.make_empty(self)

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        reshape.set_backing(self, name, fmt)


def _punch_clusters(hf, clusters: list[int], cluster_bits: int) -> None:
    """Punch the ascending ``clusters`` (numbers), one range per contiguous run;
    where the file system cannot, the space stays allocated, as before."""
    runs = []
    for c in clusters:
        if runs and runs[-1][1] == c:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    hf.punch_holes([(a << cluster_bits, (b - a) << cluster_bits) for a, b in runs])


def require_writable_features(img) -> None:
    h = img.header
    if h.crypt_method:
        raise UnsupportedFeatureError(img.path, "cannot write encrypted images")
