"""The persistent-bitmap formats (qcow2.rst "Bitmaps"): the bitmap directory and
its entries, and the bitmap table's geometry and entry bits.

Reading a directory into ``BitmapInfo`` records and encoding one; the bits in
memory, loading, storing and merging them are pyqcow/bitmaps.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import layout, spec
from .entries import BME_TABLE_ENTRY_FLAG_ALL_ONES as BT_ALL_ONES  # noqa: F401 (re-export)
from .entries import bitmap_table_entry as table_entry  # noqa: F401 (re-export)
from .errors import FormatError

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BT_DIRTY_TRACKING_BITMAP = 1
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS


class _Flags:
    """What a bitmap's granularity bits and flags say (shared by directory entry and bitmap)."""

    granularity_bits: int
    flags: int

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BME_FLAG_IN_USE)


@dataclass(frozen=True)
class BitmapInfo(_Flags):
    name: str
    granularity_bits: int
    flags: int
    type: int
    bitmap_table_offset: int
    bitmap_table_size: int
    extra_data: bytes = b""

    @property
    def auto(self) -> bool:
        return bool(self.flags & BME_FLAG_AUTO)

    def as_qemu_json(self) -> dict:
        """Qcow2BitmapInfo as qemu-img info prints it (QAPI field order)."""
        flags = []
        if self.in_use:
            flags.append("in-use")
        if self.auto:
            flags.append("auto")
        return {"name": self.name, "granularity": self.granularity, "flags": flags}


def read_bitmap_directory(img) -> list[BitmapInfo] | None:
    """Bitmaps of ``img`` (a QcowImage); None when it has no (consistent) bitmaps.

    As in QEMU, a bitmaps extension without the autoclear "bitmaps" bit means
    the bitmaps were invalidated by a program that did not know them: ignored.
    """
    h = img.header
    ext = h.bitmaps
    if ext is None or not h.autoclear_features & spec.Autoclear.BITMAPS:
        return None
    path = img.path
    size, offset, count = ext.bitmap_directory_size, ext.bitmap_directory_offset, ext.nb_bitmaps
    if not 1 <= count <= MAX_BITMAPS:
        raise FormatError(path, f"bad number of bitmaps {count}")
    if size > MAX_DIRECTORY_SIZE:
        raise FormatError(path, f"bitmap directory too large ({size} bytes)")
    if offset % img.cluster_size:
        raise FormatError(path, f"bitmap directory offset {offset:#x} is not cluster-aligned")
    if offset + size > img.file_size:
        raise FormatError(
            path, f"bitmap directory at {offset:#x} (+{size} bytes) lies beyond the end of the file"
        )
    data = img.hf.pread(size, offset)
    out: list[BitmapInfo] = []
    pos = 0
    while pos < size:
        if pos + layout.BITMAP_DIR_FIXED_SIZE > size:
            raise FormatError(path, "bitmap directory is truncated")
        fixed = layout.parse(
            layout.BitmapDirectoryEntryFixed, data[pos : pos + layout.BITMAP_DIR_FIXED_SIZE]
        )
        name_size, extra_size = fixed["name_size"], fixed["extra_data_size"]
        entry_size = layout.BITMAP_DIR_FIXED_SIZE + extra_size + name_size
        entry_size += -entry_size % 8
        if pos + entry_size > size:
            raise FormatError(path, "bitmap directory entry extends past the directory")
        if len(out) >= count:
            raise FormatError(path, "more bitmaps in the directory than the header extension says")
        if name_size > BME_MAX_NAME_SIZE:
            raise FormatError(path, f"bitmap name too long ({name_size} bytes)")
        gb = fixed["granularity_bits"]
        if not BME_MIN_GRANULARITY_BITS <= gb <= BME_MAX_GRANULARITY_BITS:
            raise FormatError(path, f"bitmap granularity bits {gb} out of range (9..31)")
        if fixed["type"] != BT_DIRTY_TRACKING_BITMAP:
            raise FormatError(path, f"unknown bitmap type {fixed['type']}")
        table_offset = fixed["bitmap_table_offset"]
        if not table_offset or table_offset % img.cluster_size:
            raise FormatError(path, f"bitmap table offset {table_offset:#x} is invalid")
        start = pos + layout.BITMAP_DIR_FIXED_SIZE
        extra = data[start : start + extra_size]
        name = data[start + extra_size : start + extra_size + name_size]
        out.append(
            BitmapInfo(
                name=name.decode("utf-8", "surrogateescape"),
                granularity_bits=gb,
                flags=fixed["flags"],
                type=fixed["type"],
                bitmap_table_offset=table_offset,
                bitmap_table_size=fixed["bitmap_table_size"],
                extra_data=bytes(extra),
            )
        )
        pos += entry_size
    if len(out) != count:
        raise FormatError(path, "fewer bitmaps in the directory than the header extension says")
    return out


# -- the bitmap table (qcow2.rst "Bitmap table") --------------------------------------
BME_MAX_TABLE_SIZE = 0x8000000  # entries (QEMU's limit)
BME_MAX_PHYS_SIZE = 0x20000000  # bytes of bitmap data (QEMU's limit)
# bitmap table entries are decoded in pyqcow/entries.py (BT_ALL_ONES, table_entry)


def bitmap_bits(virtual_size: int, granularity_bits: int) -> int:
    """Number of bits a bitmap of this granularity has for a disk of ``virtual_size``."""
    return (virtual_size + (1 << granularity_bits) - 1) >> granularity_bits


def bitmap_table_size(virtual_size: int, granularity_bits: int, cluster_size: int) -> int:
    """Entries of the bitmap table: one per cluster of bitmap data."""
    data_bytes = (bitmap_bits(virtual_size, granularity_bits) + 7) >> 3
    return (data_bytes + cluster_size - 1) // cluster_size


def directory_bytes(bitmaps) -> bytes:
    """The bitmap directory of ``bitmaps`` (Bitmap objects), entries padded to 8."""
    out = bytearray()
    for b in bitmaps:
        name = b.name.encode("utf-8", "surrogateescape")
        out += layout.build(
            layout.BitmapDirectoryEntryFixed,
            {
                "bitmap_table_offset": b.table_offset,
                "bitmap_table_size": b.table_size,
                "flags": b.flags,
                "type": b.type,
                "granularity_bits": b.granularity_bits,
                "name_size": len(name),
                "extra_data_size": len(b.extra_data),
            },
        )
        out += b.extra_data + name
        out += bytes(-len(out) % 8)
    return bytes(out)
