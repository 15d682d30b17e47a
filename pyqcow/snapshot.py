"""Internal snapshots (qcow2.rst "Snapshots").

Reading: ``read_snapshot_table(img)`` parses and validates the snapshot table
of an open QcowImage into frozen ``SnapshotInfo`` records, checking QEMU's
limits (block/qcow2-snapshot.c ``qcow2_read_snapshots``, block/qcow2.h) before
anything is allocated.  Writing (create/apply/delete) builds on these records;
``SnapshotInfo.extra_data`` keeps the entry's extra data byte for byte so a
rewrite preserves fields this version does not know.

Writing follows block/qcow2-snapshot.c (``qcow2_snapshot_create``,
``qcow2_snapshot_goto``, ``qcow2_snapshot_delete``) with DESIGN.md section 4's
order: refcount increments are durable before any table that adds a reference;
the snapshot table and the active L1 are replaced copy-then-switch (new
clusters written and synced, then one header write); decrements come last.
A crash at any point leaves the old or the new state plus, at worst, leaked
clusters.  Refcount semantics (the writer relies on them): a data cluster's
refcount is the number of L1 trees (active + snapshots) reaching it, an L2
table's the number of L1 tables pointing at it; COPIED is set exactly when the
refcount is 1.
"""

from __future__ import annotations

import contextlib
import os
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from itertools import compress

from . import entries, layout, spec
from .errors import CorruptImageError, FormatError, OperationError, UnsupportedFeatureError

__all__ = [
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "apply_snapshot",
    "create_snapshot",
    "delete_snapshot",
    "find_snapshot",
    "list_snapshots",
    "read_snapshot_table",
    "snapshot",
]


@dataclass(frozen=True)
class SnapshotInfo:
    id_str: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int  # the 64-bit extra-data field when present, else the 32-bit one
    disk_size: int  # from extra data; the image's virtual size when absent (as qemu)
    icount: int | None  # None: absent or -1 (disabled)
    extra_data: bytes = b""  # raw extra data, unknown trailing fields included
    table_offset: int = 0  # where this entry starts in the file
    entry_size: int = 0  # bytes, padding included

    def as_qemu_json(self) -> dict:
        """The SnapshotInfo object qemu-img info prints (QAPI field order)."""
        d: dict = {
            "id": self.id_str,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount is not None:
            d["icount"] = self.icount
        return d


def _decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def read_snapshot_table(img) -> list[SnapshotInfo]:
    """Parse the snapshot table of ``img`` (a QcowImage), validating every entry."""
    h = img.header
    path = img.path
    count = h.nb_snapshots
    if not count:
        return []
    if count > spec.MAX_SNAPSHOTS:
        raise FormatError(path, f"too many snapshots ({count}, maximum {spec.MAX_SNAPSHOTS})")
    cs = img.cluster_size
    start = h.snapshots_offset
    if start % cs:
        raise FormatError(path, f"snapshot table offset {start:#x} is not cluster-aligned")
    file_size = img.file_size
    out: list[SnapshotInfo] = []
    pos = start
    for index in range(count):
        if pos - start + layout.SNAPSHOT_FIXED_SIZE > spec.MAX_SNAPSHOTS_TABLE_BYTES:
            raise FormatError(path, "snapshot table too large (more than 64 MiB)")
        if pos + layout.SNAPSHOT_FIXED_SIZE > file_size:
            raise FormatError(
                path,
                f"snapshot table entry {index} at offset {pos:#x} lies beyond the end of the file",
            )
        fixed = layout.parse(
            layout.SnapshotEntryFixed, img.hf.pread(layout.SNAPSHOT_FIXED_SIZE, pos)
        )
        extra_size = fixed["extra_data_size"]
        if extra_size > spec.MAX_SNAPSHOT_EXTRA_DATA:
            raise FormatError(
                path,
                f"snapshot table entry {index} has too much extra data ({extra_size} bytes, "
                f"maximum {spec.MAX_SNAPSHOT_EXTRA_DATA})",
            )
        var_size = extra_size + fixed["id_str_size"] + fixed["name_size"]
        used_size = layout.SNAPSHOT_FIXED_SIZE + var_size
        entry_size = used_size + -used_size % 8
        if pos - start + entry_size > spec.MAX_SNAPSHOTS_TABLE_BYTES:
            raise FormatError(path, "snapshot table too large (more than 64 MiB)")
        # (qemu does not write the last entry's padding: the file may end before it)
        if pos + used_size > file_size:
            raise FormatError(
                path,
                f"snapshot table entry {index} at offset {pos:#x} lies beyond the end of the file",
            )
        body = img.hf.pread(var_size, pos + layout.SNAPSHOT_FIXED_SIZE)
        extra = body[:extra_size]
        id_raw = body[extra_size : extra_size + fixed["id_str_size"]]
        name_raw = body[extra_size + fixed["id_str_size"] :]

        l1_offset, l1_size = fixed["l1_table_offset"], fixed["l1_size"]
        if l1_offset % cs:
            raise CorruptImageError(
                path, f"snapshot {index} L1 table offset {l1_offset:#x} is not cluster-aligned"
            )
        if l1_size * 8 > spec.MAX_L1_SIZE_BYTES:
            raise FormatError(
                path, f"snapshot {index} L1 table too large ({l1_size} entries, maximum 4 Mi)"
            )
        if l1_size and l1_offset + l1_size * 8 > file_size:
            raise CorruptImageError(
                path, f"snapshot {index} L1 table at {l1_offset:#x} lies beyond the end of the file"
            )

        vm_state_size = fixed["vm_state_size"]
        if extra_size >= 8:
            vm_state_size = int.from_bytes(extra[0:8], "big")
        disk_size = int.from_bytes(extra[8:16], "big") if extra_size >= 16 else h.size
        icount: int | None = None
        if extra_size >= 24:
            raw_icount = int.from_bytes(extra[16:24], "big")
            if raw_icount != (1 << 64) - 1:
                icount = raw_icount
        out.append(
            SnapshotInfo(
                id_str=_decode_name(id_raw),
                name=_decode_name(name_raw),
                l1_table_offset=l1_offset,
                l1_size=l1_size,
                date_sec=fixed["date_sec"],
                date_nsec=fixed["date_nsec"],
                vm_clock_nsec=fixed["vm_clock_nsec"],
                vm_state_size=vm_state_size,
                disk_size=disk_size,
                icount=icount,
                extra_data=bytes(extra),
                table_offset=pos,
                entry_size=entry_size,
            )
        )
        pos += entry_size
    return out


def find_snapshot(snapshots: list[SnapshotInfo], name_or_id: str) -> SnapshotInfo | None:
    """qemu's lookup order: an exact ID first, then a name."""
    for sn in snapshots:
        if sn.id_str == name_or_id:
            return sn
    for sn in snapshots:
        if sn.name == name_or_id:
            return sn
    return None


# ---------------------------------------------------------------------------
# Writing: create / apply / delete (block/qcow2-snapshot.c)
# ---------------------------------------------------------------------------
_L1_MASK = spec.L1E_OFFSET_MASK
_L2_MASK = spec.L2E_OFFSET_MASK
_COPIED = spec.QCOW_OFLAG_COPIED
_COMPRESSED = spec.QCOW_OFLAG_COMPRESSED
#: qemu keeps snapshot names in a char[256] (QEMUSnapshotInfo.name)
MAX_NAME_BYTES = 255


class SnapshotNotFoundError(OperationError):
    """No internal snapshot has the given ID or name."""


class SnapshotExistsError(OperationError):
    """An internal snapshot with that name already exists."""


def _encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _open_rw(img):
    """(image, owned): ``img`` itself, or a QcowImage opened "r+" on a path."""
    if isinstance(img, str | bytes | os.PathLike):
        from .image import QcowImage

        return QcowImage(os.fsdecode(img), "r+"), True
    return img, False


@contextlib.contextmanager
def _for_update(img):
    """An image open "r+" that snapshots may be changed in (closed after, if we opened it)."""
    img, owned = _open_rw(img)
    try:
        _require_snapshot_writable(img)
        yield img
    finally:
        if owned:
            img.close()


def _open_ro(img):
    if isinstance(img, str | bytes | os.PathLike):
        from .image import QcowImage

        return QcowImage(os.fsdecode(img), "r"), True
    return img, False


def _require_snapshot_writable(img) -> None:
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
    if img._write_started:
        return
    h = img.header
    keep = spec.Autoclear.DATA_FILE_RAW | spec.Autoclear.BITMAPS
    if h.version == 3 and h.autoclear_features & ~keep:
        img.header = h.replace(autoclear_features=h.autoclear_features & keep)
        img._write_header()
        img.hf.fsync()


def _not_found(img, snaps: list[SnapshotInfo], name_or_id: str) -> SnapshotNotFoundError:
    known = ", ".join(f"{s.id_str} ({s.name})" for s in snaps[:10]) or "none"
    if len(snaps) > 10:
        known += f", ... {len(snaps)} in all"
    return SnapshotNotFoundError(
        img.path, f"no internal snapshot with ID or name {name_or_id!r} (snapshots: {known})"
    )


def _find_for_delete(snaps: list[SnapshotInfo], name_or_id: str) -> SnapshotInfo | None:
    """qemu-img snapshot -d matches names only (bdrv_snapshot_find); an ID is our extension,
    tried only when no name matches, so we never pick a different snapshot than qemu."""
    for sn in snaps:
        if sn.name == name_or_id:
            return sn
    for sn in snaps:
        if sn.id_str == name_or_id:
            return sn
    return None


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


def _reach(img, l1, what: str) -> tuple[list[int], Counter]:
    """(L2 table offsets, Counter of host clusters) one L1 tree references.

    Data clusters count once per reference: normal and zero-with-allocation
    entries their cluster, compressed entries every cluster their byte range
    touches (qemu's ``qcow2_update_snapshot_refcount``).
    """
    cb, cs = img.cluster_bits, img.cluster_size
    file_size = max(img.file_size, img.hf.size())
    file_clusters = (file_size + cs - 1) >> cb
    step = 2 if img.extended_l2 else 1
    l2s: list[int] = []
    data: Counter = Counter()
    for l1_index, l1e in enumerate(l1):
        off = l1e & _L1_MASK
        if not off:
            continue
        if off % cs or off + cs > file_size:
            raise CorruptImageError(
                img.path, f"{what}: L1 entry {l1_index} points at an invalid L2 table {off:#x}"
            )
        l2s.append(off)
        table = img.l2_table(off)
        for e in filter(None, table if step == 1 else table[::2]):  # skip zeros in C
            if not e & ~_COPIED:
                continue
            if e & _COMPRESSED:
                host, nbytes = entries.decode_compressed(e, cb)
                first, last = host >> cb, (host + nbytes - 1) >> cb
                if not host or first >= file_clusters:
                    raise CorruptImageError(
                        img.path, f"{what}: compressed cluster at {host:#x} lies outside the file"
                    )
                for c in range(first, last + 1):
                    data[c] += 1
                continue
            host = e & _L2_MASK
            if not host:
                continue
            if host % cs or host + cs > file_clusters << cb:
                raise CorruptImageError(
                    img.path, f"{what}: L2 entry {e:#018x} points at an invalid data cluster"
                )
            data[host >> cb] += 1
    return l2s, data


def _tree_counts(img, l2s: list[int], data: Counter) -> Counter:
    counts = Counter(data)
    for off in l2s:
        counts[off >> img.cluster_bits] += 1
    return counts


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


def _entry_bytes(img, sn: SnapshotInfo) -> bytes:
    """An existing table entry, byte for byte (unknown extra data kept), padded to 8."""
    raw = img.hf.pread(layout.SNAPSHOT_FIXED_SIZE, sn.table_offset)
    fixed = layout.parse(layout.SnapshotEntryFixed, raw)
    used = (
        layout.SNAPSHOT_FIXED_SIZE
        + fixed["extra_data_size"]
        + fixed["id_str_size"]
        + fixed["name_size"]
    )
    body = img.hf.pread(used, sn.table_offset)
    return body + bytes(-used % 8)


def _build_entry(
    *, l1_table_offset: int, l1_size: int, id_str: str, name: str, date_sec: int,
    date_nsec: int, vm_clock_nsec: int, disk_size: int,
) -> bytes:
    # What qemu-img 7.2 writes (v2 and v3 alike): 24 bytes of extra data,
    # vm_state_size_large 0, disk_size, icount 0.
    extra = (
        layout.build(layout.SnapshotExtraVmState, {"vm_state_size_large": 0})
        + layout.build(layout.SnapshotExtraDiskSize, {"disk_size": disk_size})
        + layout.build(layout.SnapshotExtraIcount, {"icount": 0})
    )
    id_raw, name_raw = _encode_name(id_str), _encode_name(name)
    return layout.build(
        layout.SnapshotEntry,
        {
            "fixed": {
                "l1_table_offset": l1_table_offset,
                "l1_size": l1_size,
                "id_str_size": len(id_raw),
                "name_size": len(name_raw),
                "date_sec": date_sec,
                "date_nsec": date_nsec,
                "vm_clock_nsec": vm_clock_nsec,
                "vm_state_size": 0,
                "extra_data_size": len(extra),
            },
            "extra_data": extra,
            "id_str": id_raw,
            "name": name_raw,
        },
    )


def _check_table_size(img, blobs: list[bytes]) -> None:
    if len(blobs) > spec.MAX_SNAPSHOTS:
        raise OperationError(
            img.path, f"too many snapshots ({len(blobs)}, maximum {spec.MAX_SNAPSHOTS})"
        )
    if sum(map(len, blobs)) > spec.MAX_SNAPSHOTS_TABLE_BYTES:
        raise OperationError(img.path, "snapshot table would exceed 64 MiB")


def _write_new_clusters(img, data: bytes) -> int:
    """Allocate clusters for ``data`` and write it there (synced by the next flush)."""
    if not data:
        return 0
    off = img.refcounts.alloc(_clusters(img, len(data)))
    img._note_alloc()
    img.hf.pwrite(data, off)
    img._data_written = True
    return off


def _switch_table(img, blobs: list[bytes], old: list[SnapshotInfo]) -> None:
    """copy-then-switch of the snapshot table (qemu's ``qcow2_write_snapshots``)."""
    old_offset = img.header.snapshots_offset
    old_clusters = _clusters(img, sum(s.entry_size for s in old)) if old else 0
    new_offset = _write_new_clusters(img, b"".join(blobs))
    img.flush()  # the new table and every refcount increment are durable first
    img.header = img.header.replace(nb_snapshots=len(blobs), snapshots_offset=new_offset)
    img._write_header()
    img.hf.fsync()
    if old_clusters and old_offset:
        img.refcounts.free_later(old_offset, old_clusters)


def _mark_copied(img, l1, *, only_clear: bool) -> None:
    """Set COPIED exactly where the refcount is 1 in the active tree (``only_clear``:
    clear every COPIED flag of the tree, for tables that just became shared)."""
    rc = img.refcounts
    cb = img.cluster_bits
    step = 2 if img.extended_l2 else 1
    active = l1 is img.l1
    for l1_index, l1e in enumerate(l1):
        off = l1e & _L1_MASK
        if not off:
            continue
        table = img.l2_table(off)
        changed = False
        descriptors = table if step == 1 else table[::2]
        for j in compress(range(0, len(table), step), descriptors):  # nonzero ones only
            e = table[j]
            host = e & _L2_MASK
            if not host or e & _COMPRESSED:
                continue
            want = not only_clear and rc.get(host >> cb) == 1
            new_e = e | _COPIED if want else e & ~_COPIED
            if new_e != e:
                table[j] = new_e
                changed = True
        if changed:
            img.dirty_l2.add(off)
        if active:
            want = not only_clear and rc.get(off >> cb) == 1
            new_l1e = l1e | _COPIED if want else l1e & ~_COPIED
            if new_l1e != l1e:
                l1[l1_index] = new_l1e
                img.l1_dirty = True


def _forget_l2(img, offsets) -> None:
    """Drop cached L2 tables that may have been freed (never dirty ones)."""
    for off in offsets:
        if off not in img.dirty_l2:
            img._l2_cache.pop(off, None)


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


def _next_id(snaps: list[SnapshotInfo]) -> str:
    """qemu's find_new_snapshot_id: max(strtoul(id)) + 1."""
    best = 0
    for sn in snaps:
        digits = ""
        for ch in sn.id_str.lstrip():
            if not ch.isascii() or not ch.isdigit():
                break
            digits += ch
        if digits:
            best = max(best, int(digits))
    return str(best + 1)


def list_snapshots(img) -> list[SnapshotInfo]:
    """The snapshot table of ``img`` (an open image or a path)."""
    img, owned = _open_ro(img)
    try:
        if getattr(img, "format", None) != "qcow2":
            raise UnsupportedFeatureError(
                getattr(img, "path", None), "internal snapshots need a qcow2 image"
            )
        return read_snapshot_table(img)
    finally:
        if owned:
            img.close()


def create_snapshot(img, name: str, *, date=None, vm_clock_nsec: int = 0) -> SnapshotInfo:
    """Take internal snapshot ``name`` of the active layer (``qemu-img snapshot -c``).

    ``date``: None (now), seconds since the epoch, a datetime, or (sec, nsec).
    Duplicate names are refused (qemu-img 7.2 would accept them).
    """
    with _for_update(img) as img:
        if not isinstance(name, str):
            raise TypeError("snapshot name must be a str")
        name_raw = _encode_name(name)
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
        img.flush()
        snaps = read_snapshot_table(img)
        for sn in snaps:
            if sn.name == name:
                raise SnapshotExistsError(
                    img.path, f"a snapshot named {name!r} already exists (ID {sn.id_str})"
                )
        new_id = _next_id(snaps)
        l1_size = len(img.l1)
        blobs = [_entry_bytes(img, sn) for sn in snaps]
        # the L1 offset is not known yet: size the entry with a placeholder
        probe = _build_entry(
            l1_table_offset=0, l1_size=l1_size, id_str=new_id, name=name, date_sec=date_sec,
            date_nsec=date_nsec, vm_clock_nsec=vm_clock_nsec, disk_size=img.virtual_size,
        )
        _check_table_size(img, [*blobs, probe])
        l2s, data = _reach(img, img.l1, "active L1")
        counts = _tree_counts(img, l2s, data)
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
        snap_l1 = array("Q", (e & _L1_MASK for e in img.l1))
        l1_offset = _write_new_clusters(img, entries.encode_u64_table(snap_l1))
        entry = _build_entry(
            l1_table_offset=l1_offset, l1_size=l1_size, id_str=new_id, name=name,
            date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock_nsec,
            disk_size=img.virtual_size,
        )
        # 3. new table, flush (snapshot L1 + table, refcounts), header switch
        _switch_table(img, [*blobs, entry], snaps)
        img.flush()  # 4. free the old table
        return read_snapshot_table(img)[-1]


def apply_snapshot(img, name_or_id: str) -> SnapshotInfo:
    """Revert the active layer to snapshot ``name_or_id`` (``qemu-img snapshot -a``:
    an ID first, then a name).  The virtual size becomes the snapshot's."""
    with _for_update(img) as img:
        img.flush()
        snaps = read_snapshot_table(img)
        sn = find_snapshot(snaps, str(name_or_id))
        if sn is None:
            raise _not_found(img, snaps, str(name_or_id))
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
        from .header import size_to_l1

        need_l1 = size_to_l1(sn.disk_size, img.cluster_bits, img.header.l2_entry_size)
        if need_l1 * 8 > spec.MAX_L1_SIZE_BYTES:
            raise FormatError(img.path, f"snapshot {sn.id_str} disk size needs too large an L1")
        sn_l1 = _read_l1(img, sn)
        new_l2s, new_data = _reach(img, sn_l1, f"snapshot {sn.id_str}")
        old_l2s, old_data = _reach(img, img.l1, "active L1")
        inc = _tree_counts(img, new_l2s, new_data)
        dec = _tree_counts(img, old_l2s, old_data)
        _check_increments(img, inc)
        _check_decrements(img, dec)
        old_l1_offset, old_l1_size = img.header.l1_table_offset, img.header.l1_size
        # qemu grows the L1, never shrinks it; a snapshot without a disk size in
        # its extra data (old qemu) gets today's size, maybe past its own L1
        new_l1_size = max(old_l1_size, sn.l1_size, need_l1)

        # -- from here on the image changes ------------------------------------
        img._begin_write()
        # every table and cluster of the new active tree is shared with the
        # snapshot: the new L1 carries no COPIED flag, neither do those L2s
        # (cleared before the increments, as in create)
        new_l1 = array("Q", (e & _L1_MASK for e in sn_l1))
        new_l1.extend(array("Q", bytes(8 * (new_l1_size - len(new_l1)))))
        _mark_copied(img, new_l1, only_clear=True)
        img.flush()
        rc = img.refcounts
        for c, n in inc.items():  # 1. the snapshot's tree gains a reference
            rc.incref(c, n)
        new_l1_offset = _write_new_clusters(img, entries.encode_u64_table(new_l1))
        if not new_l1_size:  # a 0-byte disk: keep the (empty) table where it is
            new_l1_offset = old_l1_offset
        img.flush()  # 2. data (new L1), increments, L2 flags durable
        # 3. one header write switches L1 and size (copy-then-switch)
        img.header = img.header.replace(
            l1_table_offset=new_l1_offset, l1_size=new_l1_size, size=sn.disk_size
        )
        img._write_header()
        img.hf.fsync()
        img.l1 = new_l1
        img.l1_dirty = False
        img.virtual_size = sn.disk_size
        img._metadata_prealloc = None  # a cached guess about the old active tree
        # 4. the old active tree loses its reference (decrements last)
        for c, n in dec.items():
            for _ in range(n):
                rc.free_later(c << img.cluster_bits)
        if old_l1_size and old_l1_offset:
            rc.free_later(old_l1_offset, _clusters(img, old_l1_size * 8))
        img.flush()
        _forget_l2(img, old_l2s)
        img._decomp_cache = None  # freed compressed clusters may be reused
        # 5. COPIED where refcounts are 1 (none expected: the snapshot shares all)
        _mark_copied(img, img.l1, only_clear=False)
        img.flush()
        return sn


def delete_snapshot(img, name_or_id: str) -> SnapshotInfo:
    """Delete snapshot ``name_or_id`` (``qemu-img snapshot -d``: a name first, then an ID)."""
    with _for_update(img) as img:
        img.flush()
        snaps = read_snapshot_table(img)
        sn = _find_for_delete(snaps, str(name_or_id))
        if sn is None:
            raise _not_found(img, snaps, str(name_or_id))
        sn_l1 = _read_l1(img, sn)
        l2s, data = _reach(img, sn_l1, f"snapshot {sn.id_str}")
        dec = _tree_counts(img, l2s, data)
        l1_clusters = _clusters(img, sn.l1_size * 8) if sn.l1_size else 0
        for i in range(l1_clusters):
            dec[(sn.l1_table_offset >> img.cluster_bits) + i] += 1
        _check_decrements(img, dec)
        blobs = [_entry_bytes(img, s) for s in snaps if s is not sn]

        # -- from here on the image changes ------------------------------------
        _begin_metadata_change(img)
        _switch_table(img, blobs, snaps)  # 1. the entry is gone (header switch)
        rc = img.refcounts
        for c, n in dec.items():  # 2. then its tree loses its references
            for _ in range(n):
                rc.free_later(c << img.cluster_bits)
        img.flush()
        _forget_l2(img, l2s)
        img._decomp_cache = None
        # 3. what the active tree now owns alone gets its COPIED flag back
        _mark_copied(img, img.l1, only_clear=False)
        img.flush()
        return sn


def snapshot(path, op: str, name: str | None = None):
    """Convenience: ``op`` is "list"/"l", "create"/"c", "apply"/"a" or "delete"/"d"."""
    op = op.lstrip("-")
    if op in ("l", "list"):
        return list_snapshots(path)
    if name is None:
        raise ValueError(f"snapshot operation {op!r} needs a name")
    if op in ("c", "create"):
        return create_snapshot(path, name)
    if op in ("a", "apply"):
        return apply_snapshot(path, name)
    if op in ("d", "delete"):
        return delete_snapshot(path, name)
    raise ValueError(f"unknown snapshot operation {op!r}")
