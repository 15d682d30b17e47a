"""Consistency check and repair of qcow2 images, as ``qemu-img check`` does it.

The check rebuilds the refcount of every host cluster from every reference
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
(``check_oflag_copied``).  Counts, messages and the repair strategy follow
qemu-img 7.2 so that ``pyqcow check --output=json`` prints the same JSON.

Repair (``repair="leaks"`` / ``"all"``):

- leaks are fixed by lowering the stored refcount to the expected one;
- a refcount that is too low but not zero is raised (``all``);
- a stored refcount of 0 for a referenced cluster, or a broken refcount block,
  makes ``all`` rebuild the whole refcount structure the way QEMU's
  ``rebuild_refcount_structure`` does: new refcount blocks (slices of the
  in-memory table) and a new refcount table are written into clusters nothing
  references, made durable, and only then does the header switch to them (one
  pwrite, fsync).  A crash before the switch leaves the old structure in
  place; after it the old structure is merely leaked, and the leak pass that
  follows frees it (DESIGN.md section 4: leaks at worst);
- COPIED flags are recomputed from the refcounts (``all``, or ``leaks`` when
  nothing else is wrong);
- when no corruption is left, the dirty and corrupt bits are cleared.

``repair_dirty(img)`` is what a read-write open of a dirty (lazy refcounts)
image calls: a full repair on the open image, which leaves its in-memory state
consistent with the disk.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import itertools
import operator
import os
import re
import warnings
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from . import entries, layout, spec
from ._callmod import make_callable
from .errors import CorruptImageError, OperationError, QcowError
from .header import build_cluster0, with_extension

__all__ = ["CheckResult", "check", "repair_dirty"]

FIX_LEAKS = 1
FIX_ERRORS = 2
_REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

COPIED = spec.QCOW_OFLAG_COPIED
COMPRESSED = spec.QCOW_OFLAG_COMPRESSED
ZERO = spec.QCOW_OFLAG_ZERO
L1E_OFFSET_MASK = spec.L1E_OFFSET_MASK
L1E_RESERVED_MASK = spec.L1E_RESERVED_MASK
L2E_OFFSET_MASK = spec.L2E_OFFSET_MASK
L2E_STD_RESERVED_MASK = spec.L2E_RESERVED_MASK
REFT_OFFSET_MASK = spec.REFT_OFFSET_MASK
REFT_RESERVED_MASK = 0x1FF
L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
# bitmap table entries (qcow2.rst "Bitmaps"; block/qcow2-bitmap.c)
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1

# QEMU's QCow2ClusterType (qcow2.h qcow2_get_cluster_type)
_UNALLOCATED, _ZERO_PLAIN, _ZERO_ALLOC, _NORMAL, _COMPRESSED = range(5)

# Set while check() opens an image read-write itself: the open must not run the
# automatic dirty-image repair (QEMU skips it for BDRV_O_CHECK opens).
_opening_for_check: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pyqcow_opening_for_check", default=False
)


# ---------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------
@dataclass
class CheckResult:
    """What qemu-img check reports (QAPI ``ImageCheck``), plus the messages."""

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    image_end_offset: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    # the lines qemu-img prints on stderr while checking (and repairing)
    messages: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors)

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit status: 1 check errors, 2 corruptions, 3 leaks only, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def as_qemu_json(self) -> dict:
        """The ImageCheck object of ``qemu-img check --output=json``.

        qemu-img's collect_image_check sets every optional member only when it
        is non-zero (``has_x = x != 0``); filename, format and check-errors are
        always present.  Keys are inserted in QAPI declaration order (the order
        pyqcow.cli.output.qemu_json needs to reproduce qemu's QDict order).
        """
        d: dict = {
            "filename": self.filename,
            "format": self.format,
            "check-errors": self.check_errors,
        }
        for key, value in (
            ("image-end-offset", self.image_end_offset),
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
            ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        ):
            if value:
                d[key] = value
        return d


class CheckFailed(QcowError):
    """The check could not complete (qemu-img: "Check failed: ...", exit 1)."""

    def __init__(self, path, message: str, messages: list[str]) -> None:
        super().__init__(path, message)
        self.messages = messages


@dataclass
class _Res:
    """QEMU's BdrvCheckResult."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


class _Fatal(Exception):
    """The check stops (QEMU returns -errno): no report, exit status 1."""


class _RefcountReadError(Exception):
    pass


# ---------------------------------------------------------------------------
# The checker: one pass over an open image
# ---------------------------------------------------------------------------
class _Checker:
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
        self.csize_shift = entries.compressed_shift(self.cb)
        self.csize_mask = (1 << (self.cb - 8)) - 1
        self.cluster_offset_mask = (1 << self.csize_shift) - 1
        self.res = _Res()
        self.imrt = array("Q")
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
        self.snapshots = _read_snapshots(self.img)
        if self.snapshots:
            self.snapshots_size = _snapshot_entry_end(self.snapshots[-1]) - h.snapshots_offset
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
        offset = self.reftable[index] & REFT_OFFSET_MASK
        if not offset:
            return None
        if offset & (self.cs - 1):
            raise _RefcountReadError(
                f"Refblock offset {offset:#x} unaligned (reftable index: {index:#x})"
            )
        if offset > (1 << 63) - 1 - self.cs:  # os.pread cannot even seek there
            raise _RefcountReadError(
                f"Refblock offset {offset:#x} is outside the image (reftable index: {index:#x})"
            )
        blk = entries.RefcountBlock(self.hf.pread(self.cs, offset), self.order)
        self.blocks[index] = blk
        return blk

    def stored(self, cluster: int) -> int:
        blk = self._stored_block(cluster >> self.block_bits)
        return blk.get(cluster & (self.block_entries - 1)) if blk is not None else 0

    def update_stored(self, cluster: int, value: int) -> bool:
        index = cluster >> self.block_bits
        try:
            blk = self._stored_block(index)
        except _RefcountReadError:
            return False
        if blk is None or value > self.refcount_max:
            return False
        blk.set(cluster & (self.block_entries - 1), value)
        self.dirty_blocks.add(index)
        return True

    def write_dirty_blocks(self) -> None:
        if not self.dirty_blocks:
            return
        for index in sorted(self.dirty_blocks):
            offset = self.reftable[index] & REFT_OFFSET_MASK
            self.hf.pwrite(self.blocks[index].tobytes(), offset)
        self.dirty_blocks.clear()
        self.hf.fsync()

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

    # -- cluster types -------------------------------------------------------------
    def cluster_type(self, e: int) -> int:
        if e & COMPRESSED:
            return _COMPRESSED
        if e & ZERO and not self.extended:
            return _ZERO_ALLOC if e & L2E_OFFSET_MASK else _ZERO_PLAIN
        if not e & L2E_OFFSET_MASK:
            if self.has_data_file and e & COPIED:
                return _NORMAL
            return _UNALLOCATED
        return _NORMAL

    def parse_compressed(self, e: int) -> tuple[int, int]:
        coffset = e & self.cluster_offset_mask
        nb_csectors = ((e >> self.csize_shift) & self.csize_mask) + 1
        return coffset, nb_csectors * 512 - (coffset & 511)

    def read_l2(self, l2_offset: int) -> array:
        return entries.decode_u64_table(self.hf.pread(self.cs, l2_offset))

    # -- L1 / L2 (check_refcounts_l1 / check_refcounts_l2) --------------------------
    def check_l1(self, l1_offset: int, l1_size: int, active: bool, fix: int) -> None:
        if not l1_size:
            return
        self.inc(l1_offset, l1_size * 8)
        l1 = entries.decode_u64_table(self.hf.pread(l1_size * 8, l1_offset))
        for e in l1:
            if not e:
                continue
            if e & L1E_RESERVED_MASK:
                self.log(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.res.corruptions += 1
            l2_offset = e & L1E_OFFSET_MASK
            self.inc(l2_offset, self.cs)
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
        for i in _nonzero_entries(table, ext):
            e = table[i * step]
            bm = table[i * step + 1] if ext else 0
            t = self.cluster_type(e)
            if t != _COMPRESSED and e & L2E_STD_RESERVED_MASK:
                self.log(f"ERROR found l2 entry with reserved bits set: {e:x}")
                res.corruptions += 1
            if t == _COMPRESSED:
                if e & COPIED:
                    self.log(
                        f"ERROR: coffset=0x{e & self.cluster_offset_mask:x}: copied flag must "
                        "never be set for compressed clusters"
                    )
                    e &= ~COPIED
                    res.corruptions += 1
                if data_file:
                    self.log(f"ERROR compressed cluster {i} with data file, entry=0x{e:x}")
                    res.corruptions += 1
                    continue
                if bm:
                    self.log(
                        f"ERROR compressed cluster {i} with non-zero subcluster allocation "
                        f"bitmap, entry=0x{e:x}"
                    )
                    res.corruptions += 1
                    continue
                coffset, csize = self.parse_compressed(e)
                self.inc(coffset, csize)
                if active:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif t in (_NORMAL, _ZERO_ALLOC):
                offset = e & L2E_OFFSET_MASK
                if (bm >> 32) & bm:
                    res.corruptions += 1
                    self.log(
                        f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                        "allocation bitmap"
                    )
                if offset & (cs - 1):
                    res.corruptions += 1
                    contains_data = bool(bm & L2_BITMAP_ALL_ALLOC) if ext else not e & ZERO
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
                if active:
                    res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = offset + cs
                if not data_file:
                    self.inc_cluster(offset)
            elif t == _UNALLOCATED and bm & L2_BITMAP_ALL_ALLOC:
                res.corruptions += 1
                self.log("ERROR: Unallocated cluster has non-zero subcluster allocation map")

    def fix_l2_entry_by_zero(self, l2_offset: int, table: array, i: int, active: bool) -> bool:
        """Turn a misaligned preallocated zero cluster into a plain zero cluster."""
        if self.extended:
            bm = table[2 * i + 1]
            bm |= bm << 32
            bm &= 0xFFFFFFFF << 32
            table[2 * i] = 0
            table[2 * i + 1] = bm
            size = 16
            data = entries.encode_u64_table(array("Q", [0, bm]))
        else:
            table[i] = ZERO
            size = 8
            data = entries.encode_u64_table(array("Q", [ZERO]))
        entry_offset = l2_offset + i * size
        if self.overlaps_metadata(entry_offset, size, ignore_active_l2=active):
            self.log("ERROR: Overlap check failed")
            self.res.check_errors += 1
            return False
        self.hf.pwrite(data, entry_offset)
        self.hf.fsync()
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        return True

    # -- refcount blocks (check_refblocks) ------------------------------------------
    def check_refblocks(self, fix: int) -> bool:
        rebuild = False
        res = self.res
        for i, raw in enumerate(self.reftable):
            offset = raw & REFT_OFFSET_MASK
            cluster = offset >> self.cb
            if raw & REFT_RESERVED_MASK:
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
                if fix & FIX_ERRORS:
                    try:
                        self.hf.truncate(offset + self.cs)
                        self.hf.fsync()
                    except OSError as e:
                        rebuild = True
                        self.log(f"ERROR could not resize image: {e.strerror}")
                        continue
                    self.grow_imrt(self.size_to_clusters(self.file_length()))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self.inc(offset, self.cs)
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
        from .bitmaps import read_bitmap_directory

        try:
            bitmaps = read_bitmap_directory(self.img) or []
        except QcowError as e:
            self.log(f"ERROR: {e.message}")
            self.res.corruptions += 1
            raise _Fatal("Invalid argument") from None
        for bm in bitmaps:
            size = bm.bitmap_table_size * 8
            self.inc(bm.bitmap_table_offset, size)
            if bm.bitmap_table_offset + size > self.file_length():
                self.res.corruptions += 1
                raise _Fatal("Invalid argument")
            table = entries.decode_u64_table(self.hf.pread(size, bm.bitmap_table_offset))
            for e in table:
                offset = e & BME_TABLE_ENTRY_OFFSET_MASK
                if e & BME_TABLE_ENTRY_RESERVED_MASK or (
                    offset and (e & BME_TABLE_ENTRY_FLAG_ALL_ONES or offset % self.cs)
                ):
                    self.res.corruptions += 1
                    continue
                if offset:
                    self.inc(offset, self.cs)

    # -- all references (calculate_refcounts) ----------------------------------------
    def calculate(self, fix: int) -> bool:
        h = self.img.header
        self.imrt = array("Q", bytes(8 * self.size_to_clusters(self.file_length())))
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
            except _RefcountReadError as e:
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
    def alloc_imrt(self, count: int, first_free: int) -> tuple[int, int]:
        imrt = self.imrt
        cluster = first_free
        first_gap = True
        contiguous = 0
        nb = len(imrt)
        while cluster < nb and contiguous < count:
            if not imrt[cluster]:
                contiguous += 1
                if first_gap:
                    first_free = cluster
                    first_gap = False
            elif contiguous:
                contiguous = 0
            cluster += 1
        if contiguous < count:
            self.grow_imrt(cluster + count - contiguous)
        cluster -= contiguous
        for i in range(count):
            self.imrt[cluster + i] = 1
        return cluster << self.cb, first_free

    def refblock_bytes(self, index: int) -> bytes:
        """Refcount block ``index`` of the new structure: a slice of the in-memory table."""
        start = index << self.block_bits
        blk = entries.RefcountBlock(bytes(self.cs), self.order)
        for j, v in enumerate(self.imrt[start : start + self.block_entries]):
            if v:
                blk.set(j, v)
        return blk.tobytes()

    def write_refblocks(self, first: int, end: int, new_table: list[int]) -> bool:
        grown = False
        first_free = 0
        cluster = first
        while cluster < end:
            if cluster >= len(self.imrt) or not self.imrt[cluster]:
                cluster += 1
                continue
            index = cluster >> self.block_bits
            start = index << self.block_bits
            if index < len(new_table) and new_table[index]:
                offset = new_table[index]
            else:
                # never allocate inside a refcount block already written
                first_free = max(first_free, start)
                offset, first_free = self.alloc_imrt(1, first_free)
                if (offset >> self.cb) >= end:
                    end = (offset >> self.cb) + 1
                if len(new_table) <= index:
                    entries_per_cluster = self.cs // 8
                    want = -(-(index + 1) // entries_per_cluster) * entries_per_cluster
                    new_table.extend([0] * (want - len(new_table)))
                    grown = True
                new_table[index] = offset
            if self.overlaps_metadata(offset, self.cs):
                raise _Fatal("ERROR writing refblock: metadata overlap")
            self.hf.pwrite(self.refblock_bytes(index), offset)
            cluster = start + self.block_entries
        return grown

    def rebuild(self) -> None:
        """Write a fresh refcount structure from the in-memory table and switch to it."""
        self.blocks.clear()
        self.dirty_blocks.clear()
        new_table: list[int] = []
        self.write_refblocks(0, len(self.imrt), new_table)
        while True:
            clusters = self.size_to_clusters(len(new_table) * 8)
            table_offset, _ = self.alloc_imrt(clusters, 0)
            first = table_offset >> self.cb
            if not self.write_refblocks(first, first + clusters, new_table):
                break
        data = entries.encode_u64_table(array("Q", new_table))
        if self.overlaps_metadata(table_offset, len(data)):
            raise _Fatal("ERROR writing reftable: metadata overlap")
        self.hf.pwrite(data, table_offset)
        # Refcount blocks and table are durable before the header points at them.
        self.hf.fsync()
        _write_header(
            self.img,
            self.img.header.replace(
                refcount_table_offset=table_offset,
                refcount_table_clusters=clusters,
            ),
        )
        self.reftable_offset = table_offset
        self.reftable = array("Q", new_table)
        self.blocks.clear()

    # -- metadata overlap (qcow2_check_metadata_overlap, "cached" template) ---------
    def overlaps_metadata(self, offset: int, size: int, ignore_active_l2: bool = False) -> bool:
        if not size:
            return False
        h = self.img.header
        cs = self.cs
        if offset < cs:
            return True
        end = -(-((offset & (cs - 1)) + size) // cs) * cs + (offset & ~(cs - 1))
        offset &= ~(cs - 1)

        def hit(o: int, n: int) -> bool:
            return n > 0 and o < end and offset < o + n

        if h.l1_size and hit(h.l1_table_offset, h.l1_size * 8):
            return True
        if hit(self.reftable_offset, len(self.reftable) * 8):
            return True
        if self.snapshots_size and hit(h.snapshots_offset, self.snapshots_size):
            return True
        for sn in self.snapshots:
            if sn.l1_size and hit(sn.l1_table_offset, sn.l1_size * 8):
                return True
        if not ignore_active_l2 and h.l1_size:
            l1 = entries.decode_u64_table(self.hf.pread(h.l1_size * 8, h.l1_table_offset))
            for e in l1:
                o = e & L1E_OFFSET_MASK
                if o and hit(o, cs):
                    return True
        for raw in self.reftable:
            o = raw & REFT_OFFSET_MASK
            if o and hit(o, cs):
                return True
        ext = h.bitmaps
        return bool(
            ext is not None
            and self.bitmaps_consistent
            and hit(ext.bitmap_directory_offset, ext.bitmap_directory_size)
        )

    # -- COPIED flags (check_oflag_copied) ------------------------------------------
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
        step = 2 if self.extended else 1
        for i, l1e in enumerate(l1):
            l2_offset = l1e & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = self.stored(l2_offset >> self.cb)
            except _RefcountReadError:
                continue
            if (refcount == 1) != bool(l1e & COPIED):
                res.corruptions += 1
                self.log(
                    f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} "
                    f"refcount={refcount}"
                )
                if repair:
                    l1e = l1e | COPIED if refcount == 1 else l1e & ~COPIED
                    l1[i] = l1e
                    self.hf.pwrite(l1e.to_bytes(8, "big"), h.l1_table_offset + 8 * i)
                    self.hf.fsync()
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            table = self.read_l2(l2_offset)
            l2_dirty = 0
            for j in _nonzero_entries(table, self.extended):
                e = table[j * step]
                if not e:
                    continue
                t = self.cluster_type(e)
                if t not in (_NORMAL, _ZERO_ALLOC):
                    continue
                if self.has_data_file:
                    refcount = 1
                else:
                    try:
                        refcount = self.stored((e & L2E_OFFSET_MASK) >> self.cb)
                    except _RefcountReadError:
                        continue
                if (refcount == 1) != bool(e & COPIED):
                    res.corruptions += 1
                    self.log(
                        f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={refcount}"
                    )
                    if repair:
                        table[j * step] = e | COPIED if refcount == 1 else e & ~COPIED
                        l2_dirty += 1
            if l2_dirty:
                if self.overlaps_metadata(l2_offset, self.cs, ignore_active_l2=True):
                    self.log(
                        "ERROR: Could not write L2 table; metadata overlap check failed: "
                        "Input/output error"
                    )
                    res.check_errors += 1
                    return
                self.hf.pwrite(entries.encode_u64_table(table), l2_offset)
                self.hf.fsync()
                res.corruptions -= l2_dirty
                res.corruptions_fixed += l2_dirty

    # -- the whole refcount check (qcow2_check_refcounts) ---------------------------
    def check_refcounts(self, fix: int) -> _Res:
        h = self.img.header
        res = self.res
        total_bytes = -(-h.size // 512) * 512
        res.total_clusters = self.size_to_clusters(total_bytes)
        rebuild = self.calculate(fix)
        pre_compare = copy.copy(res)
        rebuild2, highest = self.compare(0)
        rebuild = rebuild or rebuild2
        if rebuild and fix & FIX_ERRORS:
            old = copy.copy(res)
            fresh_leaks = 0
            self.log("Rebuilding refcount structure")
            self.rebuild()
            res.corruptions = 0
            res.leaks = 0
            self.calculate(0)
            res = self.res
            if fix & FIX_LEAKS:
                saved = copy.copy(res)
                self.res = _Res()
                rebuild, highest = self.compare(FIX_LEAKS)
                if rebuild:
                    self.log("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = self.res.leaks
                self.res = res = saved
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild:
                self.log("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _Fatal("Input/output error")
            if res.leaks or res.corruptions:
                self.res = res = pre_compare
                rebuild, highest = self.compare(fix)
        self.check_oflag_copied(fix)
        res = self.res
        res.image_end_offset = (highest + 1) * self.cs
        return res


def _read_snapshots(img) -> list:
    if not img.header.nb_snapshots:
        return []
    from .snapshot_table import read_snapshot_table

    return read_snapshot_table(img)


def _snapshot_entry_end(sn) -> int:
    """End of a snapshot table entry without its padding (QEMU's snapshots_size)."""
    raw_len = len(sn.id_str.encode("utf-8", "surrogateescape")) + len(
        sn.name.encode("utf-8", "surrogateescape")
    )
    return sn.table_offset + layout.SNAPSHOT_FIXED_SIZE + len(sn.extra_data) + raw_len


def _write_header(img, header) -> None:
    """Replace the header (one pwrite) and make it durable."""
    img.hf.pwrite(build_cluster0(header), 0)
    img.hf.fsync()
    img.header = header


# ---------------------------------------------------------------------------
# qcow2_co_check_locked + qemu-img's img_check
# ---------------------------------------------------------------------------
def _check_once(img, fix: int, log: Callable[[str], None]) -> _Res:
    checker = _Checker(img, log)
    res = checker.check_refcounts(fix)
    if fix and not res.check_errors and not res.corruptions:
        h = img.header
        clear = spec.Incompat.DIRTY | spec.Incompat.CORRUPT
        if h.incompatible_features & clear:
            _write_header(img, h.replace(incompatible_features=h.incompatible_features & ~clear))
    return res


def _prepare_for_repair(img) -> None:
    """What QEMU does when it opens an image read-write, before checking it.

    Autoclear bits it does not know are cleared, and a bitmaps extension whose
    autoclear bit is clear is dropped: those bitmaps are inconsistent and their
    clusters are about to be freed as leaks.
    """
    h = img.header
    if h.version < 3:
        new = h
        if h.extension(spec.ExtType.BITMAPS) is not None:
            new = with_extension(new, spec.ExtType.BITMAPS, None)
    else:
        new = h.replace(autoclear_features=h.autoclear_features & spec.AUTOCLEAR_MASK)
        if (
            new.extension(spec.ExtType.BITMAPS) is not None
            and not new.autoclear_features & spec.Autoclear.BITMAPS
        ):
            new = with_extension(new, spec.ExtType.BITMAPS, None)
    if new != h:
        _write_header(img, new)


def _result(filename: str, res: _Res, messages: list[str]) -> CheckResult:
    return CheckResult(
        filename=filename,
        check_errors=res.check_errors,
        image_end_offset=res.image_end_offset,
        corruptions=res.corruptions,
        leaks=res.leaks,
        corruptions_fixed=res.corruptions_fixed,
        leaks_fixed=res.leaks_fixed,
        total_clusters=res.total_clusters,
        allocated_clusters=res.allocated_clusters,
        fragmented_clusters=res.fragmented_clusters,
        compressed_clusters=res.compressed_clusters,
        messages=messages,
    )


def _run(img, filename: str, fix: int, log: Callable[[str], None] | None) -> CheckResult:
    messages: list[str] = []

    def emit(line: str) -> None:
        messages.append(line)
        if log is not None:
            log(line)

    try:
        if fix:
            img.flush()
            _prepare_for_repair(img)
        first = _check_once(img, fix, emit)
        if first.corruptions_fixed or first.leaks_fixed:
            # qemu-img: "Double checking the fixed image now..."
            final = _check_once(img, 0, emit)
            final.corruptions_fixed = first.corruptions_fixed
            final.leaks_fixed = first.leaks_fixed
        else:
            final = first
    except _Fatal as e:
        raise CheckFailed(img.path, f"Check failed: {e}", messages) from None
    finally:
        if fix:
            _refresh_image(img)
    return _result(filename, final, messages)


def _refresh_image(img) -> None:
    """Bring an open QcowImage's in-memory state in line with the repaired disk."""
    img.file_size = img.hf.size()
    h = img.header
    raw = img.hf.pread(h.l1_size * 8, h.l1_table_offset) if h.l1_size else b""
    img.l1 = entries.decode_u64_table(raw)
    img._l2_cache.clear()
    img._decomp_cache = None
    if getattr(img, "writable", False):
        from .refcount import Refcounts

        img.refcounts = Refcounts(img)


def check(
    path_or_img,
    repair: str | None = None,
    *,
    log: Callable[[str], None] | None = None,
    force_share: bool = False,
) -> CheckResult:
    """Check a qcow2 image like ``qemu-img check [-r leaks|all]``.

    ``path_or_img`` is a path or an open QcowImage (opened "r+" to repair).
    ``repair``: None (report only), "leaks" or "all".  ``log`` receives every
    message line qemu-img would print on stderr (they are also collected in
    ``CheckResult.messages``).  Raises ``CheckFailed`` when the check cannot
    complete (qemu-img's "Check failed", exit status 1), QcowError when the
    image cannot be opened.  ``force_share`` (read-only checks only) ignores
    the image locks of other processes, like ``qemu-img check -U``.
    """
    if repair not in _REPAIR_MODES:
        raise OperationError(
            None if isinstance(path_or_img, (str, os.PathLike)) else path_or_img.path,
            f"unknown repair mode {repair!r} (expecting 'leaks' or 'all')",
        )
    fix = _REPAIR_MODES[repair]
    if not isinstance(path_or_img, (str, os.PathLike)):
        img = path_or_img
        if img.format != "qcow2":
            raise OperationError(img.path, "This image format does not support checks")
        if fix and not img.writable:
            raise OperationError(img.path, "repairing needs an image opened read-write")
        return _run(img, img.path, fix, log)
    filename = os.fspath(path_or_img)
    if fix and force_share:
        raise OperationError(filename, "force_share is only possible for a read-only check")
    with _open_for_check(filename, writable=bool(fix), force_share=force_share) as img:
        return _run(img, filename, fix, log)


@contextlib.contextmanager
def _open_for_check(path: str, writable: bool, force_share: bool = False):
    from .chain import probe_format
    from .image import QcowImage

    fmt = probe_format(path)
    if fmt != "qcow2":
        raise OperationError(path, "This image format does not support checks")
    token = _opening_for_check.set(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = QcowImage(
                path, "r+" if writable else "r", force_share=force_share, _repair=True
            )
    finally:
        _opening_for_check.reset(token)
    try:
        yield img
    finally:
        img.close()


def repair_dirty(img) -> None:
    """Repair a dirty (lazy refcounts) image being opened read-write.

    Runs the full repair (``check -r all``) on the open image: refcounts are
    rebuilt or corrected until they are exact, COPIED flags recomputed and the
    dirty bit cleared; ``img.refcounts``, ``img.l1`` and ``img.header`` then
    match the disk.  Raises CorruptImageError when the image cannot be made
    consistent (it is then left dirty, and no write happens).
    """
    if _opening_for_check.get():
        return  # check() opened it and does the checking itself
    messages: list[str] = []
    try:
        result = _run(img, img.path, FIX_LEAKS | FIX_ERRORS, messages.append)
    except CheckFailed as e:
        raise CorruptImageError(img.path, f"could not repair dirty image: {e.message}") from None
    if result.check_errors or result.corruptions or img.header.dirty:
        detail = next((m for m in messages if m.startswith("ERROR")), "corruptions remain")
        raise CorruptImageError(img.path, f"could not repair dirty image ({detail})")


_NONZERO_BYTE = re.compile(rb"[^\x00]")


def _nonzero_entries(table: array, extended: bool):
    """Indices of the L2 entries that are not all zero (the scans run in C).

    A mostly-zero table (the common case for a sparse image, and for the garbage
    tables a broken L1 points at) is searched for its non-zero bytes instead of
    turning every entry into a Python int.
    """
    raw = table.tobytes()
    zero_bytes = raw.count(0)
    if zero_bytes == len(raw):
        return ()
    if zero_bytes * 8 >= len(raw) * 7:
        width = 16 if extended else 8
        out = []
        m = _NONZERO_BYTE.search(raw)
        while m is not None:
            i = m.start() // width
            out.append(i)
            m = _NONZERO_BYTE.search(raw, (i + 1) * width)
        return out
    if extended:
        return itertools.compress(itertools.count(), map(operator.or_, table[0::2], table[1::2]))
    return itertools.compress(itertools.count(), table)


make_callable(__name__, check)
