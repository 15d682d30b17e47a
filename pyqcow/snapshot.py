"""Internal snapshots: create, apply and delete on an OPEN qcow2 image.

The table format (``SnapshotInfo``, reading, lookups, entry encoding) is
pyqcow/snapshot_table.py; opening an image by path for these operations (and
``snapshot(path, op, name)``) is pyqcow/ops/snapshot.py.

Writing follows block/qcow2-snapshot.c (``qcow2_snapshot_create``,
``qcow2_snapshot_goto``, ``qcow2_snapshot_delete``) with DESIGN.md section 4's
order: refcount increments are durable before any table that adds a reference;
the snapshot table and the active L1 are replaced copy-then-switch (new
clusters written and synced, then one header write); decrements come last.
Every header and active-L1 write goes through the image's metadata door
(``switch_header``, ``write_new_clusters``, ``replace_active_l1``,
``write_l1_entry``, ``flush``, ``reload``).  A crash at any point leaves the old
or the new state plus, at worst, leaked clusters.  Refcount semantics (the
writer relies on them): a data cluster's refcount is the number of L1 trees
(active + snapshots) reaching it, an L2 table's the number of L1 tables
pointing at it; COPIED is set exactly when the refcount is 1.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter
from itertools import compress

from . import entries, spec, walk
from .errors import CorruptImageError, FormatError, OperationError, UnsupportedFeatureError
from .header import size_to_l1
from .snapshot_table import (
    MAX_NAME_BYTES,
    SnapshotExistsError,
    SnapshotInfo,
    SnapshotNotFoundError,
    build_entry,
    check_table_size,
    encode_name,
    entry_bytes,
    find_for_delete,
    find_snapshot,
    next_id,
    not_found,
    read_snapshot_table,
)

__all__ = [
    "SnapshotExistsError",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "apply_snapshot",
    "create_snapshot",
    "delete_snapshot",
    "list_snapshots",
    "require_snapshot_writable",
]


def list_snapshots(img) -> list[SnapshotInfo]:
    """The snapshot table of the open image ``img``."""
    if getattr(img, "format", None) != "qcow2":
        raise UnsupportedFeatureError(
            getattr(img, "path", None), "internal snapshots need a qcow2 image"
        )
    return read_snapshot_table(img)


def require_snapshot_writable(img) -> None:
    """``img`` is an open, writable qcow2 image whose snapshots may be changed."""
    if getattr(img, "format", None) != "qcow2" or not hasattr(img, "refcounts"):
        raise UnsupportedFeatureError(
            getattr(img, "path", None), "internal snapshots need a qcow2 image"
        )
    if not getattr(img, "writable", False):
        raise OperationError(img.path, "image is open read-only (internal snapshots need 'r+')")
    if img._closed:
        raise OperationError(img.path, "image is closed")
    h = img.header
    if h.has_data_file:
        raise UnsupportedFeatureError(
            img.path, "internal snapshots are not supported with an external data file"
        )
    if h.crypt_method:
        raise UnsupportedFeatureError(img.path, "cannot change snapshots of encrypted images")


def _has_bitmaps(img) -> bool:
    """Persistent dirty bitmaps qemu would load (the autoclear bit says they are valid)."""
    h = img.header
    ext = h.bitmaps
    return (
        h.version == 3
        and bool(h.autoclear_features & spec.Autoclear.BITMAPS)
        and ext is not None
        and ext.nb_bitmaps > 0
    )


def _begin_metadata_change(img) -> None:
    """Before create/delete: they change metadata but not the guest data, so persistent
    bitmaps stay valid (qemu-img snapshot -c/-d leaves them alone).  Other autoclear
    bits we do not maintain are cleared, as the writer does on its first change."""
    if img.writer.write_started:
        return
    h = img.header
    keep = spec.Autoclear.DATA_FILE_RAW | spec.Autoclear.BITMAPS
    if h.version == 3 and h.autoclear_features & ~keep:
        img.switch_header(autoclear_features=h.autoclear_features & keep)


def _clusters(img, nbytes: int) -> int:
    return (nbytes + img.cluster_size - 1) >> img.cluster_bits


def _read_l1(img, sn: SnapshotInfo) -> array:
    """The L1 table of snapshot ``sn``, validated like the active one."""
    if sn.l1_size * 8 > spec.MAX_L1_SIZE_BYTES:
        raise FormatError(img.path, f"snapshot {sn.id_str} L1 table too large")
    if not sn.l1_size:
        return array("Q")
    if sn.l1_table_offset % img.cluster_size or not sn.l1_table_offset:
        raise CorruptImageError(img.path, f"snapshot {sn.id_str} L1 table offset is invalid")
    if sn.l1_table_offset + sn.l1_size * 8 > img.hf.size():
        raise CorruptImageError(
            img.path, f"snapshot {sn.id_str} L1 table lies beyond the end of the file"
        )
    return entries.decode_u64_table(img.hf.pread(sn.l1_size * 8, sn.l1_table_offset))


def _tree_counts(img, l1, what: str) -> Counter:
    """Host cluster -> references from the L1 tree ``l1`` (``what`` names it in errors).

    The tree is walked by pyqcow.walk: an L2 table counts once per L1 entry
    pointing at it, normal and zero-with-allocation entries their cluster,
    compressed entries every cluster their byte range touches (qemu's
    ``qcow2_update_snapshot_refcount``).  A tree with a pointer the walk cannot
    count is refused (``walk.refuse_problems``) before anything is written.
    """
    w = walk.l1_tree(img, l1, stop_at_problem=True)
    walk.refuse_problems(img, w, what)
    return walk.cluster_references(w.references, img.cluster_bits)


def _check_increments(img, counts: Counter) -> None:
    rc = img.refcounts
    limit = rc.max
    for c, n in counts.items():
        v = rc.get(c)
        if v == 0:
            raise CorruptImageError(
                img.path,
                f"cluster {c} is referenced but has refcount 0 (run 'pyqcow check -r all')",
            )
        if v + n > limit:
            if rc.order == 0:
                raise UnsupportedFeatureError(
                    img.path,
                    "internal snapshots need refcounts above 1, but this image has "
                    "refcount_bits=1 (convert it with -o refcount_bits=16)",
                )
            raise OperationError(
                img.path,
                f"refcount of cluster {c} would exceed {limit} "
                f"(refcount_bits={1 << rc.order}); too many snapshots share it",
            )


def _check_decrements(img, counts: Counter) -> None:
    rc = img.refcounts
    for c, n in counts.items():
        if rc.get(c) < n:
            raise CorruptImageError(
                img.path,
                f"refcount of cluster {c} is lower than its references "
                "(run 'pyqcow check -r all')",
            )


def _switch_table(img, blobs: list[bytes], old: list[SnapshotInfo]) -> None:
    """copy-then-switch of the snapshot table (qemu's ``qcow2_write_snapshots``)."""
    old_offset = img.header.snapshots_offset
    old_clusters = _clusters(img, sum(s.entry_size for s in old)) if old else 0
    new_offset = img.write_new_clusters(b"".join(blobs))
    img.flush()  # the new table and every refcount increment are durable first
    img.switch_header(nb_snapshots=len(blobs), snapshots_offset=new_offset)
    if old_clusters and old_offset:
        img.refcounts.free_later(old_offset, old_clusters)


def _mark_copied(img, l1, *, only_clear: bool) -> None:
    """Set COPIED exactly where the refcount is 1 in the tree of ``l1`` (``only_clear``:
    clear every COPIED flag of the tree, for tables that just became shared).

    The L2 tables and, for the active tree, the L1 entries change in memory; the
    next flush writes them (L2 tables first, then the L1)."""
    rc = img.refcounts
    cb = img.cluster_bits
    l1_changes: list[tuple[int, int]] = []
    for l1_index, l1e in enumerate(l1):
        off = entries.l1_l2_offset(l1e)
        if not off:
            continue
        if _mark_copied_l2(img, img.l2_table(off), only_clear):
            img.l2_cache.mark_dirty(off)
        if l1 is img.l1:
            new_l1e = entries.with_copied(l1e, not only_clear and rc.get(off >> cb) == 1)
            if new_l1e != l1e:
                l1_changes.append((l1_index, new_l1e))
    img.update_l1_entries(l1_changes)


def _mark_copied_l2(img, table, only_clear: bool) -> bool:
    """COPIED in one L2 table (see ``_mark_copied``); True if it changed."""
    rc = img.refcounts
    cb = img.cluster_bits
    step = 2 if img.extended_l2 else 1
    changed = False
    descriptors = table if step == 1 else table[::2]
    for j in compress(range(0, len(table), step), descriptors):  # nonzero ones only
        e = table[j]
        if entries.is_compressed(e):
            continue
        host = entries.l2_host_offset(e)
        if not host:
            continue
        new_e = entries.with_copied(e, not only_clear and rc.get(host >> cb) == 1)
        if new_e != e:
            table[j] = new_e
            changed = True
    return changed


def _date_now() -> tuple[int, int]:
    # qemu stamps with g_get_real_time(): microsecond resolution
    us = time.time_ns() // 1000
    return us // 1_000_000, (us % 1_000_000) * 1000


def _date_fields(date) -> tuple[int, int]:
    if date is None:
        return _date_now()
    if hasattr(date, "timestamp"):
        date = date.timestamp()
    if isinstance(date, tuple):
        sec, nsec = date
        return int(sec), int(nsec)
    ns = round(float(date) * 1_000_000_000)
    return ns // 1_000_000_000, ns % 1_000_000_000


def _check_new(img, name: str, date, vm_clock_nsec: int) -> tuple[int, int]:
    """Validate create's arguments; returns the date as (sec, nsec)."""
    if not isinstance(name, str):
        raise TypeError("snapshot name must be a str")
    name_raw = encode_name(name)
    if not name_raw:
        raise OperationError(img.path, "snapshot name is empty")
    if len(name_raw) > MAX_NAME_BYTES:
        raise OperationError(
            img.path,
            f"snapshot name too long ({len(name_raw)} bytes, maximum {MAX_NAME_BYTES})",
        )
    if not 0 <= vm_clock_nsec < 1 << 64:
        raise OperationError(img.path, "vm_clock_nsec out of range")
    date_sec, date_nsec = _date_fields(date)
    if not (0 <= date_sec < 1 << 32 and 0 <= date_nsec < 1_000_000_000):
        raise OperationError(img.path, "snapshot date out of range")
    return date_sec, date_nsec


def create_snapshot(img, name: str, *, date=None, vm_clock_nsec: int = 0) -> SnapshotInfo:
    """Take internal snapshot ``name`` of the active layer of the open image ``img``
    (``qemu-img snapshot -c``).

    ``date``: None (now), seconds since the epoch, a datetime, or (sec, nsec).
    Duplicate names are refused (qemu-img 7.2 would accept them).
    """
    require_snapshot_writable(img)
    date_sec, date_nsec = _check_new(img, name, date, vm_clock_nsec)
    img.flush()
    snaps = read_snapshot_table(img)
    for sn in snaps:
        if sn.name == name:
            raise SnapshotExistsError(
                img.path, f"a snapshot named {name!r} already exists (ID {sn.id_str})"
            )
    fields = dict(
        l1_size=len(img.l1), id_str=next_id(snaps), name=name, date_sec=date_sec,
        date_nsec=date_nsec, vm_clock_nsec=vm_clock_nsec, disk_size=img.virtual_size,
    )
    blobs = [entry_bytes(img, sn) for sn in snaps]
    # the L1 offset is not known yet: size the entry with a placeholder
    check_table_size(img.path, [*blobs, build_entry(l1_table_offset=0, **fields)])
    counts = _tree_counts(img, img.l1, "active L1")
    _check_increments(img, counts)

    # -- from here on the image changes ------------------------------------
    _begin_metadata_change(img)
    # 1. the tree is about to be shared: clear its COPIED flags first, so no
    #    crash can leave COPIED on a cluster whose refcount is 2 (the other
    #    direction, COPIED missing at refcount 1, only costs a copy-on-write)
    _mark_copied(img, img.l1, only_clear=True)
    img.flush()
    rc = img.refcounts
    for c, n in counts.items():  # 2. increments (durable at the next flush)
        rc.incref(c, n)
    snap_l1 = array("Q", (entries.l1_l2_offset(e) for e in img.l1))
    l1_offset = img.write_new_clusters(entries.encode_u64_table(snap_l1))
    entry = build_entry(l1_table_offset=l1_offset, **fields)
    # 3. new table, flush (snapshot L1 + table, refcounts), header switch
    _switch_table(img, [*blobs, entry], snaps)
    img.flush()  # 4. free the old table
    return read_snapshot_table(img)[-1]


def _find_for_apply(img, name_or_id: str) -> tuple[SnapshotInfo, int]:
    """The snapshot ``apply`` would revert to and the L1 size its disk size needs."""
    snaps = read_snapshot_table(img)
    sn = find_snapshot(snaps, str(name_or_id))
    if sn is None:
        raise not_found(img.path, snaps, str(name_or_id))
    if _has_bitmaps(img):
        # qemu-img 7.2: "Could not apply snapshot: Device has active dirty bitmaps"
        # (enabled or not); the bitmaps would describe the wrong disk content
        raise OperationError(
            img.path,
            "cannot apply a snapshot to an image with persistent dirty bitmaps "
            "(remove them first, as qemu-img requires)",
        )
    if sn.disk_size > spec.MAX_VIRTUAL_SIZE:
        raise FormatError(img.path, f"snapshot {sn.id_str} disk size is too large")
    need_l1 = size_to_l1(sn.disk_size, img.cluster_bits, img.header.l2_entry_size)
    if need_l1 * 8 > spec.MAX_L1_SIZE_BYTES:
        raise FormatError(img.path, f"snapshot {sn.id_str} disk size needs too large an L1")
    return sn, need_l1


def apply_snapshot(img, name_or_id: str) -> SnapshotInfo:
    """Revert the active layer of the open image ``img`` to snapshot ``name_or_id``
    (``qemu-img snapshot -a``: an ID first, then a name).  The virtual size becomes
    the snapshot's."""
    require_snapshot_writable(img)
    img.flush()
    sn, need_l1 = _find_for_apply(img, name_or_id)
    sn_l1 = _read_l1(img, sn)
    inc = _tree_counts(img, sn_l1, f"snapshot {sn.id_str}")
    dec = _tree_counts(img, img.l1, "active L1")
    _check_increments(img, inc)
    _check_decrements(img, dec)
    # qemu grows the L1, never shrinks it; a snapshot without a disk size in
    # its extra data (old qemu) gets today's size, maybe past its own L1
    new_l1_size = max(img.header.l1_size, sn.l1_size, need_l1)

    # -- from here on the image changes ------------------------------------
    img.writer.begin_write()
    # every table and cluster of the new active tree is shared with the
    # snapshot: the new L1 carries no COPIED flag, neither do those L2s
    # (cleared before the increments, as in create)
    new_l1 = array("Q", (entries.l1_l2_offset(e) for e in sn_l1))
    new_l1.extend(array("Q", bytes(8 * (new_l1_size - len(new_l1)))))
    _mark_copied(img, new_l1, only_clear=True)
    img.flush()
    rc = img.refcounts
    for c, n in inc.items():  # 1. the snapshot's tree gains a reference
        rc.incref(c, n)
    # 2. data (new L1), increments, L2 flags durable, then 3. one header write
    #    switches L1 and size (copy-then-switch)
    old_l1_offset, old_l1_size = img.replace_active_l1(new_l1, size=sn.disk_size)
    # 4. the old active tree loses its reference (decrements last)
    for c, n in dec.items():
        for _ in range(n):
            rc.free_later(c << img.cluster_bits)
    if old_l1_size and old_l1_offset:
        rc.free_later(old_l1_offset, _clusters(img, old_l1_size * 8))
    img.flush()
    img.reload()  # cached tables and guesses about the old active tree go
    # 5. COPIED where refcounts are 1 (none expected: the snapshot shares all)
    _mark_copied(img, img.l1, only_clear=False)
    img.flush()
    return sn


def delete_snapshot(img, name_or_id: str) -> SnapshotInfo:
    """Delete snapshot ``name_or_id`` of the open image ``img`` (``qemu-img snapshot
    -d``: a name first, then an ID)."""
    require_snapshot_writable(img)
    img.flush()
    snaps = read_snapshot_table(img)
    sn = find_for_delete(snaps, str(name_or_id))
    if sn is None:
        raise not_found(img.path, snaps, str(name_or_id))
    sn_l1 = _read_l1(img, sn)
    dec = _tree_counts(img, sn_l1, f"snapshot {sn.id_str}")
    l1_clusters = _clusters(img, sn.l1_size * 8) if sn.l1_size else 0
    for i in range(l1_clusters):
        dec[(sn.l1_table_offset >> img.cluster_bits) + i] += 1
    _check_decrements(img, dec)
    blobs = [entry_bytes(img, s) for s in snaps if s is not sn]

    # -- from here on the image changes ------------------------------------
    _begin_metadata_change(img)
    _switch_table(img, blobs, snaps)  # 1. the entry is gone (header switch)
    rc = img.refcounts
    for c, n in dec.items():  # 2. then its tree loses its references
        for _ in range(n):
            rc.free_later(c << img.cluster_bits)
    img.flush()
    img.reload()  # tables of the deleted tree may have been freed
    # 3. what the active tree now owns alone gets its COPIED flag back
    _mark_copied(img, img.l1, only_clear=False)
    img.flush()
    return sn
