"""Persistent dirty bitmaps in memory (qcow2.rst "Bitmaps"): loading, storing, merging.

The directory and table formats are pyqcow/bitmap_directory.py.

A writable image loads its bitmaps on the first change (writer.Writer.begin_write),
marks them in use on disk before any data changes, sets the bits of every
granule a write may change in each enabled (auto) bitmap, and stores them on
a clean close (copy-then-switch, in_use cleared).  Bitmaps found in use are
inconsistent and left exactly as they are.  Bit k of the bitmap data is bit
(k % 8) of byte k // 8 and covers guest bytes [k*granularity, (k+1)*granularity).
``merge_problems``/``merge_into`` carry one image's bitmaps into another.
"""

from __future__ import annotations

from array import array

from . import entries, layout, spec
from .bitmap_directory import (
    BME_FLAG_AUTO,
    BME_FLAG_EXTRA_DATA_COMPATIBLE,
    BME_FLAG_IN_USE,
    BME_MAX_PHYS_SIZE,
    BME_MAX_TABLE_SIZE,
    BT_ALL_ONES,
    MAX_BITMAPS,
    BitmapInfo,
    _Flags,
    bitmap_bits,
    bitmap_table_size,
    directory_bytes,
    read_bitmap_directory,
    table_entry,
)
from .errors import FormatError
from .header import check_fits, with_extension

__all__ = [
    "Bitmap",
    "BitmapInfo",
    "allocated_ranges",
    "load_bitmaps",
    "merge_into",
    "merge_problems",
    "read_bitmap",
    "read_bitmap_directory",
    "write_problems",
]

def set_bits(buf: bytearray, first: int, last: int) -> None:
    """Set bits ``first..last`` (inclusive) of ``buf``; bit k is (byte k>>3, bit k&7)."""
    b0, b1 = first >> 3, last >> 3
    lo = (0xFF << (first & 7)) & 0xFF
    hi = 0xFF >> (7 - (last & 7))
    if b0 == b1:
        buf[b0] |= lo & hi
        return
    buf[b0] |= lo
    if b1 > b0 + 1:
        buf[b0 + 1 : b1] = b"\xff" * (b1 - b0 - 1)
    buf[b1] |= hi


def bit_ranges(buf: bytes, nbits: int) -> list[tuple[int, int]]:
    """Runs of set bits of ``buf`` (first ``nbits`` bits) as (first bit, count)."""
    out: list[tuple[int, int]] = []
    n = int.from_bytes(buf, "little") & ((1 << nbits) - 1)
    pos = 0
    while n:
        zeros = (n & -n).bit_length() - 1
        pos += zeros
        n >>= zeros
        ones = (~n & (n + 1)).bit_length() - 1
        out.append((pos, ones))
        pos += ones
        n >>= ones
    return out


class Bitmap(_Flags):
    """One persistent bitmap of an image, with its bits in memory (``bits`` is None
    when they were not loaded: an in-use bitmap, or one pyqcow cannot maintain)."""

    def __init__(self, info: BitmapInfo, bits: bytearray | None, nbits: int,
                 data_clusters: tuple[int, ...] = (), why: str = "") -> None:
        self.name = info.name
        self.flags = info.flags
        self.granularity_bits = info.granularity_bits
        self.type = info.type
        self.extra_data = info.extra_data
        self.table_offset = info.bitmap_table_offset  # 0: not stored yet
        self.table_size = info.bitmap_table_size
        self.bits = bits
        self.nbits = nbits
        self.data_clusters = data_clusters  # host offsets of the stored data clusters
        self.changed = False  # bits or size differ from the stored ones
        self.why = why  # why the bits are not maintained

    @property
    def enabled(self) -> bool:
        """Tracks writes: the auto flag, consistent, and its bits in memory."""
        return bool(self.flags & BME_FLAG_AUTO) and not self.in_use and self.bits is not None

    def set_range(self, offset: int, length: int) -> None:
        """Mark the granules of guest bytes [offset, offset+length) dirty."""
        gb = self.granularity_bits
        first = offset >> gb
        last = min((offset + length - 1) >> gb, self.nbits - 1)
        if length <= 0 or first > last:
            return
        set_bits(self.bits, first, last)
        self.changed = True

    def resize(self, virtual_size: int) -> None:
        nbits = bitmap_bits(virtual_size, self.granularity_bits)
        nbytes = (nbits + 7) >> 3
        self.changed = True
        if nbytes > BME_MAX_PHYS_SIZE:
            self.bits = None  # qemu could not load it: stored in use, never used again
            self.why = "too large for the new disk size"
            return
        if nbits < self.nbits:
            del self.bits[nbytes:]
            if nbits & 7:
                self.bits[-1] &= (1 << (nbits & 7)) - 1
        else:
            self.bits.extend(bytes(nbytes - len(self.bits)))
        self.nbits = nbits

    def is_dirty(self, guest_offset: int) -> bool:
        g = guest_offset >> self.granularity_bits
        return bool(self.bits[g >> 3] >> (g & 7) & 1)

    def dirty_ranges(self) -> list[tuple[int, int]]:
        """Dirty guest ranges (offset, length), the last one clipped to the bitmap's end."""
        gb = self.granularity_bits
        return [(first << gb, count << gb) for first, count in bit_ranges(self.bits, self.nbits)]


def _load_bits(img, info: BitmapInfo, virtual_size: int) -> tuple[bytearray, tuple[int, ...]]:
    """The bits of a consistent bitmap and its data clusters; FormatError if malformed."""
    path, cs = img.path, img.cluster_size
    nbits = bitmap_bits(virtual_size, info.granularity_bits)
    nbytes = (nbits + 7) >> 3
    want = (nbytes + cs - 1) // cs
    if info.bitmap_table_size != want:
        raise FormatError(
            path,
            f"bitmap {info.name!r}: table has {info.bitmap_table_size} entries, "
            f"the disk size needs {want}",
        )
    if nbytes > BME_MAX_PHYS_SIZE or want > BME_MAX_TABLE_SIZE:
        raise FormatError(path, f"bitmap {info.name!r} is too large")
    tbytes = want * 8
    if info.bitmap_table_offset + tbytes > img.file_size:
        raise FormatError(path, f"bitmap {info.name!r}: table lies beyond the end of the file")
    table = entries.decode_u64_table(img.hf.pread(tbytes, info.bitmap_table_offset))
    bits = bytearray(want * cs)
    clusters = []
    for i, e in enumerate(table):
        off, all_ones, reserved = table_entry(e)
        if reserved or (off and (all_ones or off % cs)):
            raise FormatError(path, f"bitmap {info.name!r}: bad table entry {e:#x}")
        if off:
            if off + cs > img.file_size:
                raise FormatError(
                    path, f"bitmap {info.name!r}: data cluster {off:#x} lies beyond the end of the file"
                )
            bits[i * cs : (i + 1) * cs] = img.hf.pread(cs, off)
            clusters.append(off)
        elif all_ones:
            bits[i * cs : (i + 1) * cs] = b"\xff" * cs
    del bits[nbytes:]
    if nbits & 7:  # unused tail bits must be zero: make sure
        bits[-1] &= (1 << (nbits & 7)) - 1
    return bits, tuple(clusters)


def load_bitmaps(img) -> list[Bitmap] | None:
    """Every bitmap of ``img`` with its bits (None: no consistent bitmaps extension).

    FormatError when the directory itself is malformed.  A bitmap that is in use
    (inconsistent), of unknown extra data, or whose table is malformed is kept
    with ``bits`` None: pyqcow never changes it.
    """
    infos = read_bitmap_directory(img)
    if infos is None:
        return None
    out = []
    for info in infos:
        nbits = bitmap_bits(img.virtual_size, info.granularity_bits)
        if info.in_use:
            out.append(Bitmap(info, None, nbits, why="in use (inconsistent)"))
            continue
        if info.extra_data and not info.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE:
            out.append(Bitmap(info, None, nbits, why="has extra data pyqcow does not know"))
            continue
        try:
            bits, clusters = _load_bits(img, info, img.virtual_size)
        except FormatError as e:
            out.append(Bitmap(info, None, nbits, why=e.message))
            continue
        out.append(Bitmap(info, bits, nbits, clusters))
    return out


def read_bitmap(img, name: str) -> Bitmap:
    """Bitmap ``name`` of ``img`` with its bits (inspection; KeyError if absent)."""
    for b in load_bitmaps(img) or []:
        if b.name == name:
            return b
    raise KeyError(name)


# ---------------------------------------------------------------------------------
# storing (copy-then-switch), called on a clean close of an image that was written
# ---------------------------------------------------------------------------------
def _clusters(nbytes: int, cs: int) -> int:
    return max(1, (nbytes + cs - 1) // cs)


def _write_new(img, data: bytes) -> int:
    """Allocate clusters for ``data``, write it there (not yet durable); its offset."""
    cs = img.cluster_size
    off = img.refcounts.alloc(_clusters(len(data), cs))
    img.writer.note_alloc()
    img.hf.pwrite(data + bytes(-len(data) % cs), off)
    return off


def _store_data(img, b: Bitmap) -> None:
    """New data clusters and table for ``b``; the old ones are left for the caller to free."""
    cs = img.cluster_size
    full = b"\xff" * cs
    nbytes = (b.nbits + 7) >> 3
    table = array("Q", bytes(8 * ((nbytes + cs - 1) // cs)))
    clusters = []
    for i in range(len(table)):
        chunk = b.bits[i * cs : (i + 1) * cs]
        if chunk.count(0) == len(chunk):
            continue
        if chunk == full:  # a whole cluster of real bits, all set
            table[i] = BT_ALL_ONES
            continue
        off = _write_new(img, bytes(chunk))
        clusters.append(off)
        table[i] = off
    b.table_offset = _write_new(img, entries.encode_u64_table(table))
    b.table_size = len(table)
    b.data_clusters = tuple(clusters)


def store_bitmaps(img, bitmaps: list[Bitmap]) -> None:
    """Write ``bitmaps`` as the image's bitmaps, crash-safe (copy-then-switch).

    1. new data clusters, tables (only for changed bitmaps) and a new directory,
       flushed (data and refcount increments durable);
    2. one header write switches the bitmaps extension (and sets the autoclear bit);
    3. the old directory, tables and data clusters are freed.
    A maintained bitmap is stored with in_use clear; one whose bits pyqcow does
    not hold keeps its flags (in use) and its stored table.  A crash before 2
    leaves the old directory (bitmaps in use: invalid, never wrong) plus leaks.
    """
    cs = img.cluster_size
    rc = img.refcounts
    old_ext = img.header.bitmaps if img.header.autoclear_features & spec.Autoclear.BITMAPS else None
    to_free: list[tuple[int, int]] = []
    for b in bitmaps:
        if b.bits is None:
            b.flags |= BME_FLAG_IN_USE
            continue
        if b.changed or not b.table_offset:
            if b.table_offset:
                to_free.append((b.table_offset, _clusters(b.table_size * 8, cs)))
                to_free.extend((c, 1) for c in b.data_clusters)
            _store_data(img, b)
            b.changed = False
        b.flags &= ~BME_FLAG_IN_USE
    directory = directory_bytes(bitmaps)
    dir_off = _write_new(img, directory)
    img.flush()
    ext = layout.build(
        layout.BitmapsExtension,
        {
            "nb_bitmaps": len(bitmaps),
            "reserved32": 0,
            "bitmap_directory_size": len(directory),
            "bitmap_directory_offset": dir_off,
        },
    )
    h = with_extension(img.header, spec.ExtType.BITMAPS, ext)
    img.switch_header(h, autoclear_features=h.autoclear_features | spec.Autoclear.BITMAPS)
    if old_ext is not None:
        to_free.append((old_ext.bitmap_directory_offset, _clusters(old_ext.bitmap_directory_size, cs)))
    for off, n in to_free:
        rc.free_later(off, n)
    img.flush()


# ---------------------------------------------------------------------------------
# carrying bitmaps from one image into another (merge)
# ---------------------------------------------------------------------------------
def _unusable(b: BitmapInfo) -> str | None:
    if b.in_use:
        return "is in use (inconsistent: a QEMU has the image open or crashed with it)"
    if b.extra_data and not b.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE:
        return "has extra data that pyqcow does not know"
    return None


def merge_problems(dest, src) -> list[str]:
    """Why the persistent bitmaps of ``src`` cannot be carried validly into ``dest``
    (both open QcowImage; reads metadata only).  Empty when they can, or when src
    has no consistent bitmaps (then there is nothing to carry)."""
    if src.format != "qcow2":
        return []
    try:
        src_bms = read_bitmap_directory(src) or []
    except FormatError as e:
        return [f"{src.path}: cannot read its persistent bitmaps: {e.message}"]
    if not src_bms:
        return []
    names = ", ".join(repr(b.name) for b in src_bms[:5]) + (" ..." if len(src_bms) > 5 else "")
    if dest.format != "qcow2" or dest.header.version < 3:
        kind = "a raw image" if dest.format != "qcow2" else "a version 2 (compat=0.10) image"
        return [
            f"{dest.path}: {kind} cannot store persistent bitmaps, "
            f"and {src.path} has {len(src_bms)} ({names})"
        ]
    out: list[str] = []
    dh = dest.header
    dest_bms: list[BitmapInfo] = []
    if dh.bitmaps is not None and not dh.autoclear_features & spec.Autoclear.BITMAPS:
        out.append(
            f"{dest.path}: has a bitmaps extension marked inconsistent "
            "(run 'pyqcow check -r all' to drop it first)"
        )
    else:
        try:
            dest_bms = read_bitmap_directory(dest) or []
        except FormatError as e:
            out.append(f"{dest.path}: cannot read its persistent bitmaps: {e.message}")
    by_name = {b.name: b for b in dest_bms}
    for b in src_bms:
        why = _unusable(b)
        if why:
            out.append(f"{src.path}: bitmap {b.name!r} {why}")
            continue
        want = bitmap_table_size(src.virtual_size, b.granularity_bits, src.cluster_size)
        if b.bitmap_table_size != want:
            out.append(f"{src.path}: bitmap {b.name!r} does not match the disk size (malformed)")
        if (bitmap_bits(dest.virtual_size, b.granularity_bits) + 7) >> 3 > BME_MAX_PHYS_SIZE:
            out.append(f"{dest.path}: bitmap {b.name!r} would be too large for its disk size")
        d = by_name.get(b.name)
        if d is None:
            continue
        why = _unusable(d)
        if why:
            out.append(f"{dest.path}: bitmap {b.name!r} {why}")
        elif d.bitmap_table_size != bitmap_table_size(
            dest.virtual_size, d.granularity_bits, dest.cluster_size
        ):
            out.append(f"{dest.path}: bitmap {b.name!r} does not match the disk size (malformed)")
        if d.granularity != b.granularity:
            out.append(
                f"bitmap {b.name!r} has granularity {d.granularity} in {dest.path} "
                f"but {b.granularity} in {src.path}"
            )
    all_names = {b.name for b in dest_bms} | {b.name for b in src_bms}
    if len(all_names) > MAX_BITMAPS:
        out.append(f"{dest.path}: more than {MAX_BITMAPS} bitmaps in all")
    if dh.bitmaps is None:  # would the header still fit in cluster 0 with one?
        try:
            check_fits(with_extension(dh, spec.ExtType.BITMAPS, bytes(24)))
        except FormatError:
            out.append(f"{dest.path}: no room in the header for a bitmaps extension")
    return out


def merge_into(dest, src, dirty_ranges=()) -> list[str]:
    """Carry the persistent bitmaps of ``src`` into ``dest`` (open "r+").

    A bitmap present in both becomes the union of their bits (enabled when
    either is enabled: more set bits never make a bitmap wrong); one only in
    src is copied with its flags and granularity (sized for dest's disk: bits
    past dest's end dropped, new ones clear).  Then every enabled bitmap of the
    result gets the bits of ``dirty_ranges`` ((guest offset, length) pairs, for
    merge: every range TOP allocates).  Everything is checked first
    (:func:`merge_problems`; OperationError listing them); nothing is written
    before.  Stored on ``dest.close()`` like any bitmap change; returns the names
    of src's bitmaps carried.
    """
    from .errors import OperationError

    dest.writer.check_writable()
    problems = merge_problems(dest, src)
    if problems:
        raise OperationError(
            dest.path, "cannot carry persistent bitmaps: " + "; ".join(problems)
        )
    src_bms = load_bitmaps(src) or []
    for s in src_bms:
        if s.bits is None:
            raise FormatError(src.path, f"bitmap {s.name!r}: {s.why}")
    dest.writer.begin_write()
    if dest.writer.bitmaps is None:
        dest.writer.bitmaps = []
    by_name = {b.name: b for b in dest.writer.bitmaps}
    for s in src_bms:
        if s.nbits != bitmap_bits(dest.virtual_size, s.granularity_bits):
            s.resize(dest.virtual_size)
        d = by_name.get(s.name)
        if d is None:
            s.table_offset = s.table_size = 0  # src's clusters are not dest's: store anew
            s.data_clusters = ()
            s.changed = True
            dest.writer.bitmaps.append(s)
            continue
        if d.bits is None:  # merge_problems refused these; defensive
            raise OperationError(dest.path, f"bitmap {d.name!r}: {d.why}")
        n = len(d.bits)
        d.bits[:] = (
            int.from_bytes(d.bits, "little") | int.from_bytes(s.bits, "little")
        ).to_bytes(n, "little")
        d.flags |= s.flags & BME_FLAG_AUTO
        d.changed = True
    for off, length in dirty_ranges:
        dest.writer.mark_dirty(off, length)
    return [s.name for s in src_bms]


def allocated_ranges(img) -> list[tuple[int, int]]:
    """(guest offset, length) of every range ``img``'s own layer allocates (data or
    zero clusters): what a merge passes to :func:`merge_into` for TOP."""
    from .entries import ClusterType

    out: list[tuple[int, int]] = []
    for r in img.runs(0, img.virtual_size):
        if r.type in (ClusterType.UNALLOCATED, ClusterType.UNALLOCATED_ALLOC):
            continue
        if out and out[-1][0] + out[-1][1] == r.guest_offset:
            out[-1] = (out[-1][0], out[-1][1] + r.length)
        else:
            out.append((r.guest_offset, r.length))
    return out


def write_problems(img) -> list[str]:
    """Persistent bitmaps of ``img`` that a write through pyqcow cannot keep valid
    (they end up flagged in use, as after a crash): enabled bitmaps pyqcow cannot
    load (unknown extra data, a malformed table) or a directory it cannot read.
    Bitmaps already in use are not listed (they are invalid already).  For
    callers that want to refuse before writing; reads metadata only."""
    if img.format != "qcow2":
        return []
    h = img.header
    if h.version < 3 or h.bitmaps is None or not h.autoclear_features & spec.Autoclear.BITMAPS:
        return []
    try:
        infos = read_bitmap_directory(img) or []
    except FormatError as e:
        return [f"{img.path}: cannot read its persistent bitmaps ({e.message}); a write invalidates them"]
    out = []
    for b in infos:
        if b.in_use:
            continue
        why = _unusable(b)
        if why is None:
            want = bitmap_table_size(img.virtual_size, b.granularity_bits, img.cluster_size)
            if b.bitmap_table_size != want:
                why = "does not match the disk size (malformed)"
        if why:
            out.append(f"{img.path}: bitmap {b.name!r} {why}; a write invalidates it")
    return out
