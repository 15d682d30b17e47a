"""Bit-level helpers of pyqcow.bitmaps (qcow2.rst "Bitmap data": bit k is bit k%8
of byte k//8) and the Bitmap in-memory operations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyqcow.bitmaps import (
    Bitmap,
    BitmapInfo,
    bit_ranges,
    bitmap_bits,
    bitmap_table_size,
    set_bits,
)


def test_bit_order_is_lsb_first() -> None:
    buf = bytearray(2)
    set_bits(buf, 0, 0)
    set_bits(buf, 9, 10)
    assert buf == bytearray([0b00000001, 0b00000110])


def test_sizes() -> None:
    assert bitmap_bits(0, 16) == 0
    assert bitmap_bits(1, 16) == 1
    assert bitmap_bits(65536 * 3 + 1, 16) == 4
    # 64 KiB clusters: one data cluster holds 524288 bits
    assert bitmap_table_size(524288 * 65536, 16, 65536) == 1
    assert bitmap_table_size(524288 * 65536 + 1, 16, 65536) == 2


@given(st.integers(0, 200), st.integers(0, 200), st.integers(0, 200), st.integers(0, 200))
def test_set_bits_and_ranges_match_a_set(a: int, b: int, c: int, d: int) -> None:
    buf = bytearray(32)
    want: set[int] = set()
    for lo, hi in ((min(a, b), max(a, b)), (min(c, d), max(c, d))):
        set_bits(buf, lo, hi)
        want |= set(range(lo, hi + 1))
    got = {k for first, n in bit_ranges(bytes(buf), 256) for k in range(first, first + n)}
    assert got == want
    assert all(buf[k >> 3] >> (k & 7) & 1 == (k in want) for k in range(256))


def _bitmap(size: int, gb: int = 16, flags: int = 2) -> Bitmap:
    nbits = bitmap_bits(size, gb)
    info = BitmapInfo("x", gb, flags, 1, 0, 0)
    return Bitmap(info, bytearray((nbits + 7) >> 3), nbits)


def test_set_range_and_resize() -> None:
    b = _bitmap(10 * 65536)
    assert b.enabled
    b.set_range(65535, 2)  # straddles granules 0 and 1
    b.set_range(9 * 65536 + 100, 10**9)  # clipped to the disk
    assert b.dirty_ranges() == [(0, 2 * 65536), (9 * 65536, 65536)]
    b.resize(3 * 65536)  # bits past the end go
    assert b.dirty_ranges() == [(0, 2 * 65536)]
    b.resize(20 * 65536)  # new bits are clear
    assert b.nbits == 20 and b.dirty_ranges() == [(0, 2 * 65536)]
    b.set_range(0, 0)
    assert b.dirty_ranges() == [(0, 2 * 65536)]


@pytest.mark.parametrize("flags, enabled", [(2, True), (0, False), (3, False)])
def test_enabled_is_auto_and_consistent(flags: int, enabled: bool) -> None:
    assert _bitmap(65536, flags=flags).enabled is enabled
