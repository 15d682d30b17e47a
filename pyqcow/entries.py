"""Pure encode/decode of L1, L2 and refcount entries (qcow2.rst "Cluster mapping").

Bulk tables use ``array`` + ``byteswap``; tests prove they agree with the
construct declarations in layout.py.
"""

from __future__ import annotations

import sys

from . import spec
from .intenum import IntEnum  # (not enum's: start-up time)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from array import array

_LITTLE = sys.byteorder == "little"


class ClusterType(IntEnum):
    """QEMU's QCow2SubclusterType, for one (sub)cluster."""

    UNALLOCATED = 0  # reads from the backing file (or zeros)
    ZERO_PLAIN = 1  # reads as zeros, no host cluster
    ZERO_ALLOC = 2  # reads as zeros, host cluster preallocated
    NORMAL = 3  # data at host offset
    COMPRESSED = 4
    UNALLOCATED_ALLOC = 5  # extended L2: subcluster not allocated in an allocated cluster


def decode_u64_table(data: bytes | bytearray | memoryview) -> array:
    """Big-endian u64 table -> array('Q') in native order."""
    # array is imported where it is used, not with this module: its import brings
    # collections (array registers with collections.abc), ~2 ms of a start-up, and
    # info reads no table (the modules that only ever handle tables import it at once)
    from array import array

    a = array("Q")
    a.frombytes(data)
    if _LITTLE:
        a.byteswap()
    return a


def encode_u64_table(table: array) -> bytes:
    if _LITTLE:
        from array import array

        b = array("Q", table)
        b.byteswap()
        return b.tobytes()
    return table.tobytes()


# -- L1 ------------------------------------------------------------------------
def l1_l2_offset(entry: int) -> int:
    return entry & spec.L1E_OFFSET_MASK


def l1_copied(entry: int) -> bool:
    return bool(entry & spec.QCOW_OFLAG_COPIED)


# -- compressed descriptors ----------------------------------------------------
def compressed_shift(cluster_bits: int) -> int:
    return 62 - (cluster_bits - 8)


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """-> (host byte offset, number of bytes to read) of a compressed cluster."""
    shift = compressed_shift(cluster_bits)
    offset = entry & ((1 << shift) - 1)
    nb_sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, nb_sectors * 512 - (offset & 511)


def encode_compressed(host_offset: int, length: int, cluster_bits: int) -> int:
    """L2 entry for ``length`` compressed bytes stored at ``host_offset``."""
    shift = compressed_shift(cluster_bits)
    if host_offset >> shift:
        raise ValueError("compressed host offset too large for this cluster size")
    end = host_offset + length
    nb_sectors = ((end + 511) >> 9) - (host_offset >> 9)
    extra = nb_sectors - 1
    if extra >> (cluster_bits - 8):
        raise ValueError("compressed data too large")
    return spec.QCOW_OFLAG_COMPRESSED | (extra << shift) | host_offset


# -- L2 ------------------------------------------------------------------------
def l2_type(entry: int, has_data_file: bool = False) -> ClusterType:
    """Type of a standard (non-extended) L2 entry."""
    if entry & spec.QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    offset = entry & spec.L2E_OFFSET_MASK
    if entry & spec.QCOW_OFLAG_ZERO:
        return ClusterType.ZERO_ALLOC if offset else ClusterType.ZERO_PLAIN
    if offset or (has_data_file and entry & spec.QCOW_OFLAG_COPIED):
        return ClusterType.NORMAL
    return ClusterType.UNALLOCATED


def l2_read_type(entry: int, has_data_file: bool, version: int) -> ClusterType:
    """``l2_type`` as an image of qcow2 ``version`` reads the entry: version 2 has
    no zero clusters, so there a zero flag without a host cluster reads from the
    backing file (UNALLOCATED), as QEMU reads it."""
    t = l2_type(entry, has_data_file)
    return ClusterType.UNALLOCATED if t == ClusterType.ZERO_PLAIN and version < 3 else t


def subcluster_type(entry: int, bitmap: int, sc_index: int, has_data_file: bool = False) -> ClusterType:
    """Type of subcluster ``sc_index`` of an extended L2 entry."""
    if entry & spec.QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    allocated = entry & spec.L2E_OFFSET_MASK or (has_data_file and entry & spec.QCOW_OFLAG_COPIED)
    if (bitmap >> (32 + sc_index)) & 1:
        return ClusterType.ZERO_ALLOC if allocated else ClusterType.ZERO_PLAIN
    if (bitmap >> sc_index) & 1:
        return ClusterType.NORMAL if allocated else ClusterType.UNALLOCATED  # invalid, caught by caller
    return ClusterType.UNALLOCATED_ALLOC if allocated else ClusterType.UNALLOCATED


def extended_bitmap_valid(entry: int, bitmap: int, has_data_file: bool = False) -> bool:
    if entry & spec.QCOW_OFLAG_COMPRESSED:
        return True  # reserved, QEMU ignores
    if (bitmap >> 32) & bitmap & 0xFFFFFFFF:
        return False
    allocated = entry & spec.L2E_OFFSET_MASK or (has_data_file and entry & spec.QCOW_OFLAG_COPIED)
    if not allocated and bitmap & 0xFFFFFFFF:
        return False
    return True


# -- refcount blocks -----------------------------------------------------------
class RefcountBlock:
    """One refcount block, any refcount_order 0..6, edited in place."""

    __slots__ = ("_typed", "bits", "count", "data", "order")

    _TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}

    def __init__(self, data: bytes | bytearray, order: int) -> None:
        self.order = order
        self.bits = 1 << order
        self.count = len(data) * 8 // self.bits
        code = self._TYPECODES.get(order)
        from array import array  # (see decode_u64_table)

        if code is not None and array(code).itemsize == self.bits // 8:
            t = array(code)
            t.frombytes(data)
            if _LITTLE and self.bits > 8:
                t.byteswap()
            self._typed = t
            self.data = None
        else:
            self._typed = None
            self.data = bytearray(data)

    def get(self, index: int) -> int:
        if self._typed is not None:
            return self._typed[index]
        bits = self.bits
        byte, shift = divmod(index * bits, 8)
        return (self.data[byte] >> shift) & ((1 << bits) - 1)

    def set(self, index: int, value: int) -> None:
        if value < 0 or value >> self.bits:
            raise OverflowError(f"refcount {value} does not fit in {self.bits} bits")
        if self._typed is not None:
            self._typed[index] = value
            return
        bits = self.bits
        byte, shift = divmod(index * bits, 8)
        mask = ((1 << bits) - 1) << shift
        self.data[byte] = (self.data[byte] & ~mask) | (value << shift)

    def values(self) -> list[int]:
        if self._typed is not None:
            return self._typed.tolist()
        return [self.get(i) for i in range(self.count)]

    def count_nonzero(self, stop: int | None = None) -> int:
        """How many of the entries [0, stop) are non-zero."""
        stop = self.count if stop is None else max(0, min(stop, self.count))
        if self._typed is not None:
            return stop - self._typed[:stop].count(0)
        per_byte = 8 // self.bits
        full, rest = divmod(stop, per_byte)
        n = sum(bytes(self.data[:full]).translate(_NONZERO_PER_BYTE[self.order]))
        return n + sum(1 for i in range(full * per_byte, stop) if self.get(i))

    def tobytes(self) -> bytes:
        if self._typed is not None:
            if _LITTLE and self.bits > 8:
                from array import array

                t = array(self._typed.typecode, self._typed)
                t.byteswap()
                return t.tobytes()
            return self._typed.tobytes()
        return bytes(self.data)


# order (0..2) -> 256-byte table: number of non-zero sub-byte refcounts in a byte
# (each 1-, 2- or 4-bit field folded onto its low bit, then counted: ~0.1 ms at import,
# where summing the fields one by one took ~1 ms of every command's start-up)
_NONZERO_PER_BYTE = {
    0: bytes(b.bit_count() for b in range(256)),
    1: bytes(((b | b >> 1) & 0x55).bit_count() for b in range(256)),
    2: bytes(((b | b >> 1 | b >> 2 | b >> 3) & 0x11).bit_count() for b in range(256)),
}


def refcount_max(order: int) -> int:
    return (1 << (1 << order)) - 1


# --- entry helpers for check/repair, the walker, snapshots and pyqcow.testing
# QEMU's view of entries as check/repair and the reference walker need it.
REFT_RESERVED_MASK = 0x1FF
# bitmap table entries (qcow2.rst "Bitmaps"; block/qcow2-bitmap.c)
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1


def l1_reserved_bits(entry: int) -> int:
    return entry & spec.L1E_RESERVED_MASK


def l2_host_offset(entry: int) -> int:
    """Host offset of a standard (not compressed) L2 entry (0: none)."""
    return entry & spec.L2E_OFFSET_MASK


def l2_reserved_bits(entry: int) -> int:
    return entry & spec.L2E_RESERVED_MASK


def l2_with_host_offset(entry: int, host_offset: int) -> int:
    """``entry`` with its host offset field replaced by ``host_offset`` (flags kept)."""
    return (entry & ~spec.L2E_OFFSET_MASK) | host_offset


def is_compressed(entry: int) -> bool:
    return bool(entry & spec.QCOW_OFLAG_COMPRESSED)


def has_zero_flag(entry: int) -> bool:
    return bool(entry & spec.QCOW_OFLAG_ZERO)


def is_copied(entry: int) -> bool:
    """The COPIED flag of an L1 or L2 entry."""
    return bool(entry & spec.QCOW_OFLAG_COPIED)


def with_copied(entry: int, copied: bool) -> int:
    """``entry`` with its COPIED flag set or cleared."""
    return entry | spec.QCOW_OFLAG_COPIED if copied else entry & ~spec.QCOW_OFLAG_COPIED


ZERO_PLAIN_ENTRY = spec.QCOW_OFLAG_ZERO  # standard L2: reads as zeros, no host cluster


def subcluster_conflict(bitmap: int) -> int:
    """Extended L2: the subclusters marked both allocated and zero (must be none)."""
    return (bitmap >> 32) & bitmap


def subclusters_allocated(bitmap: int) -> int:
    return bitmap & ALL_ALLOC_BITS


def bitmap_all_zero(bitmap: int) -> int:
    """Extended L2: the bitmap of a plain zero cluster made from ``bitmap``
    (every subcluster allocated or zero becomes zero, none allocated)."""
    bitmap |= bitmap << 32
    return bitmap & (ALL_ALLOC_BITS << 32)


def reftable_block_offset(entry: int) -> int:
    return entry & spec.REFT_OFFSET_MASK


def reftable_reserved_bits(entry: int) -> int:
    return entry & REFT_RESERVED_MASK


def bitmap_table_entry(entry: int) -> tuple[int, bool, bool]:
    """(data cluster offset, "all ones" flag, reserved bits set) of a bitmap table entry."""
    return (entry & BME_TABLE_ENTRY_OFFSET_MASK, bool(entry & BME_TABLE_ENTRY_FLAG_ALL_ONES),
            bool(entry & BME_TABLE_ENTRY_RESERVED_MASK))


def bitmap_data_offset(entry: int) -> int:
    """Host offset of a bitmap data cluster named by a bitmap table entry (0: none)."""
    return entry & BME_TABLE_ENTRY_OFFSET_MASK


def bitmap_table_entry_invalid(entry: int, cluster_size: int) -> bool:
    """A bitmap table entry QEMU's check counts as a corruption."""
    offset = entry & BME_TABLE_ENTRY_OFFSET_MASK
    return bool(entry & BME_TABLE_ENTRY_RESERVED_MASK or (
        offset and (entry & BME_TABLE_ENTRY_FLAG_ALL_ONES or offset % cluster_size)
    ))


def bitmap_all_ones(entry: int) -> bool:
    """A bitmap table entry whose (absent) data cluster reads as all ones."""
    return bool(entry & BME_TABLE_ENTRY_FLAG_ALL_ONES)


def subclusters_zero(bitmap: int) -> int:
    """Extended L2: the "reads as zeros" half of the subcluster bitmap."""
    return bitmap >> 32


_T_COMPRESSED = ClusterType.COMPRESSED
_T_ZERO_ALLOC = ClusterType.ZERO_ALLOC
_T_ZERO_PLAIN = ClusterType.ZERO_PLAIN
_T_NORMAL = ClusterType.NORMAL
_T_UNALLOCATED = ClusterType.UNALLOCATED


_F_COPIED = spec.QCOW_OFLAG_COPIED
_F_COMPRESSED = spec.QCOW_OFLAG_COMPRESSED
_F_ZERO = spec.QCOW_OFLAG_ZERO
_M_L2_OFFSET = spec.L2E_OFFSET_MASK
_M_L2_RESERVED = spec.L2E_RESERVED_MASK


def l2_decode(entry: int, extended: bool = False,
              has_data_file: bool = False) -> tuple[ClusterType, int, int, bool]:
    """-> (type, host offset, reserved bits, COPIED) of an L2 entry, in one call
    (check's per-entry loops).  The type is QEMU's qcow2_get_cluster_type: that of
    ``l2_type``, except that with extended L2 the zero flag (bit 0) is no type bit
    (the subcluster bitmap says it).  A compressed entry has no host offset or
    reserved bits here: ``decode_compressed`` reads its descriptor."""
    copied = entry >= _F_COPIED  # bit 63 of an unsigned 64-bit entry
    if entry & _F_COMPRESSED:
        return _T_COMPRESSED, 0, 0, copied
    offset = entry & _M_L2_OFFSET
    if entry & _F_ZERO and not extended:
        t = _T_ZERO_ALLOC if offset else _T_ZERO_PLAIN
    elif offset or (has_data_file and copied):
        t = _T_NORMAL
    else:
        t = _T_UNALLOCATED
    return t, offset, entry & _M_L2_RESERVED, copied


# --- the entry bits the engine (image, writer, refcount, mapping) tests and sets
#: an extended L2 bitmap with every subcluster reading as zeros (no data bit)
ALL_ZERO_BITS = 0xFFFFFFFF << 32
#: an extended L2 bitmap with every subcluster allocated (no zero bit)
ALL_ALLOC_BITS = 0xFFFFFFFF


def l2_private(entry: int) -> bool:
    """A host cluster the active layer alone owns (COPIED, an offset, not
    compressed): a guest write may overwrite it in place."""
    return bool(entry & spec.QCOW_OFLAG_COPIED and entry & spec.L2E_OFFSET_MASK
                and not entry & spec.QCOW_OFLAG_COMPRESSED)


def l2_malformed(entry: int, cluster_size: int) -> bool:
    """Reserved bits set or an offset not aligned to a cluster."""
    return bool(entry & spec.L2E_RESERVED_MASK & ~1 or entry & spec.L2E_OFFSET_MASK & (cluster_size - 1))


def data_entry(host: int) -> int:
    """L1 or L2 entry pointing at a host cluster the active layer owns (COPIED)."""
    return host | spec.QCOW_OFLAG_COPIED


def zero_entry(host: int = 0) -> int:
    """Standard L2 entry reading as zeros (``host``: a preallocated cluster)."""
    return host | spec.QCOW_OFLAG_ZERO


# The read fast path (pyqcow.image.readinto) applies these masks itself, where a
# function call per cluster would cost more than the work; the bits stay defined
# here.
L1_TABLE_MASK = spec.L1E_OFFSET_MASK  # an L1 entry's L2 table offset
L2_HOST_MASK = spec.L2E_OFFSET_MASK  # an L2 entry's host offset
COMPRESSED_BIT = spec.QCOW_OFLAG_COMPRESSED
COPIED_BIT = spec.QCOW_OFLAG_COPIED
ZERO_BIT = spec.QCOW_OFLAG_ZERO


def read_masks(cluster_size: int) -> tuple[int, int]:
    """-> (error, special) masks of standard L2 entries for this cluster size:
    ``error``: reserved bits or an unaligned offset (a malformed data entry);
    ``special``: any bit making an entry something other than plain data."""
    error = (spec.L2E_RESERVED_MASK & ~1) | (spec.L2E_OFFSET_MASK & (cluster_size - 1))
    return error, error | spec.QCOW_OFLAG_COMPRESSED | spec.QCOW_OFLAG_ZERO


# extended L2 bitmaps: bit i = subcluster i allocated, bit 32+i = reads as zeros
def subclusters(first: int, count: int) -> int:
    """Mask of ``count`` subclusters from ``first`` (in the allocation half)."""
    return ((1 << count) - 1) << first


def bitmap_allocate(bitmap: int, mask: int) -> int:
    """Subclusters ``mask`` now hold data: allocated, no longer zero."""
    return (bitmap | mask) & ~(mask << 32)


def bitmap_unallocate(bitmap: int, mask: int, zero: bool) -> int:
    """Subclusters ``mask`` hold no data any more: zero, or read from below."""
    bitmap &= ~mask
    return bitmap | (mask << 32) if zero else bitmap


def writable_host(entry: int) -> int:
    """Host offset of a standard L2 entry's cluster when a guest write may go there
    in place (plain data, COPIED); else 0.  (The write hot path: one call.)"""
    if entry & _NOT_IN_PLACE != spec.QCOW_OFLAG_COPIED:
        return 0
    return entry & spec.L2E_OFFSET_MASK


def l1_private_table(entry: int) -> int:
    """Offset of the L2 table an L1 entry points at when the active layer alone
    owns it (COPIED); else 0."""
    return entry & spec.L1E_OFFSET_MASK if entry & spec.QCOW_OFLAG_COPIED else 0


_NOT_IN_PLACE = spec.QCOW_OFLAG_COPIED | spec.QCOW_OFLAG_COMPRESSED | spec.QCOW_OFLAG_ZERO
