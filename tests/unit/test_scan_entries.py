"""The entry decoders check and the walker use (pyqcow/entries.py, h-check block)."""

from __future__ import annotations

import random

import pytest

from pyqcow import entries, spec
from pyqcow.entries import ClusterType

SPECIAL = [
    0,
    spec.QCOW_OFLAG_COPIED,
    spec.QCOW_OFLAG_ZERO,
    spec.QCOW_OFLAG_ZERO | 0x50000,
    spec.QCOW_OFLAG_COPIED | 0x50000,
    spec.QCOW_OFLAG_COMPRESSED | 0x1234,
    spec.QCOW_OFLAG_COMPRESSED | spec.QCOW_OFLAG_COPIED | 0x1234,
    0x50000 | 0x2,  # a reserved bit
    (1 << 64) - 1,
]


def _entries():
    rng = random.Random(13)
    return SPECIAL + [rng.getrandbits(64) for _ in range(2000)] + [
        rng.getrandbits(64) & (spec.L2E_OFFSET_MASK | spec.QCOW_OFLAG_COPIED | 1)
        for _ in range(500)
    ]


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("data_file", [False, True])
def test_l2_decode_is_l2_type_plus_qemu_extended_rule(extended: bool, data_file: bool) -> None:
    for e in _entries():
        t, offset, reserved, copied = entries.l2_decode(e, extended, data_file)
        want = entries.l2_type(e & ~spec.QCOW_OFLAG_ZERO if extended else e, data_file)
        assert t == want, hex(e)
        assert copied == entries.is_copied(e) == bool(e >> 63)
        if t == ClusterType.COMPRESSED:
            assert (offset, reserved) == (0, 0)
        else:
            assert offset == entries.l2_host_offset(e) == e & spec.L2E_OFFSET_MASK
            assert reserved == entries.l2_reserved_bits(e) == e & spec.L2E_RESERVED_MASK


def test_copied_flag_round_trip() -> None:
    for e in _entries():
        assert entries.is_copied(entries.with_copied(e, True))
        assert not entries.is_copied(entries.with_copied(e, False))
        assert entries.with_copied(e, entries.is_copied(e)) == e


def test_subcluster_bitmap_helpers() -> None:
    bm = (0b0101 << 32) | 0b0110  # zero: 0, 2; allocated: 1, 2
    assert entries.subcluster_conflict(bm) == 0b0100
    assert entries.subclusters_allocated(bm) == 0b0110
    assert entries.subclusters_zero(bm) == 0b0101
    # a plain zero cluster: every allocated or zero subcluster reads as zero
    assert entries.bitmap_all_zero(bm) == 0b0111 << 32


def test_bitmap_table_entries() -> None:
    cs = 65536
    assert not entries.bitmap_table_entry_invalid(0, cs)
    assert not entries.bitmap_table_entry_invalid(1, cs)  # all ones, no cluster
    assert not entries.bitmap_table_entry_invalid(3 * cs, cs)
    assert entries.bitmap_table_entry_invalid(3 * cs | 1, cs)  # data and all-ones
    assert entries.bitmap_table_entry_invalid(3 * cs + 512, cs)  # unaligned
    assert entries.bitmap_table_entry_invalid(1 << 60, cs)  # reserved bits
    assert entries.bitmap_data_offset(3 * cs | 1) == 3 * cs
    assert entries.bitmap_all_ones(1) and not entries.bitmap_all_ones(3 * cs)


def test_reftable_entries() -> None:
    assert entries.reftable_block_offset(0x50000 | 0x1FF) == 0x50000
    assert entries.reftable_reserved_bits(0x50000 | 0x3) == 0x3
    assert entries.reftable_reserved_bits(0x50000) == 0
