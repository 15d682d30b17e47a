"""pyqcow.snapshot helpers that need no qemu: IDs, lookup order, entry layout."""

from __future__ import annotations

import pytest

from pyqcow import layout
from pyqcow.snapshot_table import (
    SnapshotInfo,
    find_snapshot,
)
from pyqcow.snapshot_table import build_entry as _build_entry
from pyqcow.snapshot_table import find_for_delete as _find_for_delete
from pyqcow.snapshot_table import next_id as _next_id


def _sn(id_str: str, name: str) -> SnapshotInfo:
    return SnapshotInfo(id_str, name, 0, 0, 0, 0, 0, 0, 0, None)


@pytest.mark.parametrize(
    ("ids", "expected"),
    [([], "1"), (["1", "2"], "3"), (["10", "2"], "11"), (["abc"], "1"), (["12abc", "3"], "13"),
     ([" 7"], "8")],
)
def test_next_id_is_qemus_strtoul_max_plus_one(ids: list[str], expected: str) -> None:
    assert _next_id([_sn(i, f"n{i}") for i in ids]) == expected


def test_lookup_order() -> None:
    snaps = [_sn("1", "x"), _sn("2", "1"), _sn("3", "3x")]
    # apply (qemu's find_snapshot_by_id_or_name): an ID first
    assert find_snapshot(snaps, "1").id_str == "1"
    assert find_snapshot(snaps, "x").id_str == "1"
    # delete (qemu-img's bdrv_snapshot_find): a name first, an ID only as fallback
    assert _find_for_delete(snaps, "1").id_str == "2"
    assert _find_for_delete(snaps, "3").id_str == "3"
    assert _find_for_delete(snaps, "nope") is None


def test_entry_layout() -> None:
    raw = _build_entry(
        l1_table_offset=0x30000, l1_size=2, id_str="12", name="näme", date_sec=5,
        date_nsec=6_000, vm_clock_nsec=7, disk_size=1 << 30,
    )
    assert len(raw) % 8 == 0
    entry = layout.parse(layout.SnapshotEntry, raw)
    fixed = entry["fixed"]
    assert fixed["l1_table_offset"] == 0x30000 and fixed["l1_size"] == 2
    assert fixed["extra_data_size"] == 24 and fixed["vm_state_size"] == 0
    assert (fixed["date_sec"], fixed["date_nsec"], fixed["vm_clock_nsec"]) == (5, 6_000, 7)
    assert entry["id_str"] == b"12" and entry["name"] == "näme".encode()
    extra = entry["extra_data"]
    assert int.from_bytes(extra[0:8], "big") == 0
    assert int.from_bytes(extra[8:16], "big") == 1 << 30
    assert int.from_bytes(extra[16:24], "big") == 0  # icount 0, as qemu-img writes
