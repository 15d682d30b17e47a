"""The one reference walker: who references which host range, and as what.

``walk_references(img)`` follows every pointer in a qcow2 file the way
``qemu-img check`` counts refcounts (block/qcow2-refcount.c
``calculate_refcounts``) and yields typed ``Reference`` records: the header,
the refcount table and its blocks, the active L1 and each snapshot's L1 with
their L2 tables and data (normal, zero with a host cluster, compressed, VM
state), the snapshot table, and the bitmap directory with its bitmap tables
and data.  A cluster is referenced once per pointer, so for a consistent image
the number of references into each cluster is its stored refcount.

Its corruption rules, stated once:

* an L2 table that is unaligned or reaches past the end of the file is still
  a reference, but is not read (``errors`` says why);
* a snapshot table or bitmap directory that cannot be parsed is noted in
  ``errors`` and skipped; the bitmaps count only when the autoclear "bitmaps"
  bit says they are consistent (QEMU ignores them otherwise);
* a bitmap table reaching past the end of the file is referenced, not read;
* entries are decoded by pyqcow.entries only.

``pyqcow.scan`` (``qemu-img check``, which must also reproduce QEMU's messages
and counts for every broken entry) walks the same structures with the same
primitives (``nonzero_entries``, ``read_snapshots``, ``snapshot_entry_end``);
forensic's ``dump`` and ``orphans`` consume the records.
"""

from __future__ import annotations

import itertools
import operator
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field

from . import entries, layout, spec
from .errors import QcowError

__all__ = [
    "Reference",
    "ReferenceWalk",
    "cluster_references",
    "l1_tree",
    "nonzero_entries",
    "read_snapshots",
    "snapshot_entry_end",
    "walk_references",
]


@dataclass(frozen=True, slots=True)
class Reference:
    """``length`` bytes at ``host_offset`` that ``owner`` points to as ``kind``.

    kind: header, refcount_table, refcount_block, l1_table, l2_table, data,
    zero_alloc (a zero cluster keeping its host cluster), compressed, vmstate
    (snapshot VM state), snapshot_table, bitmap_directory, bitmap_table,
    bitmap_data.  owner: "image", "active", "snapshot ID (NAME)" or
    "bitmap NAME".  guest_offset: the guest byte the range maps (data), or the
    first guest byte an L2 table maps.  in_data_file: the range lies in the
    external data file, not in the image file.
    """

    host_offset: int
    length: int
    kind: str
    owner: str
    guest_offset: int | None = None
    in_data_file: bool = False

    def as_json(self) -> dict:
        d: dict = {"host_offset": self.host_offset, "length": self.length, "kind": self.kind,
                   "owner": self.owner}
        if self.guest_offset is not None:
            d["guest_offset"] = self.guest_offset
        if self.in_data_file:
            d["in_data_file"] = True
        return d


@dataclass
class ReferenceWalk:
    references: list[Reference] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    snapshots: list = field(default_factory=list)  # SnapshotInfo
    snapshot_l1: dict[str, array] = field(default_factory=dict)  # id -> L1
    bitmaps: list | None = None  # BitmapInfo, None: no valid bitmaps
    bitmap_tables: dict[str, array] = field(default_factory=dict)
    l2_owners: dict[int, list[tuple[str, int]]] = field(default_factory=dict)  # off -> [(owner, l1 idx)]


def _snapshot_owner(sn) -> str:
    return f"snapshot {sn.id_str} ({sn.name})"


def walk_references(img) -> ReferenceWalk:
    """Every reference in ``img`` (a QcowImage), in file-structure order.

    Damage does not stop the walk: a table that cannot be read is noted in
    ``errors`` and skipped.
    """
    w = ReferenceWalk()
    refs = w.references
    h = img.header
    cs = img.cluster_size
    refs.append(Reference(0, cs, "header", "image"))

    # refcount table and blocks
    rt_size = h.refcount_table_clusters * cs
    refs.append(Reference(h.refcount_table_offset, rt_size, "refcount_table", "image"))
    reftable = entries.decode_u64_table(img.hf.pread(rt_size, h.refcount_table_offset))
    for e in reftable:
        off = entries.reftable_block_offset(e)
        if off:
            refs.append(Reference(off, cs, "refcount_block", "image"))

    # active L1
    if h.l1_size:
        refs.append(Reference(h.l1_table_offset, h.l1_size * 8, "l1_table", "active"))
    _walk_l1(img, w, img.l1, "active", img.virtual_size)

    # snapshots
    if h.nb_snapshots:
        from .snapshot_table import read_snapshot_table

        try:
            w.snapshots = read_snapshot_table(img)
        except QcowError as e:
            w.errors.append(f"snapshot table: {e.message}")
        if w.snapshots:
            end = w.snapshots[-1].table_offset + w.snapshots[-1].entry_size
            refs.append(Reference(h.snapshots_offset, end - h.snapshots_offset, "snapshot_table",
                                  "image"))
        for sn in w.snapshots:
            owner = _snapshot_owner(sn)
            if sn.l1_size:
                refs.append(Reference(sn.l1_table_offset, sn.l1_size * 8, "l1_table", owner))
            l1 = entries.decode_u64_table(img.hf.pread(sn.l1_size * 8, sn.l1_table_offset))
            w.snapshot_l1[sn.id_str] = l1
            _walk_l1(img, w, l1, owner, sn.disk_size)

    # bitmaps
    if h.bitmaps is not None and h.autoclear_features & spec.Autoclear.BITMAPS:
        from .bitmap_directory import read_bitmap_directory

        try:
            w.bitmaps = read_bitmap_directory(img)
        except QcowError as e:
            w.errors.append(f"bitmap directory: {e.message}")
        if w.bitmaps is not None:
            ext = h.bitmaps
            refs.append(Reference(ext.bitmap_directory_offset, ext.bitmap_directory_size,
                                  "bitmap_directory", "image"))
            for bm in w.bitmaps:
                _walk_bitmap(img, w, bm)
    return w


def l1_tree(img, l1, owner: str = "active", disk_size: int | None = None) -> ReferenceWalk:
    """The references one L1 table makes (its L2 tables and their data; not the L1
    table itself), e.g. for the refcount updates of a snapshot operation.
    ``disk_size``: the guest size the tree maps (data beyond it is "vmstate" for a
    snapshot owner); default the image's."""
    w = ReferenceWalk()
    _walk_l1(img, w, l1, owner, img.virtual_size if disk_size is None else disk_size)
    return w


def cluster_references(references, cluster_bits: int) -> Counter:
    """Host cluster -> how many of ``references`` point into it (ranges in an
    external data file do not count: they have no refcount)."""
    counts: Counter = Counter()
    for r in references:
        if r.in_data_file or r.length <= 0:
            continue
        first = r.host_offset >> cluster_bits
        last = (r.host_offset + r.length - 1) >> cluster_bits
        if first == last:
            counts[first] += 1
        else:
            counts.update(range(first, last + 1))
    return counts


def _walk_l1(img, w: ReferenceWalk, l1, owner: str, disk_size: int) -> None:
    refs = w.references
    cs = img.cluster_size
    cb = img.cluster_bits
    l2_shift = cb + img.l2_bits
    file_size = img.file_size
    stride = 2 if img.extended_l2 else 1
    data_file = img.has_data_file
    for l1_index, l1e in enumerate(l1):
        l2_offset = entries.l1_l2_offset(l1e)
        if not l2_offset:
            continue
        guest_base = l1_index << l2_shift
        refs.append(Reference(l2_offset, cs, "l2_table", owner, guest_base))
        w.l2_owners.setdefault(l2_offset, []).append((owner, l1_index))
        if l2_offset % cs or l2_offset + cs > file_size:
            w.errors.append(
                f"{owner}: L2 table at {l2_offset:#x} (L1 index {l1_index}) is "
                + ("unaligned" if l2_offset % cs else "beyond the end of the file")
            )
            continue
        try:
            table = img.l2_table(l2_offset)
        except QcowError as e:
            w.errors.append(f"{owner}: {e.message}")
            continue
        # pending merged run
        pk = None
        ph = pg = pl = 0
        for i in range(0, len(table), stride):
            e = table[i]
            if not e:
                continue
            guest = guest_base + ((i // stride) << cb)
            if entries.is_compressed(e):
                host, nbytes = entries.decode_compressed(e, cb)
                if pk is not None:
                    refs.append(Reference(ph, pl, pk, owner, pg, data_file))
                    pk = None
                refs.append(Reference(host, nbytes, "compressed", owner, guest))
                continue
            host = entries.l2_host_offset(e)
            if not host and not (data_file and entries.is_copied(e)):
                continue
            if stride == 1 and entries.has_zero_flag(e):
                kind = "zero_alloc"
            elif guest >= disk_size and owner != "active":
                kind = "vmstate"
            else:
                kind = "data"
            if pk == kind and host == ph + pl and guest == pg + pl:
                pl += cs
                continue
            if pk is not None:
                refs.append(Reference(ph, pl, pk, owner, pg, data_file))
            pk, ph, pg, pl = kind, host, guest, cs
        if pk is not None:
            refs.append(Reference(ph, pl, pk, owner, pg, data_file))


def _walk_bitmap(img, w: ReferenceWalk, bm) -> None:
    cs = img.cluster_size
    owner = f"bitmap {bm.name}"
    size = bm.bitmap_table_size * 8
    w.references.append(Reference(bm.bitmap_table_offset, size, "bitmap_table", owner))
    if bm.bitmap_table_offset + size > img.file_size:
        w.errors.append(f"{owner}: bitmap table lies beyond the end of the file")
        return
    table = entries.decode_u64_table(img.hf.pread(size, bm.bitmap_table_offset))
    w.bitmap_tables[bm.name] = table
    per_cluster = cs * 8 * bm.granularity  # guest bytes one bitmap cluster covers
    for index, e in enumerate(table):
        off = entries.bitmap_data_offset(e)
        if off:
            w.references.append(Reference(off, cs, "bitmap_data", owner, index * per_cluster))


def read_snapshots(img) -> list:
    if not img.header.nb_snapshots:
        return []
    from .snapshot_table import read_snapshot_table

    return read_snapshot_table(img)


def snapshot_entry_end(sn) -> int:
    """End of a snapshot table entry without its padding (QEMU's snapshots_size)."""
    raw_len = len(sn.id_str.encode("utf-8", "surrogateescape")) + len(
        sn.name.encode("utf-8", "surrogateescape")
    )
    return sn.table_offset + layout.SNAPSHOT_FIXED_SIZE + len(sn.extra_data) + raw_len



_NONZERO_BYTE = re.compile(rb"[^\x00]")


def nonzero_entries(table: array, extended: bool):
    """Indices of the L2 entries that are not all zero (the scans run in C).

    A mostly-zero table (the common case for a sparse image, and for the garbage
    tables a broken L1 points at) is searched for its non-zero bytes instead of
    turning every entry into a Python int.
    """
    raw = table.tobytes()
    zero_bytes = raw.count(0)
    if zero_bytes == len(raw):
        return ()
    if zero_bytes * 8 >= len(raw) * 7:
        width = 16 if extended else 8
        out = []
        m = _NONZERO_BYTE.search(raw)
        while m is not None:
            i = m.start() // width
            out.append(i)
            m = _NONZERO_BYTE.search(raw, (i + 1) * width)
        return out
    if extended:
        return itertools.compress(itertools.count(), map(operator.or_, table[0::2], table[1::2]))
    return itertools.compress(itertools.count(), table)
