"""Internal snapshots (qcow2.rst "Snapshots").

Reading: ``read_snapshot_table(img)`` parses and validates the snapshot table
of an open QcowImage into frozen ``SnapshotInfo`` records, checking QEMU's
limits (block/qcow2-snapshot.c ``qcow2_read_snapshots``, block/qcow2.h) before
anything is allocated.  Writing (create/apply/delete) builds on these records;
``SnapshotInfo.extra_data`` keeps the entry's extra data byte for byte so a
rewrite preserves fields this version does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import layout, spec
from .errors import CorruptImageError, FormatError

__all__ = ["SnapshotInfo", "find_snapshot", "read_snapshot_table"]


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
