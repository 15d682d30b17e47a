"""Forensics: what every host cluster of a qcow2 file is, and what nothing claims.

* ``walk_references(img)`` follows every pointer in the file the way
  ``qemu-img check`` counts refcounts (block/qcow2-refcount.c
  ``qcow2_check_refcounts``): header, refcount table and blocks, the active L1
  and each snapshot's L1 with their L2 tables and data clusters, the snapshot
  table, the bitmap directory with its bitmap tables and data.  A cluster is
  counted once per reference, so for a consistent image the counts equal the
  stored refcounts.
* ``dump(img, tables=...)`` is ``pyqcow dump``: every structure decoded, as data.
* ``find_orphans(img)`` is ``pyqcow orphans``: clusters inside the file that
  nothing references and that hold bytes (left behind by discards, snapshot
  deletion, crashes), with a hint of what they look like, and the leaks
  (refcount non-zero, unreferenced).
* ``hash_image(img)`` is ``pyqcow hash``: a digest of the guest content.

Everything here only reads: it works on images opened read-only.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import math
import os
import stat
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import entries, layout, spec
from .entries import ClusterType
from .errors import OperationError, QcowError

__all__ = [
    "ClusterRegion",
    "OrphanReport",
    "Reference",
    "ReferenceWalk",
    "describe_bytes",
    "dump",
    "extract_regions",
    "find_orphans",
    "hash_image",
    "walk_references",
]

HASH_BLOCK_SIZE = 4 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PRINTABLE = bytes(range(0x20, 0x7F)) + b"\t\n\r\f\v"
_BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_PROPORTIONAL = frozenset({"data", "zero_alloc", "vmstate", "bitmap_data"})


# ---------------------------------------------------------------------------
# The reference walk
# ---------------------------------------------------------------------------
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
        off = e & spec.REFT_OFFSET_MASK
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
        from .bitmaps import read_bitmap_directory

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


def _walk_l1(img, w: ReferenceWalk, l1, owner: str, disk_size: int) -> None:
    refs = w.references
    cs = img.cluster_size
    cb = img.cluster_bits
    l2_shift = cb + img.l2_bits
    file_size = img.file_size
    stride = 2 if img.extended_l2 else 1
    data_file = img.has_data_file
    for l1_index, l1e in enumerate(l1):
        l2_offset = l1e & spec.L1E_OFFSET_MASK
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
            if e & spec.QCOW_OFLAG_COMPRESSED:
                host, nbytes = entries.decode_compressed(e, cb)
                if pk is not None:
                    refs.append(Reference(ph, pl, pk, owner, pg, data_file))
                    pk = None
                refs.append(Reference(host, nbytes, "compressed", owner, guest))
                continue
            host = e & spec.L2E_OFFSET_MASK
            if not host and not (data_file and e & spec.QCOW_OFLAG_COPIED):
                continue
            if stride == 1 and e & spec.QCOW_OFLAG_ZERO:
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
        off = e & _BME_OFFSET_MASK
        if off:
            w.references.append(Reference(off, cs, "bitmap_data", owner, index * per_cluster))


# ---------------------------------------------------------------------------
# Per-cluster accounting
# ---------------------------------------------------------------------------
def cluster_count(img) -> int:
    """Number of host clusters the image file spans (the last may be partial)."""
    return (img.file_size + img.cluster_size - 1) >> img.cluster_bits


def reference_counts(img, walk: ReferenceWalk) -> array:
    """How many references point into each host cluster of the image file."""
    n = cluster_count(img)
    counts = array("L", bytes(array("L").itemsize * n))
    cb = img.cluster_bits
    for r in walk.references:
        if r.in_data_file or r.length <= 0:
            continue
        first = r.host_offset >> cb
        last = (r.host_offset + r.length - 1) >> cb
        if last >= n:
            walk.errors.append(
                f"{r.owner}: {r.kind} at {r.host_offset:#x} (+{r.length}) reaches past the end "
                "of the file"
            )
            last = n - 1
        for c in range(first, last + 1):
            counts[c] += 1
    return counts


def stored_refcounts(img) -> array:
    """Refcount of each host cluster of the image file, as the refcount blocks say."""
    n = cluster_count(img)
    out = array("Q", bytes(8 * n))
    bits = img.refcount_block_bits
    per_block = 1 << bits
    for table_index in range((n + per_block - 1) >> bits):
        try:
            block = img.refcount_block(table_index)
        except QcowError:
            continue
        if block is None:
            continue
        base = table_index << bits
        values = block.values()[: n - base]
        out[base : base + len(values)] = array("Q", values)
    return out


# ---------------------------------------------------------------------------
# dump
# ---------------------------------------------------------------------------
def _feature_bits(value: int, group: int, names: dict[tuple[int, int], str]) -> list[dict]:
    gname = ("incompatible", "compatible", "autoclear")[group]
    out = []
    for bit in range(64):
        if value >> bit & 1:
            name = names.get((group, bit)) or spec.FEATURE_NAMES.get((gname, bit))
            out.append({"bit": bit, "name": name or f"unknown {gname} feature bit {bit}",
                        "known": (gname, bit) in spec.FEATURE_NAMES})
    return out


def _header_json(img) -> dict:
    h = img.header
    names = {(f.type, f.bit): f.name for f in _safe(lambda: h.feature_names, ())}
    d: dict = {
        "magic": f"{spec.QCOW_MAGIC:#010x}",
        "version": h.version,
        "backing_file_offset": h.backing_file_offset,
        "backing_file_size": h.backing_file_size,
        "cluster_bits": h.cluster_bits,
        "cluster_size": h.cluster_size,
        "size": h.size,
        "crypt_method": h.crypt_method,
        "l1_size": h.l1_size,
        "l1_table_offset": h.l1_table_offset,
        "refcount_table_offset": h.refcount_table_offset,
        "refcount_table_clusters": h.refcount_table_clusters,
        "nb_snapshots": h.nb_snapshots,
        "snapshots_offset": h.snapshots_offset,
    }
    if h.version >= 3:
        for group, key in enumerate(("incompatible_features", "compatible_features",
                                     "autoclear_features")):
            value = getattr(h, key)
            d[key] = {"value": value, "bits": _feature_bits(value, group, names)}
        d["refcount_order"] = h.refcount_order
        d["refcount_bits"] = h.refcount_bits
        d["header_length"] = h.header_length
        d["compression_type"] = {0: "zlib", 1: "zstd"}.get(h.compression_type,
                                                           str(h.compression_type))
        if h.extra_fields[1:].strip(b"\x00"):
            d["additional_fields"] = h.extra_fields.hex()
    else:
        d["refcount_order"] = 4
        d["refcount_bits"] = 16
        d["header_length"] = spec.V2_HEADER_LENGTH
    return d


def _extensions_json(img) -> list[dict]:
    h = img.header
    out = []
    pos = h.header_length
    for ext in h.extensions:
        d: dict = {"offset": pos, "type": f"{ext.type:#010x}", "name": ext.name,
                   "length": len(ext.data)}
        t, data = ext.type, ext.data
        try:
            if t in (spec.ExtType.BACKING_FORMAT, spec.ExtType.DATA_FILE):
                d["value"] = data.decode("utf-8", "replace")
            elif t == spec.ExtType.FEATURE_TABLE:
                d["value"] = [
                    {"type": ("incompatible", "compatible", "autoclear")[f.type]
                     if f.type < 3 else f.type, "bit": f.bit, "name": f.name}
                    for f in h.feature_names
                ]
            elif t == spec.ExtType.BITMAPS and len(data) >= 24:
                v = layout.parse(layout.BitmapsExtension, data[:24])
                d["value"] = v
            elif t == spec.ExtType.CRYPTO and len(data) >= 16:
                d["value"] = layout.parse(layout.CryptoExtension, data[:16])
            else:
                d["data"] = data.hex()
        except Exception:  # noqa: BLE001 - undecodable: show the bytes
            d["data"] = data.hex()
        out.append(d)
        pos += 8 + ((len(data) + 7) & ~7)
    return out


def _runs(values, step: int) -> Iterable[tuple[int, int, int]]:
    """(first index, count, step) of runs of identical (step 0) or +step entries."""
    n = len(values)
    i = 0
    while i < n:
        j = i + 1
        if j < n:
            diff = values[j] - values[i]
            s = diff if diff in (0, step) and values[i] else (0 if diff == 0 else None)
            if s is not None:
                while j < n and values[j] - values[j - 1] == s:
                    j += 1
                yield i, j - i, s
                i = j
                continue
        yield i, 1, 0
        i = j


def _table_ranges(values, step: int, decode: Callable[[int], dict]) -> list[dict]:
    out = []
    for i, count, s in _runs(values, step):
        d = {"index": i, "count": count, "entry": f"{values[i]:#018x}"}
        if count > 1:
            d["step"] = s
        d.update(decode(values[i]))
        out.append(d)
    return out


def _decode_l1(e: int) -> dict:
    d: dict = {"l2_offset": e & spec.L1E_OFFSET_MASK}
    if e & spec.QCOW_OFLAG_COPIED:
        d["copied"] = True
    if e & spec.L1E_RESERVED_MASK:
        d["reserved_bits"] = f"{e & spec.L1E_RESERVED_MASK:#x}"
    return d


def _l2_decoder(img) -> Callable[[int], dict]:
    cb = img.cluster_bits
    data_file = img.has_data_file

    def decode(e: int) -> dict:
        t = entries.l2_type(e, data_file)
        if img.header.version == 2 and t == ClusterType.ZERO_PLAIN:
            t = ClusterType.UNALLOCATED
        d: dict = {"type": t.name.lower()}
        if t == ClusterType.COMPRESSED:
            host, nbytes = entries.decode_compressed(e, cb)
            d["host_offset"] = host
            d["compressed_bytes"] = nbytes
            return d
        host = e & spec.L2E_OFFSET_MASK
        if host or t == ClusterType.NORMAL:
            d["host_offset"] = host
        if e & spec.QCOW_OFLAG_COPIED:
            d["copied"] = True
        if e & spec.L2E_RESERVED_MASK & ~1:
            d["reserved_bits"] = f"{e & spec.L2E_RESERVED_MASK & ~1:#x}"
        return d

    return decode


def _extended_l2_ranges(img, table) -> list[dict]:
    """Extended L2 entries (entry, bitmap) as runs of identical / consecutive pairs."""
    cs = img.cluster_size
    pairs = [(table[2 * i], table[2 * i + 1]) for i in range(len(table) // 2)]
    out = []
    i = 0
    n = len(pairs)
    while i < n:
        e, bm = pairs[i]
        j = i + 1
        step = None
        if j < n and pairs[j][1] == bm:
            diff = pairs[j][0] - e
            if diff == 0 or (diff == cs and e & spec.L2E_OFFSET_MASK):
                step = diff
                while j < n and pairs[j][1] == bm and pairs[j][0] - pairs[j - 1][0] == step:
                    j += 1
        if step is None:
            j = i + 1
        d: dict = {"index": i, "count": j - i, "entry": f"{e:#018x}", "bitmap": f"{bm:#018x}"}
        if j - i > 1:
            d["step"] = step
        if e & spec.QCOW_OFLAG_COMPRESSED:
            host, nbytes = entries.decode_compressed(e, img.cluster_bits)
            d.update(type="compressed", host_offset=host, compressed_bytes=nbytes)
        else:
            host = e & spec.L2E_OFFSET_MASK
            if host or (img.has_data_file and e & spec.QCOW_OFLAG_COPIED):
                d["host_offset"] = host
            d["allocated_subclusters"] = (bm & 0xFFFFFFFF).bit_count()
            d["zero_subclusters"] = (bm >> 32).bit_count()
            if e & spec.QCOW_OFLAG_COPIED:
                d["copied"] = True
        out.append(d)
        i = j
    return out


def _refcount_ranges(values, first_cluster: int) -> list[dict]:
    out = []
    i, n = 0, len(values)
    while i < n:
        j = i + 1
        while j < n and values[j] == values[i]:
            j += 1
        out.append({"first_cluster": first_cluster + i, "count": j - i, "refcount": values[i]})
        i = j
    return out


def _snapshot_json(img, sn, l1) -> dict:
    try:
        date = datetime.datetime.fromtimestamp(sn.date_sec, datetime.UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        date = None
    d = {
        "id": sn.id_str,
        "name": sn.name,
        "table_offset": sn.table_offset,
        "entry_size": sn.entry_size,
        "l1_table_offset": sn.l1_table_offset,
        "l1_size": sn.l1_size,
        "date_sec": sn.date_sec,
        "date_nsec": sn.date_nsec,
        "date": date,
        "vm_clock_nsec": sn.vm_clock_nsec,
        "vm_state_size": sn.vm_state_size,
        "disk_size": sn.disk_size,
        "icount": sn.icount,
        "extra_data": sn.extra_data.hex(),
    }
    if l1 is not None:
        d["l1_table"] = _table_ranges(l1, img.cluster_size, _decode_l1)
    return d


def _bitmap_json(img, bm, table) -> dict:
    flags = []
    if bm.in_use:
        flags.append("in-use")
    if bm.auto:
        flags.append("auto")
    if bm.flags & ~0x3:
        flags.append(f"{bm.flags & ~0x3:#x}")
    d = {
        "name": bm.name,
        "type": bm.type,
        "flags": flags,
        "granularity_bits": bm.granularity_bits,
        "granularity": bm.granularity,
        "bitmap_table_offset": bm.bitmap_table_offset,
        "bitmap_table_size": bm.bitmap_table_size,
        "extra_data": bm.extra_data.hex(),
    }
    if table is not None:
        d["bitmap_table"] = _table_ranges(
            table, img.cluster_size,
            lambda e: {"data_offset": e & _BME_OFFSET_MASK, "all_ones": bool(e & 1)}
            if e & _BME_OFFSET_MASK or e & 1 else {"all_zeros": True},
        )
    return d


def host_cluster_map(img, walk: ReferenceWalk, counts: array, stored: array) -> list[dict]:
    """Every host cluster of the file, as ranges: stored refcount and who references it."""
    cb = img.cluster_bits
    n = len(counts)
    per_cluster: dict[int, list[tuple]] = {}
    for r in walk.references:
        if r.in_data_file or r.length <= 0:
            continue
        first = r.host_offset >> cb
        last = min(n - 1, (r.host_offset + r.length - 1) >> cb)
        for c in range(first, last + 1):
            if r.guest_offset is not None and r.kind in _PROPORTIONAL:
                # guest offset of cluster c minus its host offset: constant along a run
                key = (r.kind, r.owner, r.guest_offset - r.host_offset)
            else:
                key = (r.kind, r.owner, r.guest_offset)
            per_cluster.setdefault(c, []).append(key)
    out: list[dict] = []
    prev_key = None
    start = 0

    def close(end: int) -> None:
        refcount, refs = prev_key
        length = min(end << cb, img.file_size) - (start << cb)
        d: dict = {"host_offset": start << cb, "length": length, "refcount": refcount,
                   "references": []}
        for kind, owner, guest in refs:
            ref = {"kind": kind, "owner": owner}
            if guest is not None:
                ref["guest_offset"] = guest + (start << cb) if kind in _PROPORTIONAL else guest
            d["references"].append(ref)
        if not refs:
            d["state"] = "leaked" if refcount else "free"
        elif refcount != len(refs):
            d["state"] = f"refcount {refcount}, {len(refs)} references"
        out.append(d)

    for c in range(n):
        refs = per_cluster.get(c)
        key = (stored[c], tuple(sorted(refs, key=repr)) if refs else ())
        if key != prev_key:
            if prev_key is not None:
                close(c)
            prev_key, start = key, c
    if prev_key is not None:
        close(n)
    return out


def dump(img, tables: bool = False) -> dict:
    """Everything on disk in ``img`` (a QcowImage) as JSON-ready data."""
    if getattr(img, "format", None) != "qcow2":
        raise OperationError(img.path, "not a qcow2 image: nothing to dump")
    h = img.header
    walk = walk_references(img)
    counts = reference_counts(img, walk)
    stored = stored_refcounts(img)
    out: dict = {
        "filename": img.path,
        "file_size": img.file_size,
        "cluster_size": img.cluster_size,
        "header": _header_json(img),
        "backing_file": h.backing_file,
        "backing_format": h.backing_format,
        "header_extensions": _extensions_json(img),
    }
    if img.has_data_file:
        out["data_file"] = getattr(img, "data_file_path", h.data_file)
    out["l1_table"] = {
        "offset": h.l1_table_offset,
        "size": h.l1_size,
        "entries": _table_ranges(img.l1, img.cluster_size, _decode_l1),
    }
    cs = img.cluster_size
    rt = entries.decode_u64_table(
        img.hf.pread(h.refcount_table_clusters * cs, h.refcount_table_offset))
    out["refcount_table"] = {
        "offset": h.refcount_table_offset,
        "clusters": h.refcount_table_clusters,
        "entries": _table_ranges(rt, cs, lambda e: {"block_offset": e & spec.REFT_OFFSET_MASK}),
    }
    if tables:
        decode = _l2_decoder(img)
        l2s = []
        for off in sorted(walk.l2_owners):
            owners = walk.l2_owners[off]
            d: dict = {
                "offset": off,
                "l1_index": owners[0][1],
                "guest_offset": owners[0][1] << (img.cluster_bits + img.l2_bits),
                "owners": sorted({o for o, _ in owners}),
            }
            try:
                table = img.l2_table(off)
            except QcowError as e:
                d["error"] = e.message
            else:
                d["entries"] = (_extended_l2_ranges(img, table) if img.extended_l2
                                else _table_ranges(table, cs, decode))
            l2s.append(d)
        out["l2_tables"] = l2s
        blocks = []
        bits = img.refcount_block_bits
        for index, e in enumerate(rt):
            off = e & spec.REFT_OFFSET_MASK
            if not off:
                continue
            d = {"offset": off, "table_index": index, "first_cluster": index << bits}
            try:
                block = img.refcount_block(index)
            except QcowError as err:
                d["error"] = err.message
            else:
                d["entries"] = _refcount_ranges(block.values(), index << bits)
            blocks.append(d)
        out["refcount_blocks"] = blocks
    out["snapshots"] = [
        _snapshot_json(img, sn, walk.snapshot_l1.get(sn.id_str)) for sn in walk.snapshots
    ]
    bext = h.bitmaps
    if bext is not None:
        out["bitmap_directory"] = {
            "offset": bext.bitmap_directory_offset,
            "size": bext.bitmap_directory_size,
            "nb_bitmaps": bext.nb_bitmaps,
            "valid": bool(h.autoclear_features & spec.Autoclear.BITMAPS),
            "bitmaps": [_bitmap_json(img, bm, walk.bitmap_tables.get(bm.name))
                        for bm in (walk.bitmaps or [])],
        }
    else:
        out["bitmap_directory"] = None
    out["host_clusters"] = host_cluster_map(img, walk, counts, stored)
    if img.has_data_file:
        out["data_file_references"] = [r.as_json() for r in walk.references if r.in_data_file]
    out["errors"] = walk.errors
    return out


# ---------------------------------------------------------------------------
# orphans
# ---------------------------------------------------------------------------
@dataclass
class ClusterRegion:
    """Contiguous host clusters nothing references (orphan: refcount 0, leak: > 0)."""

    host_offset: int
    length: int
    category: str  # "orphan" or "leak"
    hint: str
    entropy: float  # bits per byte (Shannon, estimated on a sample)
    refcount: int = 0
    detail: str | None = None
    file_name: str | None = None  # set by extract_regions

    def as_json(self) -> dict:
        d = {
            "host_offset": self.host_offset,
            "length": self.length,
            "hint": self.hint,
            "entropy": round(self.entropy, 3),
            "refcount": self.refcount,
        }
        if self.detail:
            d["detail"] = self.detail
        if self.file_name:
            d["file"] = self.file_name
        return d


@dataclass
class OrphanReport:
    path: str
    cluster_size: int
    file_size: int
    orphans: list[ClusterRegion]
    leaks: list[ClusterRegion]
    errors: list[str]
    dirty: bool = False

    def as_json(self) -> dict:
        return {
            "filename": self.path,
            "cluster_size": self.cluster_size,
            "file_size": self.file_size,
            "dirty": self.dirty,
            "orphans": [r.as_json() for r in self.orphans],
            "orphan_bytes": sum(r.length for r in self.orphans),
            "leaks": [r.as_json() for r in self.leaks],
            "leaked_clusters": sum(
                (r.length + self.cluster_size - 1) // self.cluster_size for r in self.leaks
            ),
            "errors": self.errors,
        }


def _entropy(sample: bytes) -> float:
    if not sample:
        return 0.0
    n = len(sample)
    return max(0.0, -sum(c / n * math.log2(c / n) for c in Counter(sample).values()))


def _deflate_size(data: bytes) -> int | None:
    """Bytes a raw deflate stream at the start of ``data`` decompresses to, or None."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data[: 1 << 16], 1 << 22)
    except zlib.error:
        return None
    # A real stream ends inside the data (qcow2 pads it with zeros or packs the
    # next cluster's stream behind it); a fill pattern can "decode" to the end.
    consumed = min(len(data), 1 << 16) - len(d.unused_data)
    if d.eof and len(out) >= 512 and len(out) > consumed and consumed + 16 <= len(data):
        return len(out)
    return None


def describe_bytes(data: bytes) -> tuple[str, float, str | None]:
    """(hint, entropy in bits/byte, detail) for a block of host bytes.

    hint: "all-zero", "fill pattern" (one byte repeated), "zstd frame", "zlib raw
    deflate stream" (qcow2's two compressed cluster formats), "text", "high
    entropy" (random, encrypted or compressed data) or "binary".
    """
    stripped = data.rstrip(b"\x00")
    if not stripped:
        return "all-zero", 0.0, None
    if stripped.count(stripped[:1]) == len(stripped):
        return "fill pattern", 0.0, f"byte {stripped[0]:#04x} x {len(stripped)}"
    sample = stripped[: 1 << 14]
    entropy = _entropy(sample)
    zpos = data.find(_ZSTD_MAGIC)
    if zpos == 0 or (zpos > 0 and not data[:zpos].strip(b"\x00")):
        return "zstd frame", entropy, f"zstd magic at +{zpos}"
    size = _deflate_size(data)
    if size is not None:
        return "zlib raw deflate stream", entropy, f"decompresses to {size} bytes"
    if len(stripped.translate(None, _PRINTABLE)) <= len(stripped) // 50:
        text = stripped[:60].decode("ascii", "replace")
        return "text", entropy, "starts " + repr(text)
    if entropy >= 7.2:
        return "high entropy", entropy, "random, encrypted or compressed data"
    return "binary", entropy, None


def find_orphans(img) -> OrphanReport:
    """Unreferenced clusters of ``img`` (a QcowImage): orphans (refcount 0 holding
    non-zero bytes) and leaks (refcount > 0), each with a hint of its content."""
    if getattr(img, "format", None) != "qcow2":
        raise OperationError(img.path, "not a qcow2 image: it has no host clusters to examine")
    walk = walk_references(img)
    counts = reference_counts(img, walk)
    stored = stored_refcounts(img)
    cs = img.cluster_size
    cb = img.cluster_bits
    file_size = img.file_size
    n = len(counts)
    # candidate runs: unreferenced clusters
    classified: list[tuple[int, str, int, str, float, str | None]] = []
    data_runs = img.hf.data_extents(0, file_size)
    holes = [(off, off + ln) for off, ln, is_data in data_runs if not is_data]
    hole_index = 0
    for c in range(n):
        if counts[c]:
            continue
        off = c << cb
        length = min(cs, file_size - off)
        rc = stored[c]
        # a cluster entirely inside a hole of the host file reads as zeros
        while hole_index < len(holes) and holes[hole_index][1] <= off:
            hole_index += 1
        in_hole = hole_index < len(holes) and holes[hole_index][0] <= off and \
            holes[hole_index][1] >= off + length
        if in_hole:
            if rc:
                classified.append((c, "leak", rc, "all-zero", 0.0, "hole in the host file"))
            continue
        data = img.hf.pread(length, off)
        hint, entropy, detail = describe_bytes(data)
        if hint == "all-zero" and not rc:
            continue
        classified.append((c, "leak" if rc else "orphan", rc, hint, entropy, detail))
    orphans: list[ClusterRegion] = []
    leaks: list[ClusterRegion] = []
    prev = None
    for c, category, rc, hint, entropy, detail in classified:
        off = c << cb
        length = min(cs, file_size - off)
        target = leaks if category == "leak" else orphans
        if (
            prev is not None
            and prev[0] == c - 1
            and prev[1] == category
            and target
            and target[-1].hint == hint
            and target[-1].refcount == rc
            and hint not in ("zstd frame", "zlib raw deflate stream")
            and (hint != "fill pattern" or (target[-1].detail or "")[:9] == (detail or "")[:9])
        ):
            region = target[-1]
            k = region.length // cs
            region.entropy = (region.entropy * k + entropy) / (k + 1)
            region.length += length
            if hint == "fill pattern":
                region.detail = f"{region.detail[:9]} x {region.length}"
        else:
            target.append(ClusterRegion(off, length, category, hint, entropy, rc, detail))
        prev = (c, category)
    return OrphanReport(img.path, cs, file_size, orphans, leaks, walk.errors, img.header.dirty)


def extract_regions(img, report: OrphanReport, directory: str | os.PathLike) -> list[str]:
    """Write every orphan and every non-zero leak to ``directory``; return the paths.

    File names carry the host offset: ``orphan-0x000000050000.bin``.
    """
    os.makedirs(directory, exist_ok=True)
    written = []
    for region in report.orphans + report.leaks:
        if region.hint == "all-zero":
            continue
        name = f"{region.category}-0x{region.host_offset:012x}.bin"
        path = os.path.join(os.fspath(directory), name)
        data = img.hf.pread(region.length, region.host_offset)
        _write_extract(path, data)
        region.file_name = name
        written.append(path)
    return written


def _write_extract(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (a new or regular file), never through a symlink."""
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644
        )
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OperationError(
                path, "is a symbolic link; refusing to write an extracted region through it"
            ) from None
        raise OSError(e.errno, e.strerror, path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OperationError(path, "exists and is not a regular file; refusing to write it")
        os.ftruncate(fd, 0)
        mv = memoryview(data)
        while mv:
            n = os.write(fd, mv)
            if n <= 0:
                raise OSError(errno.ENOSPC, "write wrote nothing (device full?)", path)
            mv = mv[n:]
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# hash
# ---------------------------------------------------------------------------
def new_hash(algorithm: str):
    """hashlib object for ``algorithm`` (any name hashlib knows)."""
    try:
        return hashlib.new(algorithm)
    except (ValueError, TypeError):
        known = ", ".join(sorted(hashlib.algorithms_available))
        raise OperationError(None, f"unknown hash algorithm {algorithm!r} (known: {known})") from None


def hexdigest(h) -> str:
    if h.name.startswith("shake_"):
        return h.hexdigest(64 if h.name == "shake_256" else 32)
    return h.hexdigest()


def hash_image(img, algorithm: str = "sha256", *, block_size: int = HASH_BLOCK_SIZE,
               progress: Callable[[int, int], None] | None = None) -> str:
    """Hex digest of the guest content of ``img`` (an image or a snapshot view)."""
    h = new_hash(algorithm)
    size = img.virtual_size
    buf = bytearray(min(block_size, size) or 1)
    mv = memoryview(buf)
    pos = 0
    readinto = img.readinto
    update = h.update
    while pos < size:
        n = min(len(buf), size - pos)
        view = mv if n == len(buf) else mv[:n]
        readinto(view, pos)
        update(view)
        pos += n
        if progress is not None:
            progress(pos, size)
    return hexdigest(h)


def _safe(fn, default):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a broken optional structure only loses detail
        return default
