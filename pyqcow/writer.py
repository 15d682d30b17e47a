"""Guest writes for QcowImage: allocation, copy-on-write, and the one flush path.

Durable-write order (DESIGN.md section 4), enforced only in ``flush()``:
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
unreferenced data clusters, never a dangling reference).
"""

from __future__ import annotations

from array import array

from . import entries, spec
from .entries import ClusterType
from .errors import FormatError, OperationError, QcowError, UnsupportedFeatureError
from .header import build_cluster0, size_to_l1
from .hostfile import check_range

MAX_DIRTY_L2 = 256
COPIED = spec.QCOW_OFLAG_COPIED
ZERO = spec.QCOW_OFLAG_ZERO
OFFSET_MASK = spec.L2E_OFFSET_MASK
ALL_ZERO_BITS = 0xFFFFFFFF << 32


class WriterMixin:
    # ------------------------------------------------------------------ set-up
    def _init_writer(self) -> None:
        self.refcounts = None
        self.dirty_l2: set[int] = set()
        self.l1_dirty = False
        self.l1_moved_from: tuple[int, int] | None = None
        self.header_dirty = False
        self._write_started = False
        self._data_written = False
        self._bitmaps: list | None = None  # pyqcow.bitmaps.Bitmap, loaded on the first write
        # compressed-cluster packing: next free byte (sector aligned) in the
        # host clusters last allocated for compressed data, and their end
        self._cpos = 0
        self._cend = 0
        if not self.writable:
            return
        from .refcount import Refcounts

        self.refcounts = Refcounts(self)
        if self.header.dirty:
            self._repair_dirty()

    def _repair_dirty(self) -> None:
        """A lazy-refcounts image left dirty: rebuild refcounts before writing."""
        from . import repair

        repair.repair_dirty(self)

    def _check_writable(self) -> None:
        if not self.writable:
            raise OperationError(self.path, "image is open read-only")
        if self._closed:
            raise OperationError(self.path, "image is closed")

    def _begin_write(self) -> None:
        """Before the first change: load the persistent bitmaps and mark them in use
        on disk (so a crash invalidates them instead of leaving them wrong), and
        drop the autoclear bits we do not maintain."""
        if self._write_started:
            return
        self._write_started = True
        keep = spec.Autoclear.DATA_FILE_RAW
        h = self.header
        if h.version == 3 and h.autoclear_features & spec.Autoclear.BITMAPS:
            from .bitmaps import load_bitmaps

            try:
                self._bitmaps = load_bitmaps(self)
            except FormatError:
                self._bitmaps = None  # unreadable directory: flagged in use (below) or dropped
            if self._mark_bitmaps_in_use():
                keep |= spec.Autoclear.BITMAPS
            else:
                self._bitmaps = None
        if h.version == 3 and h.autoclear_features & ~keep:
            self.header = h.replace(autoclear_features=h.autoclear_features & keep)
            self._write_header()
            self.hf.fsync()

    def _mark_dirty(self, offset: int, length: int) -> None:
        """Guest bytes [offset, offset+length) may change: set their bits in every
        enabled persistent bitmap (before the data changes)."""
        for b in self._bitmaps or ():
            if b.enabled:
                b.set_range(offset, length)

    def bitmaps(self) -> list:
        """The persistent bitmaps as they are in memory (pyqcow.bitmaps.Bitmap) once
        the image was written; read from the file otherwise."""
        if self._bitmaps is not None:
            return list(self._bitmaps)
        from .bitmaps import load_bitmaps

        return load_bitmaps(self) or []

    def _store_bitmaps(self) -> None:
        """On a clean close: store the updated bitmaps, in_use cleared (copy-then-switch)."""
        if not self._bitmaps or self.refcounts is None or not self.writable:
            return
        from .bitmaps import store_bitmaps

        store_bitmaps(self, self._bitmaps)
        self._bitmaps = None

    def _mark_bitmaps_in_use(self) -> bool:
        """Persistent bitmaps: flag every one "in use" before the first change.

        Their stored contents go stale with our first change; a clean close
        stores them again with the flag cleared (``_store_bitmaps``).  QEMU
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

        ext = self.header.bitmaps
        if ext is None:
            return False
        size, offset = ext.bitmap_directory_size, ext.bitmap_directory_offset
        if not 0 < size <= 1024 * 65535 or offset % self.cluster_size or (
            offset + size > self.file_size
        ):
            return False
        data = bytearray(self.hf.pread(size, offset))
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
        self.hf.pwrite(data, offset)
        self.hf.fsync()
        return True

    # ------------------------------------------------------------------ metadata door
    # The only code that writes the header, the active L1 table or the refcount
    # table (the flush path below and these methods).  snapshot, check/repair,
    # create, bitmaps and the ops call these; what the header points at must be
    # durable before a switch (DESIGN.md section 4).
    def switch_header(self, new=None, /, **fields):
        """Make ``new`` (or the current header with ``fields`` replaced) the header
        on disk: one pwrite of cluster 0, then fsync.  Returns the new header."""
        hdr = self.header if new is None else new
        if fields:
            hdr = hdr.replace(**fields)
        self.header = hdr
        self._write_header()
        self.hf.fsync()
        return hdr

    def write_new_clusters(self, data) -> int:
        """Allocate clusters for ``data`` and write it there; returns the host offset
        (0 for no data).  Durable with the next flush, like guest data."""
        if not len(data):
            return 0
        n = (len(data) + self.cluster_size - 1) >> self.cluster_bits
        off = self.refcounts.alloc(n)
        self._note_alloc()
        self.hf.pwrite(data, off)
        self._data_written = True
        return off

    def replace_active_l1(self, table: array, **fields) -> tuple[int, int]:
        """copy-then-switch of the active L1: ``table`` goes to new clusters, is made
        durable with everything pending (flush), then one header write switches
        to it (with ``fields``, e.g. ``size``).  Returns the old table's (offset,
        size); freeing it is the caller's job (after its own decrements)."""
        old = (self.header.l1_table_offset, self.header.l1_size)
        offset = self.write_new_clusters(entries.encode_u64_table(table))
        if not len(table):  # a 0-byte disk: keep the (empty) table where it is
            offset = old[0]
        self.flush()
        self.switch_header(l1_table_offset=offset, l1_size=len(table), **fields)
        self.l1 = table
        self.l1_dirty = False
        if "size" in fields:
            self.virtual_size = fields["size"]
        return old

    def write_l1_entry(self, l1_index: int, value: int) -> None:
        """Repair: one active L1 entry rewritten in place, durable on return."""
        self.hf.pwrite(value.to_bytes(8, "big"), self.header.l1_table_offset + 8 * l1_index)
        self.hf.fsync()
        if l1_index < len(self.l1):
            self.l1[l1_index] = value

    def update_l1_entries(self, changes) -> None:
        """Active L1 entries changed in place, e.g. their COPIED flags: ``changes`` is
        (index, value) pairs; written by the next flush at its L1 step, after the
        L2 tables (added by h-snap for pyqcow/snapshot.py)."""
        for l1_index, value in changes:
            self.l1[l1_index] = value
            self.l1_dirty = True

    def write_refcount_table(self, table_offset: int, data) -> None:
        """Repair/rebuild: a refcount table written at ``table_offset`` (clusters the
        caller allocated), durable on return; ``switch_header`` then points at it."""
        self.hf.pwrite(data, table_offset)
        self.hf.fsync()

    def reload(self) -> None:
        """Forget cached metadata and read the header and the active L1 again (after
        a rewrite of the structures, e.g. a refcount rebuild)."""
        self._l2_cache.clear()
        self._decomp_cache = None
        self._metadata_prealloc = None
        self.file_size = self.hf.size()
        self._load_header(_repair=True)
        if self.refcounts is not None:
            from .refcount import Refcounts

            self.refcounts = Refcounts(self)

    def _write_header(self) -> None:
        self.hf.pwrite(build_cluster0(self.header), 0)
        self.header_dirty = False

    # ------------------------------------------------------------------ L2 access
    def _evict_l2(self) -> None:
        # never the newest entry: the caller of l2_table() is about to use it
        for off in list(self._l2_cache)[:-1]:
            if off not in self.dirty_l2:
                del self._l2_cache[off]
                if len(self._l2_cache) <= 64:
                    return
        if len(self.dirty_l2) > MAX_DIRTY_L2:
            self.flush()

    def _note_alloc(self) -> None:
        end = self.refcounts.end_cluster << self.cluster_bits
        self.file_size = max(self.file_size, end)

    def _l2_for_write(self, cluster: int) -> tuple[array, int]:
        """The L2 table holding ``cluster``, private to the active L1 (COW if shared)."""
        l1_index = cluster >> self.l2_bits
        if l1_index >= len(self.l1):
            raise OperationError(self.path, "write beyond the L1 table")
        e = self.l1[l1_index]
        off = e & spec.L1E_OFFSET_MASK
        rc = self.refcounts
        if off and e & COPIED:
            return self.l2_table(off), off
        if off and rc.get(off >> self.cluster_bits) == 1:
            self.l1[l1_index] = off | COPIED
            self.l1_dirty = True
            return self.l2_table(off), off
        if off:
            table = array("Q", self.l2_table(off))
            rc.free_later(off)
            self._l2_cache.pop(off, None)
        else:
            table = array("Q", bytes(self.cluster_size))
        new = rc.alloc(1)
        self._note_alloc()
        self._l2_cache[new] = table
        self.dirty_l2.add(new)
        self.l1[l1_index] = new | COPIED
        self.l1_dirty = True
        return table, new

    # ------------------------------------------------------------------ guest writes
    def write(self, offset: int, data) -> None:
        self._check_writable()
        mv = memoryview(data).cast("B")
        check_range(self.path, offset, len(mv), self.virtual_size)
        if not len(mv):
            return
        self._begin_write()
        self._mark_dirty(offset, len(mv))
        cb, cs = self.cluster_bits, self.cluster_size
        pos = 0
        total = len(mv)
        batch = not (self.extended_l2 or self.has_data_file)
        while pos < total:
            g = offset + pos
            a = g & (cs - 1)
            if batch and not a and total - pos >= 2 * cs:
                done = self._write_full_clusters(g >> cb, mv[pos:])
                if done:
                    pos += done
                    continue
            n = min(cs - a, total - pos)
            self._write_in_cluster(g >> cb, a, mv[pos : pos + n])
            pos += n
        self._data_written = True
        if len(self.dirty_l2) > MAX_DIRTY_L2:
            self.flush()

    def _write_full_clusters(self, cluster: int, mv: memoryview) -> int:
        """Whole clusters from ``cluster`` on, up to the end of its L2 table, with one
        allocation per run of clusters that need new host clusters and one pwrite
        per run of contiguous host clusters.  Same result as _write_in_cluster per
        cluster: private clusters (normal or zero-with-offset, COPIED) are written
        in place, everything else gets a new cluster and its old allocation is
        freed (deferred).  Returns the bytes written (0: fewer than 2 clusters)."""
        cb, cs = self.cluster_bits, self.cluster_size
        l2_mask = self.l2_entries - 1
        i0 = cluster & l2_mask
        count = min(len(mv) >> cb, l2_mask + 1 - i0)
        if count < 2:
            return 0
        table, l2_off = self._l2_for_write(cluster)
        rc = self.refcounts
        special = spec.QCOW_OFLAG_COMPRESSED

        def private(e: int) -> bool:
            return bool(e & COPIED and e & OFFSET_MASK and not e & special)

        hosts: list[int] = []
        k = 0
        while k < count:
            e = table[i0 + k]
            if private(e):
                hosts.append(e & OFFSET_MASK)
                k += 1
                continue
            j = k + 1
            while j < count and not private(table[i0 + j]):
                j += 1
            while k < j:
                # contiguous when nothing below the used area is free (alloc(n)
                # would otherwise rescan the file for a long enough free run)
                n_alloc = j - k if rc.free_hint >= rc.end_cluster else 1
                host = rc.alloc(n_alloc)
                for m in range(n_alloc):
                    self._free_entry_allocation(table[i0 + k + m])
                    hosts.append(host + (m << cb))
                k += n_alloc
        self._note_alloc()
        s = 0
        while s < count:
            t = s + 1
            while t < count and hosts[t] == hosts[t - 1] + cs:
                t += 1
            self.hf.pwrite(mv[s << cb : t << cb], hosts[s])
            s = t
        for k in range(count):
            table[i0 + k] = hosts[k] | COPIED
        self.dirty_l2.add(l2_off)
        return count << cb

    def _guest_bytes(self, guest_offset: int, length: int) -> bytearray:
        """Current guest view of a range, zero-padded past the virtual size."""
        buf = bytearray(length)
        inside = max(0, min(length, self.virtual_size - guest_offset))
        if inside:
            self.readinto(memoryview(buf)[:inside], guest_offset)
        return buf

    def _free_entry_allocation(self, e: int) -> None:
        """Drop the host allocation an L2 entry holds (deferred)."""
        if self.has_data_file:
            return
        if e & spec.QCOW_OFLAG_COMPRESSED:
            host, nbytes = entries.decode_compressed(e, self.cluster_bits)
            self.refcounts.free_bytes_later(host, nbytes)
        elif e & OFFSET_MASK:
            self.refcounts.free_later(e & OFFSET_MASK)

    def _write_in_cluster(self, cluster: int, a: int, chunk: memoryview) -> None:
        cb, cs = self.cluster_bits, self.cluster_size
        base = cluster << cb
        n = len(chunk)
        table, l2_off = self._l2_for_write(cluster)
        i = cluster & (self.l2_entries - 1)
        if self.extended_l2:
            self._write_extended(table, l2_off, i, base, a, chunk)
            return
        e = table[i]
        t = entries.l2_type(e, self.has_data_file)
        if self.has_data_file:
            host = base
            if t != ClusterType.NORMAL and not (a == 0 and n == cs):
                buf = self._guest_bytes(base, cs)
                buf[a : a + n] = chunk
                self.data_hf.pwrite(buf, host)
            else:
                self.data_hf.pwrite(chunk, host + a)
            new_e = host | COPIED
            if new_e != e:
                table[i] = new_e
                self.dirty_l2.add(l2_off)
            return
        if t == ClusterType.NORMAL and e & COPIED:
            self.hf.pwrite(chunk, (e & OFFSET_MASK) + a)
            return
        # the rest of the cluster reads as zeros (nothing to copy on write)?
        zero_rest = t == ClusterType.ZERO_PLAIN and self.header.version >= 3 or (
            t in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN) and self.backing is None
        )
        if a == 0 and n == cs:
            buf = chunk
        elif zero_rest:
            buf = None
        else:
            buf = self._guest_bytes(base, cs)
            buf[a : a + n] = chunk
        if t == ClusterType.ZERO_ALLOC and e & COPIED:
            host = e & OFFSET_MASK
        else:
            host = self.refcounts.alloc(1)
            self._note_alloc()
            self._free_entry_allocation(e)
        if buf is None:
            if host >= self.hf.size():
                # a cluster past the end of the file was never written: its
                # other bytes read as zeros already (holes), write the chunk only
                self.hf.pwrite(chunk, host + a)
            else:
                buf = bytearray(cs)
                buf[a : a + n] = chunk
                self.hf.pwrite(buf, host)
        else:
            self.hf.pwrite(buf, host)
        table[i] = host | COPIED
        self.dirty_l2.add(l2_off)

    def _write_extended(self, table, l2_off, i, base, a, chunk) -> None:
        cs = self.cluster_size
        scb = self.subcluster_bits
        n = len(chunk)
        e, bm = table[2 * i], table[2 * i + 1]
        first_sc, last_sc = a >> scb, (a + n - 1) >> scb
        span_start, span_end = first_sc << scb, (last_sc + 1) << scb
        if span_start == a and span_end == a + n:
            buf = chunk
        else:
            buf = self._guest_bytes(base + span_start, span_end - span_start)
            buf[a - span_start : a - span_start + n] = chunk
        compressed = bool(e & spec.QCOW_OFLAG_COMPRESSED)
        host = e & OFFSET_MASK
        if self.has_data_file:
            host = base
        elif compressed or not (host and e & COPIED):
            new = self.refcounts.alloc(1)
            self._note_alloc()
            if compressed:
                self.hf.pwrite(self._guest_bytes(base, cs), new)
                bm = 0xFFFFFFFF
            elif host:
                self.hf.pwrite(self.hf.pread(cs, host), new)
            self._free_entry_allocation(e)
            host = new
        self.data_hf.pwrite(buf, host + span_start)
        mask = 0
        for sc in range(first_sc, last_sc + 1):
            mask |= 1 << sc
        bm = (bm | mask) & ~(mask << 32)
        table[2 * i] = host | COPIED
        table[2 * i + 1] = bm
        self.dirty_l2.add(l2_off)

    # ------------------------------------------------------------------ compressed clusters
    def write_compressed(self, guest_offset: int, data) -> None:
        """Store one guest cluster as ``data`` (already compressed for this image's
        compression_type).  Compressed clusters are packed into host clusters at
        sector granularity; every host cluster a compressed cluster's sector range
        touches gets one reference per compressed cluster (as qemu counts them).
        """
        self._check_writable()
        cs, cb = self.cluster_size, self.cluster_bits
        if guest_offset & (cs - 1):
            raise OperationError(self.path, "compressed writes must start at a cluster boundary")
        check_range(self.path, guest_offset, min(cs, self.virtual_size - guest_offset),
                    self.virtual_size)
        if guest_offset >= self.virtual_size:
            raise OperationError(self.path, f"request at offset {guest_offset} is outside the disk")
        if self.has_data_file:
            raise OperationError(self.path, "compressed clusters need the data in the image file")
        mv = memoryview(data).cast("B")
        length = len(mv)
        if not 0 < length < cs:
            raise OperationError(self.path, "compressed data must be smaller than one cluster")
        self._begin_write()
        self._mark_dirty(guest_offset, min(cs, self.virtual_size - guest_offset))
        rc = self.refcounts
        cluster = guest_offset >> cb
        table, l2_off = self._l2_for_write(cluster)
        pos, end = self._cpos, self._cend
        if pos and rc.get(pos >> cb) >= rc.max:
            pos = end = 0  # narrow refcounts (refcount_bits=1): no sharing
        old_end_cluster = end >> cb
        if not pos or pos + length > end:
            extra = length if not pos else pos + length - end
            k = (extra + cs - 1) >> cb
            new = rc.alloc(k)
            self._note_alloc()
            if not pos or new != end:
                pos = new
                old_end_cluster = new >> cb  # every touched cluster is fresh
            end = new + (k << cb)
        first, last = pos >> cb, (pos + length - 1) >> cb
        for c in range(first, last + 1):
            if c < old_end_cluster:
                rc.incref(c)  # shared with an earlier compressed cluster
            # else: a fresh cluster, alloc() already gave it its one reference
        self.hf.pwrite(mv, pos)
        descriptor = entries.encode_compressed(pos, length, cb)
        i = cluster & (self.l2_entries - 1)
        if self.extended_l2:
            self._free_entry_allocation(table[2 * i])
            table[2 * i] = descriptor
            table[2 * i + 1] = 0
        else:
            self._free_entry_allocation(table[i])
            table[i] = descriptor
        self.dirty_l2.add(l2_off)
        nxt = (pos + length + 511) & ~511
        if nxt >= end:
            self._cpos = self._cend = 0
        else:
            self._cpos, self._cend = nxt, end
        self._data_written = True
        if len(self.dirty_l2) > MAX_DIRTY_L2:
            self.flush()

    # ------------------------------------------------------------------ zeroes / discard
    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._check_writable()
        check_range(self.path, offset, length, self.virtual_size)
        if not length:
            return
        self._begin_write()
        self._mark_dirty(offset, length)
        cb, cs = self.cluster_bits, self.cluster_size
        end = offset + length
        pos = offset
        while pos < end:
            a = pos & (cs - 1)
            n = min(cs - a, end - pos)
            cluster = pos >> cb
            full = a == 0 and (n == cs or pos + n == self.virtual_size)
            if not self._zero_cluster(cluster, a, n, full, discard=False):
                self._write_in_cluster(cluster, a, memoryview(bytes(n)))
            pos += n
        self._data_written = True

    def discard(self, offset: int, length: int) -> None:
        """Deallocate whole clusters in the range (partial clusters are left alone)."""
        self._check_writable()
        check_range(self.path, offset, length, self.virtual_size)
        self._begin_write()
        self._mark_dirty(offset, length)
        cb, cs = self.cluster_bits, self.cluster_size
        end = offset + length
        pos = offset
        while pos < end:
            a = pos & (cs - 1)
            n = min(cs - a, end - pos)
            full = a == 0 and (n == cs or pos + n == self.virtual_size)
            if full:
                self._zero_cluster(pos >> cb, 0, n, True, discard=True)
            pos += n

    def _zero_cluster(self, cluster: int, a: int, n: int, full: bool, discard: bool) -> bool:
        """Make (part of) a cluster read as zeros via metadata.  False: not possible."""
        v3 = self.header.version >= 3
        has_backing = self.header.backing_file is not None
        l1_index = cluster >> self.l2_bits
        l1e = self.l1[l1_index] if l1_index < len(self.l1) else 0
        if not l1e & spec.L1E_OFFSET_MASK and not has_backing:
            return True  # nothing allocated, nothing behind: already zeros
        if self.extended_l2:
            scb = self.subcluster_bits
            if a & ((1 << scb) - 1) or (n & ((1 << scb) - 1) and not full):
                return discard  # discard ignores partial subclusters
            table, l2_off = self._l2_for_write(cluster)
            i = cluster & (self.l2_entries - 1)
            e, bm = table[2 * i], table[2 * i + 1]
            first_sc = a >> scb
            nsc = (n + (1 << scb) - 1) >> scb
            mask = ((1 << nsc) - 1) << first_sc
            if full or mask == 0xFFFFFFFF:
                self._free_entry_allocation(e)
                if self.has_data_file:
                    table[2 * i] = (cluster << self.cluster_bits) | COPIED
                else:
                    table[2 * i] = 0
                zero = not (discard and not has_backing)
                table[2 * i + 1] = ALL_ZERO_BITS if zero else 0
            else:
                if e & spec.QCOW_OFLAG_COMPRESSED or (e & OFFSET_MASK and not e & COPIED):
                    return discard
                zero = not (discard and not has_backing)
                bm &= ~mask
                if zero:
                    bm |= mask << 32
                table[2 * i + 1] = bm
            self.dirty_l2.add(l2_off)
            return True
        if not full:
            return discard
        if not v3 and has_backing:
            return discard  # v2 cannot express zeros over a backing file
        table, l2_off = self._l2_for_write(cluster)
        i = cluster & (self.l2_entries - 1)
        e = table[i]
        if self.has_data_file:
            table[i] = (cluster << self.cluster_bits) | COPIED | (ZERO if v3 else 0)
            if not v3 or self.header.data_file_raw:
                self.data_hf.pwrite(bytes(n), cluster << self.cluster_bits)
        else:
            self._free_entry_allocation(e)
            table[i] = ZERO if (v3 and (has_backing or not discard)) else 0
        if table[i] != e:
            self.dirty_l2.add(l2_off)
        return True

    # ------------------------------------------------------------------ resize
    def resize(self, new_size: int) -> None:
        self._check_writable()
        if new_size < self.virtual_size:
            raise OperationError(self.path, "shrinking an image is not supported")
        if new_size > spec.MAX_VIRTUAL_SIZE:
            raise OperationError(self.path, "virtual size too large (maximum 2^61 bytes)")
        if new_size == self.virtual_size:
            return
        self._begin_write()
        need = size_to_l1(new_size, self.cluster_bits, self.header.l2_entry_size)
        if need > len(self.l1):
            if need * 8 > spec.MAX_L1_SIZE_BYTES:
                raise OperationError(self.path, "L1 table would exceed 32 MiB")
            old = (self.header.l1_table_offset, self.header.l1_size)
            clusters = (need * 8 + self.cluster_size - 1) >> self.cluster_bits
            self.l1.extend(array("Q", bytes(8 * (need - len(self.l1)))))
            new_off = self.refcounts.alloc(clusters)
            self._note_alloc()
            if self.l1_moved_from is None:
                self.l1_moved_from = old
            else:  # an L1 allocated in this batch and never written
                self.refcounts.free_later(
                    self.header.l1_table_offset,
                    (self.header.l1_size * 8 + self.cluster_size - 1) >> self.cluster_bits,
                )
            self.header = self.header.replace(l1_table_offset=new_off, l1_size=need)
            self.l1_dirty = True
        self.header = self.header.replace(size=new_size)
        self.virtual_size = new_size
        self.header_dirty = True
        # bitmaps grow with the disk, new bits clear (as qemu-img resize does)
        for b in self._bitmaps or ():
            if b.bits is not None:
                b.resize(new_size)

    def shrink(self, new_size: int) -> None:
        """Cut the guest disk to ``new_size`` bytes, freeing every cluster past the end.

        For merge (BASE larger than TOP: the kept image must be exactly TOP's
        size).  The partial last cluster is zeroed past the end, so a later grow
        reads zeros there, as after qemu-img resize --shrink.  Refused with
        internal snapshots (their tables share the clusters).
        """
        self._check_writable()
        if new_size >= self.virtual_size:
            return
        if self.header.nb_snapshots:
            raise OperationError(self.path, "cannot shrink an image with internal snapshots")
        cs, cb = self.cluster_size, self.cluster_bits
        first_gone = (new_size + cs - 1) >> cb
        tail_end = min(first_gone << cb, self.virtual_size)
        if tail_end > new_size:
            self.write_zeroes(new_size, tail_end - new_size)
        self._begin_write()
        step = 2 if self.extended_l2 else 1
        keep_tables = (first_gone + self.l2_entries - 1) // self.l2_entries
        for l1_index in range(first_gone // self.l2_entries, len(self.l1)):
            l2_off = self.l1[l1_index] & spec.L1E_OFFSET_MASK
            if not l2_off:
                continue
            if l1_index >= keep_tables:
                # the whole table lies past the end: unlink it first (as make_empty)
                table = self.l2_table(l2_off)
                self.l1[l1_index] = 0
                self.l1_dirty = True
                self.dirty_l2.discard(l2_off)
                self._l2_cache.pop(l2_off, None)
                for e in table[::step] if step == 2 else table:
                    if e:
                        self._free_entry_allocation(e)
                self.refcounts.free_later(l2_off)
                continue
            table, l2_off = self._l2_for_write(l1_index * self.l2_entries)
            for i in range(first_gone - l1_index * self.l2_entries, self.l2_entries):
                e = table[step * i]
                if e or (step == 2 and table[2 * i + 1]):
                    table[step * i] = 0
                    if step == 2:
                        table[2 * i + 1] = 0
                    self.dirty_l2.add(l2_off)
                    if e:
                        self._free_entry_allocation(e)
        self.header = self.header.replace(size=new_size)
        self.virtual_size = new_size
        self.header_dirty = True
        self.flush()

    # ------------------------------------------------------------------ flush
    def flush(self) -> None:
        if not self.writable or self.refcounts is None:
            return
        rc = self.refcounts
        if not (
            self.dirty_l2 or self.l1_dirty or rc.dirty or self.header_dirty or self._data_written
        ):
            return
        hf = self.hf
        # 1. data and 2. refcount blocks (increments only): no order is needed
        # between the two (either one on disk without the other is at worst a
        # leak), so one fsync makes both durable before anything points at them
        rc.write_blocks()
        if self.data_hf is not hf:
            self.data_hf.fsync()
        hf.fsync()
        self._data_written = False
        # 3. refcount table
        if rc.table_dirty:
            moved = rc.write_table()
            hf.fsync()
            if moved:
                self.header = self.header.replace(
                    refcount_table_offset=rc.table_offset,
                    refcount_table_clusters=rc.table_clusters,
                )
                self._write_header()
                hf.fsync()
                rc.table_switched()
        # 4. L2 tables
        if self.dirty_l2:
            for off in sorted(self.dirty_l2):
                hf.pwrite(entries.encode_u64_table(self._l2_cache[off]), off)
            self.dirty_l2.clear()
            hf.fsync()
        # 5. L1 table
        if self.l1_dirty:
            hf.pwrite(entries.encode_u64_table(self.l1), self.header.l1_table_offset)
            hf.fsync()
            self.l1_dirty = False
            if self.l1_moved_from is not None:
                self._write_header()
                hf.fsync()
                off, size = self.l1_moved_from
                if size:
                    rc.free_later(off, (size * 8 + self.cluster_size - 1) >> self.cluster_bits)
                self.l1_moved_from = None
        # 6. header
        if self.header_dirty:
            self._write_header()
            hf.fsync()
        # 7. deferred frees
        if rc.pending_free:
            # a freed cluster may be the compressed tail: never pack into it again
            self._cpos = self._cend = 0
            rc.apply_pending_frees()
            if rc.write_blocks():
                hf.fsync()
        self.file_size = max(self.file_size, hf.size())

    # ------------------------------------------------------------------ chain helpers
    def prepare_write(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Allocate private host clusters for a cluster-aligned guest range.

        Returns ``(guest_offset, host_offset, length)`` runs (host offsets in the
        data file) that the caller must fill with data before the next flush.  The
        mapping is changed in memory only; ``flush()`` makes it durable after the
        data (ordering rule 1 before 4).
        """
        self._check_writable()
        check_range(self.path, offset, length, self.virtual_size)
        cs, cb = self.cluster_size, self.cluster_bits
        if offset & (cs - 1) or (length & (cs - 1) and offset + length != self.virtual_size):
            raise ValueError("prepare_write needs a cluster-aligned range")
        self._begin_write()
        self._mark_dirty(offset, length)
        out: list[tuple[int, int, int]] = []
        end = offset + length
        pos = offset
        rc = self.refcounts
        step = 2 if self.extended_l2 else 1
        l2_mask = self.l2_entries - 1
        while pos < end:
            # one L2 table at a time: the clusters of [pos, seg_end) share it
            cluster = pos >> cb
            table, l2_off = self._l2_for_write(cluster)
            seg_end = min(end, ((cluster | l2_mask) + 1) << cb)
            count = (seg_end - pos + cs - 1) >> cb
            i0 = cluster & l2_mask
            self.dirty_l2.add(l2_off)
            if self.has_data_file:
                hosts = [pos + (k << cb) for k in range(count)]
            else:
                hosts = [0] * count
                k = 0
                while k < count:
                    e = table[(i0 + k) * step]
                    host = e & OFFSET_MASK
                    if host and e & COPIED and not e & spec.QCOW_OFLAG_COMPRESSED:
                        hosts[k] = host  # private already: overwrite in place
                        k += 1
                        continue
                    # a run of clusters needing new host clusters
                    j = k + 1
                    while j < count:
                        e2 = table[(i0 + j) * step]
                        if e2 & OFFSET_MASK and e2 & COPIED and not e2 & spec.QCOW_OFLAG_COMPRESSED:
                            break
                        j += 1
                    while k < j:
                        # contiguous when nothing below the used area is free
                        # (alloc(n) would rescan the file for a run of n otherwise)
                        n_alloc = j - k if rc.free_hint >= rc.end_cluster else 1
                        host = rc.alloc(n_alloc)
                        for m in range(n_alloc):
                            self._free_entry_allocation(table[(i0 + k + m) * step])
                            hosts[k + m] = host + (m << cb)
                        k += n_alloc
            for k, host in enumerate(hosts):
                if step == 2:
                    table[2 * (i0 + k)] = host | COPIED
                    table[2 * (i0 + k) + 1] = 0xFFFFFFFF
                else:
                    table[i0 + k] = host | COPIED
                g = pos + (k << cb)
                n = min(cs, end - g)
                if out and out[-1][0] + out[-1][2] == g and out[-1][1] + out[-1][2] == host:
                    gg, h, ln = out[-1]
                    out[-1] = (gg, h, ln + n)
                else:
                    out.append((g, host, n))
            pos = seg_end
        self._note_alloc()
        self._data_written = True
        return out


    def make_empty(self) -> None:
        """Drop every cluster of the active layer (qemu-img commit's 'empty the top').

        Sets no bitmap bits: it is only used right after a commit, when the
        backing file reads what this layer did, so the guest content does not
        change (qemu-img commit leaves the top's bitmaps alone too)."""
        self._check_writable()
        self._begin_write()
        rc = self.refcounts
        for l1_index, l1e in enumerate(self.l1):
            l2_off = l1e & spec.L1E_OFFSET_MASK
            if not l2_off:
                continue
            table = self.l2_table(l2_off)
            # unlink the table before queueing any free: if this loop is interrupted
            # (KeyboardInterrupt) and close() flushes, the worst case is a leak,
            # never a freed cluster that an L2 entry still points at
            self.l1[l1_index] = 0
            self.l1_dirty = True
            self.dirty_l2.discard(l2_off)
            self._l2_cache.pop(l2_off, None)
            step = 2 if self.extended_l2 else 1
            for e in table[::step] if step == 2 else table:
                if e:
                    self._free_entry_allocation(e)
            rc.free_later(l2_off)
        self.flush()


    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the backing file name and format extension (one header write).

        The name is validated first (length, no protocol prefix QEMU would misread).
        """
        from .chain import validate_backing_name
        from .header import with_extension

        self._check_writable()
        if name:
            try:
                validate_backing_name(self.path, name)
            except QcowError as e:
                raise OperationError(self.path, f"cannot store backing name: {e.message}") from None
        hdr = with_extension(
            self.header,
            spec.ExtType.BACKING_FORMAT,
            fmt.encode() if (fmt and name) else None,
        )
        hdr = hdr.replace(backing_file=name or None)
        try:
            build_cluster0(hdr)
        except FormatError as e:
            raise OperationError(self.path, f"cannot store backing name: {e.message}") from None
        self.flush()
        self.header = hdr
        self._write_header()
        self.hf.fsync()


def require_writable_features(img) -> None:
    h = img.header
    if h.crypt_method:
        raise UnsupportedFeatureError(img.path, "cannot write encrypted images")

