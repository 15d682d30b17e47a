"""The internal snapshot table (qcow2.rst "Snapshots"): metadata only.

``read_snapshot_table(img)`` parses and validates the snapshot table of an
open image into frozen ``SnapshotInfo`` records, checking QEMU's limits
(block/qcow2-snapshot.c ``qcow2_read_snapshots``, block/qcow2.h) before
anything is allocated.  ``SnapshotInfo.extra_data`` keeps the entry's extra
data byte for byte, and ``entry_bytes`` re-reads an entry as stored, so a
rewrite preserves fields this version does not know.  ``build_entry`` encodes a
new entry as qemu-img 7.2 writes it; the lookups follow qemu's orders.

Changing snapshots (create/apply/delete on an open image) is pyqcow/snapshot.py;
opening an image by path to do so is pyqcow/ops/snapshot.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import layout, spec
from .errors import CorruptImageError, FormatError, OperationError

__all__ = [
    "MAX_NAME_BYTES",
    "SnapshotExistsError",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "build_entry",
    "check_table_size",
    "entry_bytes",
    "find_for_delete",
    "find_snapshot",
    "next_id",
    "not_found",
    "read_snapshot_table",
]

#: qemu keeps snapshot names in a char[256] (QEMUSnapshotInfo.name)
MAX_NAME_BYTES = 255


class SnapshotNotFoundError(OperationError):
    """No internal snapshot has the given ID or name."""


class SnapshotExistsError(OperationError):
    """An internal snapshot with that name already exists."""


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


def decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


# -- reading -------------------------------------------------------------------------
def read_snapshot_table(img) -> list[SnapshotInfo]:
    """Parse the snapshot table of ``img`` (an open qcow2 image), validating every entry."""
    h = img.header
    count = h.nb_snapshots
    if not count:
        return []
    if count > spec.MAX_SNAPSHOTS:
        raise FormatError(img.path, f"too many snapshots ({count}, maximum {spec.MAX_SNAPSHOTS})")
    start = h.snapshots_offset
    if start % img.cluster_size:
        raise FormatError(img.path, f"snapshot table offset {start:#x} is not cluster-aligned")
    out: list[SnapshotInfo] = []
    pos = start
    for index in range(count):
        sn = _read_entry(img, index, start, pos)
        out.append(sn)
        pos += sn.entry_size
    return out


def _beyond_end(img, index: int, pos: int) -> FormatError:
    return FormatError(
        img.path, f"snapshot table entry {index} at offset {pos:#x} lies beyond the end of the file"
    )


def _read_entry(img, index: int, start: int, pos: int) -> SnapshotInfo:
    """Entry ``index`` of the table at ``start``, stored at ``pos``."""
    path, file_size = img.path, img.file_size
    if pos - start + layout.SNAPSHOT_FIXED_SIZE > spec.MAX_SNAPSHOTS_TABLE_BYTES:
        raise FormatError(path, "snapshot table too large (more than 64 MiB)")
    if pos + layout.SNAPSHOT_FIXED_SIZE > file_size:
        raise _beyond_end(img, index, pos)
    fixed = layout.parse(layout.SnapshotEntryFixed, img.hf.pread(layout.SNAPSHOT_FIXED_SIZE, pos))
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
        raise _beyond_end(img, index, pos)
    body = img.hf.pread(var_size, pos + layout.SNAPSHOT_FIXED_SIZE)
    extra = body[:extra_size]
    id_raw = body[extra_size : extra_size + fixed["id_str_size"]]
    name_raw = body[extra_size + fixed["id_str_size"] :]
    _check_l1(img, index, fixed["l1_table_offset"], fixed["l1_size"])
    vm_state_size = fixed["vm_state_size"]
    if extra_size >= 8:
        vm_state_size = int.from_bytes(extra[0:8], "big")
    disk_size = int.from_bytes(extra[8:16], "big") if extra_size >= 16 else img.header.size
    icount: int | None = None
    if extra_size >= 24:
        raw_icount = int.from_bytes(extra[16:24], "big")
        if raw_icount != (1 << 64) - 1:
            icount = raw_icount
    return SnapshotInfo(
        id_str=decode_name(id_raw),
        name=decode_name(name_raw),
        l1_table_offset=fixed["l1_table_offset"],
        l1_size=fixed["l1_size"],
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


def _check_l1(img, index: int, l1_offset: int, l1_size: int) -> None:
    path = img.path
    if l1_offset % img.cluster_size:
        raise CorruptImageError(
            path, f"snapshot {index} L1 table offset {l1_offset:#x} is not cluster-aligned"
        )
    if l1_size * 8 > spec.MAX_L1_SIZE_BYTES:
        raise FormatError(
            path, f"snapshot {index} L1 table too large ({l1_size} entries, maximum 4 Mi)"
        )
    if l1_size and l1_offset + l1_size * 8 > img.file_size:
        raise CorruptImageError(
            path, f"snapshot {index} L1 table at {l1_offset:#x} lies beyond the end of the file"
        )


def entry_bytes(img, sn: SnapshotInfo) -> bytes:
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


# -- lookups ---------------------------------------------------------------------------
def find_snapshot(snapshots: list[SnapshotInfo], name_or_id: str) -> SnapshotInfo | None:
    """qemu's lookup order: an exact ID first, then a name."""
    for sn in snapshots:
        if sn.id_str == name_or_id:
            return sn
    for sn in snapshots:
        if sn.name == name_or_id:
            return sn
    return None


def find_for_delete(snaps: list[SnapshotInfo], name_or_id: str) -> SnapshotInfo | None:
    """qemu-img snapshot -d matches names only (bdrv_snapshot_find); an ID is our extension,
    tried only when no name matches, so we never pick a different snapshot than qemu."""
    for sn in snaps:
        if sn.name == name_or_id:
            return sn
    for sn in snaps:
        if sn.id_str == name_or_id:
            return sn
    return None


def not_found(path, snaps: list[SnapshotInfo], name_or_id: str) -> SnapshotNotFoundError:
    known = ", ".join(f"{s.id_str} ({s.name})" for s in snaps[:10]) or "none"
    if len(snaps) > 10:
        known += f", ... {len(snaps)} in all"
    return SnapshotNotFoundError(
        path, f"no internal snapshot with ID or name {name_or_id!r} (snapshots: {known})"
    )


def next_id(snaps: list[SnapshotInfo]) -> str:
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


# -- writing entries ---------------------------------------------------------------------
def build_entry(
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
    id_raw, name_raw = encode_name(id_str), encode_name(name)
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


def check_table_size(path, blobs: list[bytes]) -> None:
    """A table of these entries stays within QEMU's limits."""
    if len(blobs) > spec.MAX_SNAPSHOTS:
        raise OperationError(
            path, f"too many snapshots ({len(blobs)}, maximum {spec.MAX_SNAPSHOTS})"
        )
    if sum(map(len, blobs)) > spec.MAX_SNAPSHOTS_TABLE_BYTES:
        raise OperationError(path, "snapshot table would exceed 64 MiB")
