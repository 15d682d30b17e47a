"""The consistency scan of a qcow2 image, as ``qemu-img check`` reports it.

The scan rebuilds the refcount of every host cluster from every reference
(QEMU block/qcow2-refcount.c ``calculate_refcounts``): cluster 0, the active L1
table, every L2 table reached from the active L1 and from each internal
snapshot's L1 (once per reference), data clusters (normal and zero with an
allocation; none with an external data file), every host cluster a compressed
cluster's byte range touches, the snapshot table and snapshot L1 tables, the
refcount table and refcount blocks, and the bitmap directory, bitmap tables
and bitmap data clusters (only when the autoclear "bitmaps" bit says they are
consistent: otherwise qemu ignores them, so their clusters count as leaks).
That in-memory refcount table (QEMU's "IMRT") is compared with the stored
refcounts: stored > expected is a leak, stored < expected a corruption; then
the COPIED flags of the active L1/L2 entries are compared with the refcounts
(``check_oflag_copied``).  Counts and messages follow qemu-img 7.2 so that
``pyqcow check --output=json`` prints the same JSON.

``Scanner`` only reads; where QEMU repairs in the middle of the scan (``fix``
set), it calls the hooks that ``pyqcow.repair.Repairer`` implements.
``scan(img)`` is the read-only check of an open image.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from . import entries, spec
from .check_result import CheckFailed, CheckResult, Fatal, Res, collector, result
from .entries import ClusterType
from .errors import QcowError
from .walk import nonzero_entries, prefetch_l2_tables, read_snapshots, snapshot_entry_end

__all__ = ["CheckFailed", "CheckResult", "Scanner", "scan"]

FIX_LEAKS = 1
FIX_ERRORS = 2
REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

_UNALLOCATED = ClusterType.UNALLOCATED
_ZERO_ALLOC = ClusterType.ZERO_ALLOC
_NORMAL = ClusterType.NORMAL
_COMPRESSED = ClusterType.COMPRESSED
# check_oflag_copied reuses at most this many data entries that the scan of the
# active L2 tables kept (8 bytes each: 32 MiB), and reads the other tables again
_COPIED_CACHE_ENTRIES = 4 << 20


class RefcountReadError(Exception):
    pass


class Scanner:
    """One pass over an open image (QEMU's qcow2_check_refcounts and helpers)."""

    def __init__(self, img, log: Callable[[str], None]) -> None:
        self.img = img
        self.hf = img.hf
        self.log = log
        h = img.header
        self.cb = h.cluster_bits
        self.cs = 1 << self.cb
        self.order = h.refcount_order
        self.refcount_max = entries.refcount_max(self.order)
        self.block_bits = self.cb + 3 - self.order
        self.block_entries = 1 << self.block_bits
        self.extended = h.extended_l2
        self.l2_entries = self.cs // (16 if self.extended else 8)
        self.has_data_file = h.has_data_file
        self.res = Res()
        self.imrt = array("Q")
        #: active L2 offset -> its data entries (NORMAL / ZERO_ALLOC), kept by a
        #: scan that repairs nothing for check_oflag_copied, which then reads no
        #: L2 table a second time (None: not kept)
        self.copied_cache: dict[int, array] = {}
        self.copied_budget = _COPIED_CACHE_ENTRIES
        self.load_metadata()

    # -- metadata --------------------------------------------------------------
    def load_metadata(self) -> None:
        h = self.img.header
        self.img.file_size = self.hf.size()
        self.reftable_offset = h.refcount_table_offset
        n = h.refcount_table_clusters * self.cs // 8
        self.reftable = entries.decode_u64_table(self.hf.pread(n * 8, self.reftable_offset))
        self.blocks: dict[int, entries.RefcountBlock] = {}
        self.dirty_blocks: set[int] = set()
        self.snapshots = read_snapshots(self.img)
        if self.snapshots:
            self.snapshots_size = snapshot_entry_end(self.snapshots[-1]) - h.snapshots_offset
        else:
            self.snapshots_size = 0
        ext = h.bitmaps
        self.bitmaps_consistent = bool(
            ext is not None and h.autoclear_features & spec.Autoclear.BITMAPS and ext.nb_bitmaps
        )

    def file_length(self) -> int:
        return self.hf.size()

    def size_to_clusters(self, size: int) -> int:
        return (size + self.cs - 1) >> self.cb

    # -- stored refcounts (qcow2_get_refcount / update_refcount) ----------------
    def _stored_block(self, index: int) -> entries.RefcountBlock | None:
        blk = self.blocks.get(index)
        if blk is not None:
            return blk
        if index >= len(self.reftable):
            return None
        offset = entries.reftable_block_offset(self.reftable[index])
        if not offset:
            return None
        if offset & (self.cs - 1):
            raise RefcountReadError(
                f"Refblock offset {offset:#x} unaligned (reftable index: {index:#x})"
            )
        if offset > (1 << 63) - 1 - self.cs:  # os.pread cannot even seek there
            raise RefcountReadError(
                f"Refblock offset {offset:#x} is outside the image (reftable index: {index:#x})"
            )
        blk = entries.RefcountBlock(self.hf.pread(self.cs, offset), self.order)
        self.blocks[index] = blk
        return blk

    def stored(self, cluster: int) -> int:
        blk = self._stored_block(cluster >> self.block_bits)
        return blk.get(cluster & (self.block_entries - 1)) if blk is not None else 0

    # -- repair hooks (pyqcow.repair.Repairer; a scan never calls them) ---------
    def update_stored(self, cluster: int, value: int) -> bool:
        raise NotImplementedError("repairing needs pyqcow.repair.Repairer")

    def write_dirty_blocks(self) -> None:
        """Write the refcount blocks a repair changed (a scan changes none)."""

    def fix_l2_entry_by_zero(self, l2_offset: int, table: array, i: int, active: bool) -> bool:
        raise NotImplementedError("repairing needs pyqcow.repair.Repairer")

    def fix_refblock_outside(self, offset: int) -> bool:
        raise NotImplementedError("repairing needs pyqcow.repair.Repairer")

    def fix_l1_copied(self, l1: array, i: int, l1e: int) -> None:
        raise NotImplementedError("repairing needs pyqcow.repair.Repairer")

    def write_l2_copied(self, l2_offset: int, table: array) -> bool:
        raise NotImplementedError("repairing needs pyqcow.repair.Repairer")

    # -- the in-memory refcount table (qcow2_inc_refcounts_imrt) ----------------
    def grow_imrt(self, n: int) -> None:
        if n > len(self.imrt):
            self.imrt.extend(array("Q", bytes(8 * (n - len(self.imrt)))))

    def inc(self, offset: int, size: int) -> None:
        if size <= 0:
            return
        file_len = self.file_length()
        if offset + size - file_len >= self.cs:
            self.log(
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset 0x{offset:x} size 0x{size:x}"
            )
            self.res.corruptions += 1
            return
        first = offset >> self.cb
        last = (offset + size - 1) >> self.cb
        if last >= len(self.imrt):
            self.grow_imrt(last + 1)
        imrt = self.imrt
        for k in range(first, last + 1):
            v = imrt[k]
            if v >= self.refcount_max:
                self.log(f"ERROR: overflow cluster offset=0x{k << self.cb:x}")
                self.log(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img "
                    "convert to create a clean copy if the image cannot be opened for writing"
                )
                self.res.corruptions += 1
                continue
            imrt[k] = v + 1

    def inc_cluster(self, offset: int) -> None:
        """inc(offset, cluster_size) for a cluster-aligned offset inside the file (fast path)."""
        k = offset >> self.cb
        if k < len(self.imrt) and not offset & (self.cs - 1):
            v = self.imrt[k]
            if v < self.refcount_max:
                self.imrt[k] = v + 1
                return
        self.inc(offset, self.cs)

    def read_l2(self, l2_offset: int) -> array:
        return entries.decode_u64_table(self.hf.pread(self.cs, l2_offset))

    # -- L1 / L2 (check_refcounts_l1 / check_refcounts_l2) --------------------------
    def check_l1(self, l1_offset: int, l1_size: int, active: bool, fix: int) -> None:
        if not l1_size:
            return
        self.inc(l1_offset, l1_size * 8)
        l1 = entries.decode_u64_table(self.hf.pread(l1_size * 8, l1_offset))
        prefetch_l2_tables(self.img, l1)
        for e in l1:
            if not e:
                continue
            if entries.l1_reserved_bits(e):
                self.log(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.res.corruptions += 1
            l2_offset = entries.l1_l2_offset(e)
            self.inc_cluster(l2_offset)
            if l2_offset & (self.cs - 1):
                self.log(
                    f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                    "L1 entry corrupted"
                )
                self.res.corruptions += 1
            self.check_l2(l2_offset, active, fix)

    def check_l2(self, l2_offset: int, active: bool, fix: int) -> None:
        res = self.res
        cs = self.cs
        table = self.read_l2(l2_offset)
        ext = self.extended
        step = 2 if ext else 1
        next_contiguous = 0
        data_file = self.has_data_file
        imrt = self.imrt  # grows in place (inc), never replaced during the walk
        decode = entries.l2_decode
        cb = self.cb
        rc_max = self.refcount_max
        kept = self._keep_for_copied(l2_offset, active, fix)
        for i in nonzero_entries(table, ext):
            e = table[i * step]
            bm = table[i * step + 1] if ext else 0
            t, offset, reserved, copied = decode(e, ext, data_file)
            if reserved:  # (never for a compressed entry)
                self.log(f"ERROR found l2 entry with reserved bits set: {e:x}")
                res.corruptions += 1
            if t == _COMPRESSED:
                self.count_compressed(i, e, bm, copied, active)
            elif t in (_NORMAL, _ZERO_ALLOC):
                if bm and entries.subcluster_conflict(bm):
                    res.corruptions += 1
                    self.log(
                        f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                        "allocation bitmap"
                    )
                if offset & (cs - 1):
                    res.corruptions += 1
                    contains_data = (
                        bool(entries.subclusters_allocated(bm)) if ext
                        else not entries.has_zero_flag(e)
                    )
                    if not contains_data:
                        self.log(
                            f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} offset={offset:x}: "
                            "Preallocated cluster is not properly aligned; L2 entry corrupted."
                        )
                        if fix & FIX_ERRORS and self.fix_l2_entry_by_zero(
                            l2_offset, table, i, active
                        ):
                            continue
                    else:
                        self.log(
                            f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                            "L2 entry corrupted."
                        )
                if kept is not None:
                    kept.append(e)
                if active:
                    res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = offset + cs
                if not data_file:
                    # inc_cluster, inlined: the hot path of a large image
                    k = offset >> cb
                    if k < len(imrt) and not offset & (cs - 1) and imrt[k] < rc_max:
                        imrt[k] += 1
                    else:
                        self.inc(offset, cs)
            elif t == _UNALLOCATED and bm and entries.subclusters_allocated(bm):
                res.corruptions += 1
                self.log("ERROR: Unallocated cluster has non-zero subcluster allocation map")
        if kept is not None:
            self.copied_budget -= len(kept)

    def _keep_for_copied(self, l2_offset: int, active: bool, fix: int) -> array | None:
        """The array check_l2 fills with the data entries of an active table (for
        check_oflag_copied), or None: not kept (a repair, or over the budget)."""
        cache = self.copied_cache
        if not active or fix or l2_offset in cache or self.copied_budget < self.l2_entries:
            return None  # (over the budget: the second pass reads the table again)
        kept = cache[l2_offset] = array("Q")
        return kept

    def count_compressed(self, i: int, e: int, bm: int, copied: bool, active: bool) -> None:
        """L2 entry ``i``, compressed: check it, count the clusters its bytes touch."""
        res = self.res
        coffset, csize = entries.decode_compressed(e, self.cb)
        if copied:
            self.log(
                f"ERROR: coffset=0x{coffset:x}: copied flag must "
                "never be set for compressed clusters"
            )
            e = entries.with_copied(e, False)
            res.corruptions += 1
        if self.has_data_file:
            self.log(f"ERROR compressed cluster {i} with data file, entry=0x{e:x}")
            res.corruptions += 1
            return
        if bm:
            self.log(
                f"ERROR compressed cluster {i} with non-zero subcluster allocation "
                f"bitmap, entry=0x{e:x}"
            )
            res.corruptions += 1
            return
        self.inc(coffset, csize)
        if active:
            res.allocated_clusters += 1
            res.compressed_clusters += 1
            res.fragmented_clusters += 1

    def check_refblocks(self, fix: int) -> bool:
        rebuild = False
        res = self.res
        for i, raw in enumerate(self.reftable):
            if not raw:
                continue  # no refcount block (nothing below applies to a zero entry)
            offset = entries.reftable_block_offset(raw)
            cluster = offset >> self.cb
            if entries.reftable_reserved_bits(raw):
                self.log(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset & (self.cs - 1):
                self.log(
                    f"ERROR refcount block {i} is not cluster aligned; refcount table entry "
                    "corrupted"
                )
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= len(self.imrt):
                res.corruptions += 1
                self.log(
                    f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} refcount block {i} is "
                    "outside image"
                )
                if fix & FIX_ERRORS and not self.fix_refblock_outside(offset):
                    rebuild = True
                continue
            if offset:
                self.inc(offset, self.cs)
                if self.imrt[cluster] != 1:
                    self.log(f"ERROR refcount block {i} refcount={self.imrt[cluster]}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    # -- bitmaps (qcow2_check_bitmaps_refcounts) --------------------------------------
    def check_bitmaps(self) -> None:
        if not self.bitmaps_consistent:
            return
        ext = self.img.header.bitmaps
        self.inc(ext.bitmap_directory_offset, ext.bitmap_directory_size)
        from .bitmap_directory import read_bitmap_directory

        try:
            bitmaps = read_bitmap_directory(self.img) or []
        except QcowError as e:
            self.log(f"ERROR: {e.message}")
            self.res.corruptions += 1
            raise Fatal("Invalid argument") from None
        for bm in bitmaps:
            size = bm.bitmap_table_size * 8
            self.inc(bm.bitmap_table_offset, size)
            if bm.bitmap_table_offset + size > self.file_length():
                self.res.corruptions += 1
                raise Fatal("Invalid argument")
            table = entries.decode_u64_table(self.hf.pread(size, bm.bitmap_table_offset))
            for e in table:
                if entries.bitmap_table_entry_invalid(e, self.cs):
                    self.res.corruptions += 1
                    continue
                offset = entries.bitmap_data_offset(e)
                if offset:
                    self.inc(offset, self.cs)

    # -- all references (calculate_refcounts) ----------------------------------------
    def calculate(self, fix: int) -> bool:
        h = self.img.header
        self.imrt = array("Q", bytes(8 * self.size_to_clusters(self.file_length())))
        self.copied_cache = {}
        self.copied_budget = _COPIED_CACHE_ENTRIES
        self.inc(0, self.cs)
        self.check_l1(h.l1_table_offset, h.l1_size, True, fix)
        if self.has_data_file and self.snapshots:
            self.log(f"ERROR {len(self.snapshots)} snapshots in image with data file")
            self.res.corruptions += 1
        for sn in self.snapshots:
            if sn.l1_table_offset & (self.cs - 1):
                self.log(
                    f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: "
                    "L1 table is not cluster aligned; snapshot table entry corrupted"
                )
                self.res.corruptions += 1
                continue
            if sn.l1_size > spec.MAX_L1_SIZE_BYTES // 8:
                self.log(
                    f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={sn.l1_size:#x}: "
                    "L1 table is too large; snapshot table entry corrupted"
                )
                self.res.corruptions += 1
                continue
            self.check_l1(sn.l1_table_offset, sn.l1_size, False, fix)
        self.inc(h.snapshots_offset, self.snapshots_size)
        self.inc(self.reftable_offset, len(self.reftable) * 8)
        self.check_bitmaps()
        return self.check_refblocks(fix)

    # -- comparison (compare_refcounts) ------------------------------------------------
    def compare(self, fix: int) -> tuple[bool, int]:
        """-> (rebuild needed, highest cluster in use)."""
        res = self.res
        rebuild = False
        highest = 0
        imrt = self.imrt
        nb = len(imrt)
        per = self.block_entries
        for bi in range((nb + per - 1) // per):
            start = bi * per
            n = min(per, nb - start)
            expected = imrt[start : start + n].tolist()
            try:
                blk = self._stored_block(bi)
            except RefcountReadError as e:
                for i in range(start, start + n):
                    self.log(f"Can't get refcount for cluster {i}: Input/output error")
                    res.check_errors += 1
                self.log(f"qcow2: Image is corrupt: {e}")
                continue
            stored = blk.values()[:n] if blk is not None else [0] * n
            if stored == expected:
                for j in range(n - 1, -1, -1):
                    if stored[j]:
                        highest = start + j
                        break
                continue
            for j in range(n):
                r1, r2 = stored[j], expected[j]
                i = start + j
                if r1 or r2:
                    highest = i
                if r1 == r2:
                    continue
                fixing = None
                if r1 == 0:
                    rebuild = True
                elif r1 > r2 and fix & FIX_LEAKS:
                    fixing = "leaks_fixed"
                elif r1 < r2 and fix & FIX_ERRORS:
                    fixing = "corruptions_fixed"
                word = "Repairing" if fixing else ("ERROR" if r1 < r2 else "Leaked")
                self.log(f"{word} cluster {i} refcount={r1} reference={r2}")
                if fixing and self.update_stored(i, r2):
                    setattr(res, fixing, getattr(res, fixing) + 1)
                    continue
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        self.write_dirty_blocks()
        return rebuild, highest

    # -- rebuild (rebuild_refcount_structure) ------------------------------------------
    def check_oflag_copied(self, fix: int) -> None:
        res = self.res
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        h = self.img.header
        if not h.l1_size:
            return
        l1 = entries.decode_u64_table(self.hf.pread(h.l1_size * 8, h.l1_table_offset))
        word = "Repairing" if repair else "ERROR"
        ext, data_file = self.extended, self.has_data_file
        step = 2 if ext else 1
        decode = entries.l2_decode
        for i, l1e in enumerate(l1):
            l2_offset = entries.l1_l2_offset(l1e)
            if not l2_offset:
                continue
            try:
                refcount = self.stored(l2_offset >> self.cb)
            except RefcountReadError:
                continue
            if (refcount == 1) != entries.is_copied(l1e):
                res.corruptions += 1
                self.log(
                    f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} "
                    f"refcount={refcount}"
                )
                if repair:
                    self.fix_l1_copied(l1, i, entries.with_copied(l1e, refcount == 1))
            kept = None if fix else self.copied_cache.get(l2_offset)
            if kept is not None:  # the data entries the scan kept: nothing to repair
                self._check_copied_kept(kept, word)
                continue
            table = self.read_l2(l2_offset)
            l2_dirty = 0
            for j in nonzero_entries(table, ext):
                e = table[j * step]
                if not e:
                    continue
                t, offset, _, copied = decode(e, ext, data_file)
                if t not in (_NORMAL, _ZERO_ALLOC):
                    continue
                refcount = self._copied_wrong(offset, copied)
                if refcount is not None:
                    res.corruptions += 1
                    self.log(
                        f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={refcount}"
                    )
                    if repair:
                        table[j * step] = entries.with_copied(e, refcount == 1)
                        l2_dirty += 1
            if l2_dirty:
                if not self.write_l2_copied(l2_offset, table):
                    return
                res.corruptions -= l2_dirty
                res.corruptions_fixed += l2_dirty

    def _check_copied_kept(self, kept: array, word: str) -> None:
        """check_oflag_copied's test of the data entries ``kept`` (no repair)."""
        res = self.res
        ext, data_file = self.extended, self.has_data_file
        decode = entries.l2_decode
        for e in kept:
            _, offset, _, copied = decode(e, ext, data_file)
            refcount = self._copied_wrong(offset, copied)
            if refcount is not None:
                res.corruptions += 1
                self.log(f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={refcount}")

    def _copied_wrong(self, offset: int, copied: bool) -> int | None:
        """The refcount of the data cluster at ``offset`` when its OFLAG_COPIED bit
        (``copied``) disagrees with it; None when they agree or the refcount cannot
        be read (an external data file's clusters count 1)."""
        if self.has_data_file:
            refcount = 1
        else:
            try:
                refcount = self.stored(offset >> self.cb)
            except RefcountReadError:
                return None
        return None if (refcount == 1) == copied else refcount

    # -- the whole refcount check (qcow2_check_refcounts, without repair) ---------
    def scan_refcounts(self) -> Res:
        res = self.res
        total_bytes = -(-self.img.header.size // 512) * 512
        res.total_clusters = self.size_to_clusters(total_bytes)
        self.calculate(0)
        _, highest = self.compare(0)
        self.check_oflag_copied(0)
        res = self.res
        res.image_end_offset = (highest + 1) * self.cs
        return res


def scan(img, filename: str | None = None, log: Callable[[str], None] | None = None) -> CheckResult:
    """``qemu-img check`` without repair, on an open QcowImage (read-only is enough).

    Raises CheckFailed when the check cannot complete.
    """
    messages, emit = collector(log)
    try:
        res = Scanner(img, emit).scan_refcounts()
    except Fatal as e:
        raise CheckFailed(img.path, f"Check failed: {e}", messages) from None
    return result(img.path if filename is None else filename, res, messages)
