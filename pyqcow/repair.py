"""Repair of qcow2 images, as ``qemu-img check -r leaks|all`` does it.

``Repairer`` is the scan (pyqcow.scan.Scanner) with its repair hooks filled in:

- leaks are fixed by lowering the stored refcount to the expected one;
- a refcount that is too low but not zero is raised (``all``);
- a stored refcount of 0 for a referenced cluster, or a broken refcount block,
  makes ``all`` rebuild the whole refcount structure the way QEMU's
  ``rebuild_refcount_structure`` does: new refcount blocks (slices of the
  in-memory table) and a new refcount table are written into clusters nothing
  references, made durable, and only then does the header switch to them
  (through the image's metadata door: ``write_refcount_table``, then
  ``switch_header``).  A crash before the switch leaves the old structure in
  place; after it the old structure is merely leaked, and the leak pass that
  follows frees it (DESIGN.md section 4: leaks at worst);
- COPIED flags are recomputed from the refcounts (``all``, or ``leaks`` when
  nothing else is wrong);
- when no corruption is left, the dirty and corrupt bits are cleared.

Refcount blocks and L2 tables are written here directly (a repair edits them in
place, as QEMU does); the header, the active L1 and the refcount table only
through the metadata door (pyqcow/writer.py).

``repair(img, mode)`` repairs an open image; ``repair_dirty(img)`` is what a
read-write open of a dirty (lazy refcounts) image calls: a full repair on the
open image, which leaves its in-memory state consistent with the disk.  An
open made by ``check`` itself (``opening_for_check()``) skips it, as QEMU
skips it for BDRV_O_CHECK opens.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from . import entries, spec
from .check_result import (
    CheckFailed,
    CheckResult,
    Fatal,
    Res,
    _opening_for_check,
    collector,
    opening_for_check,
    result,
)
from .errors import CorruptImageError
from .header import with_extension
from .scan import FIX_ERRORS, FIX_LEAKS, REPAIR_MODES, RefcountReadError, Scanner

__all__ = ["Repairer", "opening_for_check", "repair", "repair_dirty"]

class Repairer(Scanner):
    """The scan with the writes of a repair."""

    def update_stored(self, cluster: int, value: int) -> bool:
        index = cluster >> self.block_bits
        try:
            blk = self._stored_block(index)
        except RefcountReadError:
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
            offset = entries.reftable_block_offset(self.reftable[index])
            self.hf.pwrite(self.blocks[index].tobytes(), offset)
        self.dirty_blocks.clear()
        self.hf.fsync()

    # -- repairs in the middle of the scan ---------------------------------------
    def fix_l2_entry_by_zero(self, l2_offset: int, table: array, i: int, active: bool) -> bool:
        """Turn a misaligned preallocated zero cluster into a plain zero cluster."""
        if self.extended:
            bm = entries.bitmap_all_zero(table[2 * i + 1])
            table[2 * i] = 0
            table[2 * i + 1] = bm
            size = 16
            data = entries.encode_u64_table(array("Q", [0, bm]))
        else:
            table[i] = entries.ZERO_PLAIN_ENTRY
            size = 8
            data = entries.encode_u64_table(array("Q", [entries.ZERO_PLAIN_ENTRY]))
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

    def fix_refblock_outside(self, offset: int) -> bool:
        """A refcount block past the end of the file: grow the file to hold it."""
        res = self.res
        try:
            self.hf.truncate(offset + self.cs)
            self.hf.fsync()
        except OSError as e:
            self.log(f"ERROR could not resize image: {e.strerror}")
            return False
        self.grow_imrt(self.size_to_clusters(self.file_length()))
        res.corruptions -= 1
        res.corruptions_fixed += 1
        self.inc(offset, self.cs)
        return True

    def fix_l1_copied(self, l1: array, i: int, l1e: int) -> None:
        """Rewrite active L1 entry ``i`` with its COPIED flag fixed (the door's write)."""
        l1[i] = l1e
        self.img.write_l1_entry(i, l1e)
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1

    def write_l2_copied(self, l2_offset: int, table: array) -> bool:
        """Write an active L2 table whose COPIED flags were fixed; False: refused."""
        if self.overlaps_metadata(l2_offset, self.cs, ignore_active_l2=True):
            self.log(
                "ERROR: Could not write L2 table; metadata overlap check failed: "
                "Input/output error"
            )
            self.res.check_errors += 1
            return False
        self.hf.pwrite(entries.encode_u64_table(table), l2_offset)
        self.hf.fsync()
        return True

    # -- rebuild (rebuild_refcount_structure) ----------------------------------------
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
                raise Fatal("ERROR writing refblock: metadata overlap")
            self.hf.pwrite(self.refblock_bytes(index), offset)
            cluster = start + self.block_entries
        return grown

    def rebuild(self, **header_fields) -> None:
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
            raise Fatal("ERROR writing reftable: metadata overlap")
        # Refcount blocks and table are durable (the table write's fsync) before
        # the header points at them.
        self.img.write_refcount_table(table_offset, data)
        self.img.switch_header(refcount_table_offset=table_offset, refcount_table_clusters=clusters,
                               **header_fields)
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
                o = entries.l1_l2_offset(e)
                if o and hit(o, cs):
                    return True
        for raw in self.reftable:
            o = entries.reftable_block_offset(raw)
            if o and hit(o, cs):
                return True
        ext = h.bitmaps
        return bool(
            ext is not None
            and self.bitmaps_consistent
            and hit(ext.bitmap_directory_offset, ext.bitmap_directory_size)
        )

    # -- the whole check, repairing (qcow2_check_refcounts) -------------------------
    def check_refcounts(self, fix: int) -> Res:
        import copy  # (with weakref: only a repair needs it, not every check's start-up)

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
                self.res = Res()
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
                raise Fatal("Input/output error")
            if res.leaks or res.corruptions:
                self.res = res = pre_compare
                rebuild, highest = self.compare(fix)
        self.check_oflag_copied(fix)
        res = self.res
        res.image_end_offset = (highest + 1) * self.cs
        return res


# ---------------------------------------------------------------------------
# qcow2_co_check_locked + qemu-img's img_check
# ---------------------------------------------------------------------------
def _check_once(img, fix: int, log: Callable[[str], None]) -> Res:
    res = Repairer(img, log).check_refcounts(fix)
    if fix and not res.check_errors and not res.corruptions:
        h = img.header
        clear = spec.Incompat.DIRTY | spec.Incompat.CORRUPT
        if h.incompatible_features & clear:
            img.switch_header(incompatible_features=h.incompatible_features & ~clear)
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
        img.switch_header(new)


def repair(img, mode: str = "all", *, filename: str | None = None,
           log: Callable[[str], None] | None = None) -> CheckResult:
    """``qemu-img check -r MODE`` ("leaks" or "all") on an open, writable QcowImage.

    ``log`` receives every message line (also in ``CheckResult.messages``).
    Raises CheckFailed when the check cannot complete.  Afterwards the image's
    in-memory state matches the disk (``img.reload()``).
    """
    fix = REPAIR_MODES[mode]
    messages, emit = collector(log)
    try:
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
    except Fatal as e:
        raise CheckFailed(img.path, f"Check failed: {e}", messages) from None
    finally:
        img.reload()
    return result(img.path if filename is None else filename, final, messages)


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
        res = repair(img, "all", log=messages.append)
    except CheckFailed as e:
        raise CorruptImageError(img.path, f"could not repair dirty image: {e.message}") from None
    if res.check_errors or res.corruptions or img.header.dirty:
        detail = next((m for m in messages if m.startswith("ERROR")), "corruptions remain")
        raise CorruptImageError(img.path, f"could not repair dirty image ({detail})")

