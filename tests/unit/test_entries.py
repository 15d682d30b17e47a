"""entries.py: the bulk array decoders agree with layout.py's construct declarations;
compressed descriptors encode/decode for every cluster size; L2 entry types."""

from __future__ import annotations

import construct as cs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyqcow import entries, layout, spec
from pyqcow.entries import ClusterType, RefcountBlock

u64 = st.integers(0, 2**64 - 1)


@given(st.lists(u64, max_size=200))
def test_decode_u64_table_matches_construct(values: list[int]) -> None:
    raw = b"".join(v.to_bytes(8, "big") for v in values)
    fast = entries.decode_u64_table(raw)
    declared = cs.Array(len(values), layout.L1Entry).parse(raw)
    assert list(fast) == list(declared) == values
    assert entries.encode_u64_table(fast) == raw


@given(st.lists(st.tuples(u64, u64), max_size=100))
def test_extended_l2_pairs_match_construct(pairs: list[tuple[int, int]]) -> None:
    raw = b"".join(layout.build(layout.ExtendedL2Entry, {"entry": e, "bitmap": b}) for e, b in pairs)
    fast = entries.decode_u64_table(raw)
    declared = cs.Array(len(pairs), layout.ExtendedL2Entry).parse(raw)
    assert [(fast[2 * i], fast[2 * i + 1]) for i in range(len(pairs))] == [
        (d.entry, d.bitmap) for d in declared
    ]


def _flatten(order: int, parsed) -> list[int]:
    if (1 << order) >= 8:
        return list(parsed)
    return [v for byte in parsed for v in byte]


@pytest.mark.parametrize("order", range(7))
@given(data=st.data())
def test_refcount_block_matches_construct(order: int, data: st.DataObject) -> None:
    bits = 1 << order
    count = data.draw(st.integers(1, 128)) * max(1, 8 // bits)
    raw = data.draw(st.binary(min_size=count * bits // 8, max_size=count * bits // 8))
    block = RefcountBlock(raw, order)
    declared = _flatten(order, layout.RefcountBlock(order, count).parse(raw))
    assert block.count == count
    assert block.values() == declared
    assert [block.get(i) for i in range(count)] == declared
    assert block.tobytes() == raw


@pytest.mark.parametrize("order", range(7))
@given(data=st.data())
def test_refcount_block_set_matches_construct_build(order: int, data: st.DataObject) -> None:
    bits = 1 << order
    count = 8 * max(1, 8 // bits)
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=count, max_size=count))
    block = RefcountBlock(bytes(count * bits // 8), order)
    for i, v in enumerate(values):
        block.set(i, v)
    assert block.values() == values
    if bits >= 8:
        built = layout.RefcountBlock(order, count).build(values)
    else:
        per = 8 // bits
        built = layout.RefcountBlock(order, count).build(
            [values[i : i + per] for i in range(0, count, per)]
        )
    assert block.tobytes() == built
    with pytest.raises(OverflowError):
        block.set(0, 1 << bits)


# -- compressed descriptors -----------------------------------------------------------------
@pytest.mark.parametrize("cluster_bits", range(spec.MIN_CLUSTER_BITS, spec.MAX_CLUSTER_BITS + 1))
@given(data=st.data())
def test_compressed_descriptor_roundtrip(cluster_bits: int, data: st.DataObject) -> None:
    shift = entries.compressed_shift(cluster_bits)
    assert shift == 62 - (cluster_bits - 8)
    cluster_size = 1 << cluster_bits
    host = data.draw(st.integers(0, min((1 << shift) - 1, (1 << 56) - 1)))
    # compressed data never needs more than the sector count field can hold
    max_len = (1 << (cluster_bits - 8)) * 512 - (host & 511)
    length = data.draw(st.integers(1, min(max_len, cluster_size + 512)))
    e = entries.encode_compressed(host, length, cluster_bits)
    assert e & spec.QCOW_OFLAG_COMPRESSED and not e & spec.QCOW_OFLAG_COPIED
    assert entries.l2_type(e) == ClusterType.COMPRESSED
    off, nbytes = entries.decode_compressed(e, cluster_bits)
    assert off == host
    end = off + nbytes
    assert end % 512 == 0  # reads whole sectors
    assert host + length <= end < host + length + 512
    # QEMU's formula: nb_csectors = ((e >> x) & mask) + 1
    nb = ((e >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    assert nbytes == nb * 512 - (host & 511)


@pytest.mark.parametrize("cluster_bits", [9, 16, 21])
def test_compressed_descriptor_limits(cluster_bits: int) -> None:
    shift = entries.compressed_shift(cluster_bits)
    with pytest.raises(ValueError):
        entries.encode_compressed(1 << shift, 512, cluster_bits)
    with pytest.raises(ValueError):
        entries.encode_compressed(0, (1 << (cluster_bits - 8)) * 512 + 1, cluster_bits)


def test_compressed_descriptor_known_values() -> None:
    # 64 KiB clusters: offset bits 0..53, sector count bits 54..61
    e = spec.QCOW_OFLAG_COMPRESSED | (3 << 54) | 0x123456
    assert entries.decode_compressed(e, 16) == (0x123456, 4 * 512 - 0x56)
    # 2 MiB clusters: offset bits 0..48
    e = spec.QCOW_OFLAG_COMPRESSED | (1 << 49) | 0x200
    assert entries.decode_compressed(e, 21) == (0x200, 1024)


# -- L1/L2 entry types ---------------------------------------------------------------------
def test_l2_types() -> None:
    C = spec.QCOW_OFLAG_COPIED
    assert entries.l2_type(0) == ClusterType.UNALLOCATED
    assert entries.l2_type(1) == ClusterType.ZERO_PLAIN
    assert entries.l2_type(C | 0x50000) == ClusterType.NORMAL
    assert entries.l2_type(C | 0x50000 | 1) == ClusterType.ZERO_ALLOC
    assert entries.l2_type(C) == ClusterType.UNALLOCATED
    assert entries.l2_type(C, has_data_file=True) == ClusterType.NORMAL
    assert entries.l1_l2_offset(C | 0x70000 | 0x1FF) == 0x70000
    assert entries.l1_copied(C)


def test_subcluster_types() -> None:
    host = spec.QCOW_OFLAG_COPIED | 0x40000
    bitmap = 0b0101 | (0b1000 << 32)
    assert entries.subcluster_type(host, bitmap, 0) == ClusterType.NORMAL
    assert entries.subcluster_type(host, bitmap, 1) == ClusterType.UNALLOCATED_ALLOC
    assert entries.subcluster_type(host, bitmap, 3) == ClusterType.ZERO_ALLOC
    assert entries.subcluster_type(0, 1 << 35, 3) == ClusterType.ZERO_PLAIN
    assert entries.subcluster_type(0, 0, 3) == ClusterType.UNALLOCATED
    assert entries.extended_bitmap_valid(host, bitmap)
    assert not entries.extended_bitmap_valid(host, 1 | (1 << 32))  # both alloc and zero
    assert not entries.extended_bitmap_valid(0, 1)  # alloc bit without a host cluster


@pytest.mark.parametrize("order", range(7))
@given(data=st.data())
def test_refcount_block_count_nonzero(order: int, data: st.DataObject) -> None:
    bits = 1 << order
    count = data.draw(st.integers(1, 64)) * max(1, 8 // bits)
    raw = data.draw(st.binary(min_size=count * bits // 8, max_size=count * bits // 8))
    block = RefcountBlock(raw, order)
    stop = data.draw(st.integers(0, count + 3))
    assert block.count_nonzero(stop) == sum(1 for v in block.values()[:stop] if v)
    assert block.count_nonzero() == sum(1 for v in block.values() if v)
