"""Refcount table and blocks: lookups, cluster allocation, deferred freeing.

Crash-consistency rules (DESIGN.md section 4, QCOW2-NOTES.md section 4):
- increments reach the disk before any L2/L1 entry that points at the cluster;
- decrements are *deferred*: they are applied only after the references that
  were dropped are durable, so a freed cluster is never reused while an on-disk
  table still points at it;
- the refcount table is written after the blocks it points at; when it has to
  grow it is rewritten elsewhere and switched in the header (copy-then-switch).
"""

from __future__ import annotations

from array import array

from . import entries, spec
from .cache import TableCache
from .entries import RefcountBlock
from .errors import CorruptImageError, OperationError

#: Refcount blocks kept in memory (least recently used clean ones dropped) and
#: the number of dirty blocks past which the writer flushes at a safe point.
CACHE_BLOCKS = 64
MAX_DIRTY_BLOCKS = 256


class Refcounts:
    def __init__(self, img) -> None:
        self.img = img
        h = img.header
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.order = h.refcount_order
        self.entries_per_block = self.cluster_size * 8 // (1 << self.order)
        self.max = entries.refcount_max(self.order)
        self.table_offset = h.refcount_table_offset
        self.table_clusters = h.refcount_table_clusters
        raw = img.hf.pread(self.table_clusters * self.cluster_size, self.table_offset)
        self.table = entries.decode_u64_table(raw)
        #: block index -> RefcountBlock; dirty blocks stay until write_blocks
        self.blocks = TableCache(CACHE_BLOCKS, MAX_DIRTY_BLOCKS)
        self._cached = self.blocks.tables
        self.table_dirty = False
        self.old_table: tuple[int, int] | None = None  # (offset, clusters) to free after switch
        self.pending_free: list[tuple[int, int]] = []  # (cluster index, count)
        self._reserved: set[int] = set()
        self.free_hint = 0
        self.end_cluster = (img.file_size + self.cluster_size - 1) >> self.cluster_bits
        if img.hf.is_block_device:
            # a device's size says nothing about the image: the used area ends
            # after the last cluster with a nonzero refcount
            self.end_cluster = self._last_used() + 1

    def _last_used(self) -> int:
        for bi in range(len(self.table) - 1, -1, -1):
            if not entries.reftable_block_offset(self.table[bi]):
                continue
            blk = self._block(bi)
            for i in range(self.entries_per_block - 1, -1, -1):
                if blk.get(i):
                    return bi * self.entries_per_block + i
        return 0

    # -- lookups ---------------------------------------------------------------------
    def _block(self, block_index: int, create: bool = False) -> RefcountBlock | None:
        # the cache's dict, looked up directly (the allocation hot path): a hit
        # does not refresh the block's place, so clean blocks leave the cache in
        # the order they were read (they are read again when needed)
        blk = self._cached.get(block_index)
        if blk is not None:
            return blk
        if block_index >= len(self.table):
            if not create:
                return None
            self._grow_table(block_index + 1)
            blk = self.blocks.get(block_index)
            if blk is not None:  # growing the table created it
                return blk
        off = entries.reftable_block_offset(self.table[block_index])
        if off:
            if off % self.cluster_size or off + self.cluster_size > self.img.hf.size():
                raise CorruptImageError(
                    self.img.path, f"refcount block offset {off:#x} is invalid"
                )
            blk = RefcountBlock(self.img.hf.pread(self.cluster_size, off), self.order)
            self.blocks.put(block_index, blk)
            return blk
        if not create:
            return None
        # A new block: registered in memory first so that allocating its own
        # cluster can find it (a block usually describes itself).
        blk = RefcountBlock(bytes(self.cluster_size), self.order)
        self.blocks.put(block_index, blk, dirty=True)
        host = self.alloc(1)
        self.table[block_index] = host
        self.table_dirty = True
        return blk

    def get(self, cluster: int) -> int:
        bi, i = divmod(cluster, self.entries_per_block)
        blk = self._block(bi)
        return blk.get(i) if blk is not None else 0

    def set(self, cluster: int, value: int) -> None:
        bi, i = divmod(cluster, self.entries_per_block)
        blk = self._block(bi, create=True)
        if value > self.max:
            raise OperationError(
                self.img.path, f"refcount would exceed {self.max} (refcount_bits={1 << self.order})"
            )
        blk.set(i, value)
        self.blocks.dirty.add(bi)  # (mark_dirty, inlined: _block just returned it cached)
        if cluster >= self.end_cluster and value:
            self.end_cluster = cluster + 1

    def incref(self, cluster: int, delta: int = 1) -> int:
        v = self.get(cluster) + delta
        self.set(cluster, v)
        return v

    # -- allocation ------------------------------------------------------------------
    def _is_free(self, cluster: int) -> bool:
        return cluster not in self._reserved and self.get(cluster) == 0

    def _find_free(self, n: int) -> tuple[int, int]:
        """First run of ``n`` free clusters -> (start, first free cluster seen)."""
        c = max(self.free_hint, 1)
        end = self.end_cluster
        first_free = -1
        while c < end:
            if self._is_free(c):
                if first_free < 0:
                    first_free = c
                run = 1
                while run < n and c + run < end and self._is_free(c + run):
                    run += 1
                # a run reaching the end of the used area can extend past it
                if (run == n or c + run >= end) and all(
                    x not in self._reserved for x in range(c, c + n)
                ):
                    return c, first_free
                c += run
            else:
                c = self._skip_used(c, end)
        start = max(end, 1)
        while any(x in self._reserved for x in range(start, start + n)):
            start += 1
        return start, (first_free if first_free >= 0 else start)

    def _skip_used(self, c: int, end: int) -> int:
        """The first cluster after ``c`` (not free) whose refcount is 0, or ``end``:
        the allocation scan skips used clusters a block at a time."""
        per = self.entries_per_block
        c += 1
        while c < end:
            bi, i = divmod(c, per)
            blk = self._block(bi)
            if blk is None:
                return c  # no block: every count in it is 0
            j = _next_zero(blk, i)
            if j >= 0:
                return min(bi * per + j, end)
            c = (bi + 1) * per
        return end

    def alloc(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1); returns the host offset."""
        start, first_free = self._find_free(n)
        clusters = range(start, start + n)
        self._reserved.update(clusters)
        try:
            self._set_ones(start, n)
        finally:
            self._reserved.difference_update(clusters)
        # everything below first_free is in use; a free run shorter than n may
        # lie between first_free and start, so the hint stays there.
        self.free_hint = start + n if first_free >= start else first_free
        self.end_cluster = max(self.end_cluster, start + n)
        return start << self.cluster_bits

    def _set_ones(self, start: int, n: int) -> None:
        """``set(c, 1)`` for the ``n`` clusters from ``start``, a block at a time."""
        end = start + n
        c = start
        per = self.entries_per_block
        while c < end:
            bi, i = divmod(c, per)
            k = min(end - c, per - i)
            blk = self._block(bi, create=True)
            typed = blk._typed
            if typed is not None:  # (the common orders: one slice assignment)
                typed[i : i + k] = array(typed.typecode, [1]) * k
            else:
                for j in range(i, i + k):
                    blk.set(j, 1)
            self.blocks.dirty.add(bi)
            c += k
        self.end_cluster = max(self.end_cluster, end)

    def free_later(self, host_offset: int, nb_clusters: int = 1) -> None:
        """Drop one reference to clusters, once the dropping is durable (flush)."""
        first = host_offset >> self.cluster_bits
        for c in range(first, first + nb_clusters):
            self.pending_free.append((c, 1))

    def free_bytes_later(self, host_offset: int, length: int) -> None:
        """Drop one reference to every cluster the byte range touches (compressed data)."""
        first = host_offset >> self.cluster_bits
        last = (host_offset + length - 1) >> self.cluster_bits
        for c in range(first, last + 1):
            self.pending_free.append((c, 1))

    # -- table growth (copy-then-switch) ---------------------------------------------
    def _grow_table(self, min_entries: int) -> None:
        per_cluster = self.cluster_size // 8
        need = max(min_entries, len(self.table))
        new_clusters = -(-need // per_cluster)
        new_clusters = max(new_clusters + new_clusters // 2 + 1, self.table_clusters + 1)
        if new_clusters * self.cluster_size > spec.MAX_REFTABLE_SIZE_BYTES:
            raise OperationError(self.img.path, "refcount table would exceed 8 MiB")
        if self.old_table is None:
            self.old_table = (self.table_offset, self.table_clusters)
        else:
            # a table allocated earlier in this batch and never written: free it now
            self.pending_free.extend(
                ((self.table_offset >> self.cluster_bits) + i, 1) for i in range(self.table_clusters)
            )
        self.table.extend(array("Q", bytes(8 * (new_clusters * per_cluster - len(self.table)))))
        self.table_clusters = new_clusters
        self.table_offset = self.alloc(new_clusters)
        self.table_dirty = True

    # -- flush phases ------------------------------------------------------------------
    def write_blocks(self) -> bool:
        hf = self.img.hf
        end = self.end_cluster << self.cluster_bits
        if hf.size() < end:
            hf.truncate(end)
        table = self.table
        return self.blocks.write_dirty(
            lambda bi, blk: hf.pwrite(blk.tobytes(), entries.reftable_block_offset(table[bi]))
        )

    def write_table(self) -> bool:
        """Write the table; True if it moved (the header must be switched)."""
        if not self.table_dirty:
            return False
        self.img.hf.pwrite(entries.encode_u64_table(self.table), self.table_offset)
        self.table_dirty = False
        return self.old_table is not None

    def table_switched(self) -> None:
        if self.old_table is not None:
            off, n = self.old_table
            self.free_later(off, n)
            self.old_table = None

    def apply_pending_frees(self) -> list[int]:
        """Apply deferred decrements; returns clusters whose refcount dropped to 0
        (ascending).  Sorted first, so each refcount block is looked up once per
        run of its clusters (a commit that relocates frees tens of thousands)."""
        freed: list[int] = []
        pending, self.pending_free = self.pending_free, []
        if not pending:
            return freed
        pending.sort()
        per = self.entries_per_block
        cur, blk, typed = -1, None, None
        for c, n in pending:
            bi, i = divmod(c, per)
            if bi != cur:
                cur, blk = bi, self._block(bi)
                typed = blk._typed if blk is not None else None
                if blk is not None:
                    self.blocks.dirty.add(bi)
            v = typed[i] if typed is not None else (blk.get(i) if blk is not None else 0)
            if v < n:
                raise CorruptImageError(
                    self.img.path, f"refcount of cluster {c} would drop below zero"
                )
            if typed is not None:
                typed[i] = v - n
            else:
                blk.set(i, v - n)
            if v == n:
                freed.append(c)
        if freed:
            self.free_hint = min(self.free_hint, freed[0])
        return freed

    @property
    def dirty(self) -> bool:
        return bool(self.blocks.dirty or self.table_dirty or self.pending_free)


def read_refcount_block(img, table_index: int) -> RefcountBlock | None:
    """Refcount block ``table_index`` of ``img`` as stored on disk, read through the
    on-disk refcount table (None: not allocated, all 0).  The read-only view
    (QcowImage.refcount_block); a writable image's current counts are its
    ``Refcounts``."""
    h = img.header
    cs = img.cluster_size
    if table_index < 0 or table_index >= h.refcount_table_clusters * cs // 8:
        return None
    raw = img.hf.pread(8, h.refcount_table_offset + table_index * 8)
    block_offset = entries.reftable_block_offset(int.from_bytes(raw, "big"))
    if not block_offset:
        return None
    if block_offset % cs or block_offset + cs > img.file_size:
        raise CorruptImageError(
            img.path,
            f"refcount block offset {block_offset:#x} (refcount table index {table_index}) is "
            + ("unaligned" if block_offset % cs else "beyond the end of the file"),
        )
    return RefcountBlock(img.hf.pread(cs, block_offset), h.refcount_order)


def _next_zero(blk, i: int) -> int:
    """Index of the first 0 count at or after ``i`` in the refcount block, or -1."""
    typed = blk._typed  # (the array of counts, when the order has a typecode)
    if typed is not None:
        try:
            return typed.index(0, i)
        except ValueError:
            return -1
    for j in range(i, blk.count):
        if blk.get(j) == 0:
            return j
    return -1
