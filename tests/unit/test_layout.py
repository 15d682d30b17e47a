"""layout.py: every construct declaration round-trips: build(parse(b)) == b."""

from __future__ import annotations

import construct as cs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyqcow import layout

FIXED = {
    "HeaderV2": (layout.HeaderV2, 72),
    "HeaderV3Tail": (layout.HeaderV3Tail, 32),
    "CompressionTypeField": (layout.CompressionTypeField, 1),
    "ExtensionHeader": (layout.ExtensionHeader, 8),
    "BitmapsExtension": (layout.BitmapsExtension, 24),
    "CryptoExtension": (layout.CryptoExtension, 16),
    "SnapshotEntryFixed": (layout.SnapshotEntryFixed, 40),
    "SnapshotExtraVmState": (layout.SnapshotExtraVmState, 8),
    "SnapshotExtraDiskSize": (layout.SnapshotExtraDiskSize, 8),
    "SnapshotExtraIcount": (layout.SnapshotExtraIcount, 8),
    "BitmapDirectoryEntryFixed": (layout.BitmapDirectoryEntryFixed, 24),
    "L1Entry": (layout.L1Entry, 8),
    "L2Entry": (layout.L2Entry, 8),
    "ExtendedL2Entry": (layout.ExtendedL2Entry, 16),
}


def roundtrip(struct: cs.Construct, data: bytes) -> bytes:
    return layout.build(struct, layout.parse(struct, data))


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_sizes(name: str) -> None:
    struct, size = FIXED[name]
    assert struct.sizeof() == size


@pytest.mark.parametrize("name", sorted(FIXED))
@given(data=st.data())
def test_fixed_structures_roundtrip(name: str, data: st.DataObject) -> None:
    struct, size = FIXED[name]
    raw = data.draw(st.binary(min_size=size, max_size=size))
    assert roundtrip(struct, raw) == raw


def test_layout_parse_returns_plain_dicts() -> None:
    d = layout.parse(layout.HeaderV2, bytes(72))
    assert type(d) is dict
    assert not any(k.startswith("_") for k in d)


# -- feature name table ---------------------------------------------------------------
_names = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=127), min_size=0, max_size=46
)


@st.composite
def feature_entry(draw) -> bytes:
    name = draw(_names).encode("ascii")
    return bytes([draw(st.integers(0, 255)), draw(st.integers(0, 255))]) + name.ljust(46, b"\0")


@given(feature_entry())
def test_feature_name_entry_roundtrip(raw: bytes) -> None:
    assert roundtrip(layout.FeatureNameEntry, raw) == raw


@given(st.lists(feature_entry(), max_size=10))
def test_feature_name_table_roundtrip(entries: list[bytes]) -> None:
    raw = b"".join(entries)
    assert roundtrip(layout.FeatureNameTable, raw) == raw


# -- variable-length entries -------------------------------------------------------------
@st.composite
def snapshot_entry(draw) -> bytes:
    extra = draw(st.binary(max_size=64))
    id_str = draw(st.binary(max_size=20))
    name = draw(st.binary(max_size=40))
    fixed = layout.build(
        layout.SnapshotEntryFixed,
        {
            "l1_table_offset": draw(st.integers(0, 2**64 - 1)),
            "l1_size": draw(st.integers(0, 2**32 - 1)),
            "id_str_size": len(id_str),
            "name_size": len(name),
            "date_sec": draw(st.integers(0, 2**32 - 1)),
            "date_nsec": draw(st.integers(0, 2**32 - 1)),
            "vm_clock_nsec": draw(st.integers(0, 2**64 - 1)),
            "vm_state_size": draw(st.integers(0, 2**32 - 1)),
            "extra_data_size": len(extra),
        },
    )
    body = fixed + extra + id_str + name
    return body + bytes(-len(body) % 8)


@given(snapshot_entry())
def test_snapshot_entry_roundtrip(raw: bytes) -> None:
    assert len(raw) % 8 == 0
    assert roundtrip(layout.SnapshotEntry, raw) == raw


@st.composite
def bitmap_entry(draw) -> bytes:
    extra = draw(st.binary(max_size=32))
    name = draw(st.binary(max_size=40))
    fixed = layout.build(
        layout.BitmapDirectoryEntryFixed,
        {
            "bitmap_table_offset": draw(st.integers(0, 2**64 - 1)),
            "bitmap_table_size": draw(st.integers(0, 2**32 - 1)),
            "flags": draw(st.integers(0, 2**32 - 1)),
            "type": draw(st.integers(0, 255)),
            "granularity_bits": draw(st.integers(0, 255)),
            "name_size": len(name),
            "extra_data_size": len(extra),
        },
    )
    body = fixed + extra + name
    return body + bytes(-len(body) % 8)


@given(bitmap_entry())
def test_bitmap_directory_entry_roundtrip(raw: bytes) -> None:
    assert len(raw) % 8 == 0
    assert roundtrip(layout.BitmapDirectoryEntry, raw) == raw


@pytest.mark.parametrize("order", range(7))
@given(data=st.data())
def test_refcount_block_roundtrip(order: int, data: st.DataObject) -> None:
    bits = 1 << order
    count = data.draw(st.integers(1, 64)) * max(1, 8 // bits)
    raw = data.draw(st.binary(min_size=count * bits // 8, max_size=count * bits // 8))
    assert roundtrip(layout.RefcountBlock(order, count), raw) == raw
