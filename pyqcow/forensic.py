"""Forensics: what every host cluster of a qcow2 file is (``pyqcow dump``).

* ``dump(img, tables=...)`` is ``pyqcow dump``: every structure decoded, as data,
  with the references of ``pyqcow.walk`` per host cluster.
* ``hash_image(img)`` is ``pyqcow hash``: a digest of the guest content.
* The reference walk (``walk_references``) lives in ``pyqcow.walk``; orphans and
  leaks (``find_orphans``, ``extract_regions``) in ``pyqcow.orphans``; both are
  re-exported here.

Everything here only reads: it works on images opened read-only.
"""

from __future__ import annotations

import datetime
import hashlib
from array import array
from collections.abc import Callable, Iterable

from . import entries, layout, spec
from .entries import ClusterType
from .errors import OperationError, QcowError
from .orphans import (
    ClusterRegion,
    OrphanReport,
    describe_bytes,
    extract_regions,
    find_orphans,
    reference_counts,
    stored_refcounts,
)
from .walk import Reference, ReferenceWalk, walk_references

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
_PROPORTIONAL = frozenset({"data", "zero_alloc", "vmstate", "bitmap_data"})


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
    d: dict = {"l2_offset": entries.l1_l2_offset(e)}
    if entries.is_copied(e):
        d["copied"] = True
    if entries.l1_reserved_bits(e):
        d["reserved_bits"] = f"{entries.l1_reserved_bits(e):#x}"
    return d


def _l2_decoder(img) -> Callable[[int], dict]:
    cb = img.cluster_bits
    data_file = img.has_data_file

    def decode(e: int) -> dict:
        t = entries.l2_read_type(e, data_file, img.header.version)
        d: dict = {"type": t.name.lower()}
        if t == ClusterType.COMPRESSED:
            host, nbytes = entries.decode_compressed(e, cb)
            d["host_offset"] = host
            d["compressed_bytes"] = nbytes
            return d
        host = entries.l2_host_offset(e)
        if host or t == ClusterType.NORMAL:
            d["host_offset"] = host
        if entries.is_copied(e):
            d["copied"] = True
        if entries.l2_reserved_bits(e):
            d["reserved_bits"] = f"{entries.l2_reserved_bits(e):#x}"
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
            if diff == 0 or (diff == cs and entries.l2_host_offset(e)):
                step = diff
                while j < n and pairs[j][1] == bm and pairs[j][0] - pairs[j - 1][0] == step:
                    j += 1
        if step is None:
            j = i + 1
        d: dict = {"index": i, "count": j - i, "entry": f"{e:#018x}", "bitmap": f"{bm:#018x}"}
        if j - i > 1:
            d["step"] = step
        if entries.is_compressed(e):
            host, nbytes = entries.decode_compressed(e, img.cluster_bits)
            d.update(type="compressed", host_offset=host, compressed_bytes=nbytes)
        else:
            host = entries.l2_host_offset(e)
            if host or (img.has_data_file and entries.is_copied(e)):
                d["host_offset"] = host
            d["allocated_subclusters"] = entries.subclusters_allocated(bm).bit_count()
            d["zero_subclusters"] = entries.subclusters_zero(bm).bit_count()
            if entries.is_copied(e):
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
            lambda e: {"data_offset": entries.bitmap_data_offset(e),
                       "all_ones": entries.bitmap_all_ones(e)}
            if entries.bitmap_data_offset(e) or entries.bitmap_all_ones(e)
            else {"all_zeros": True},
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


def _l2_tables_json(img, walk: ReferenceWalk) -> list[dict]:
    """Every L2 table the walk reached, decoded (``dump --tables``)."""
    decode = _l2_decoder(img)
    cs = img.cluster_size
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
    return l2s


def _refcount_blocks_json(img, rt: array) -> list[dict]:
    """Every refcount block the refcount table names, decoded (``dump --tables``)."""
    blocks = []
    bits = img.refcount_block_bits
    for index, e in enumerate(rt):
        off = entries.reftable_block_offset(e)
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
    return blocks


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
        "entries": _table_ranges(rt, cs, lambda e: {"block_offset": entries.reftable_block_offset(e)}),
    }
    if tables:
        out["l2_tables"] = _l2_tables_json(img, walk)
        out["refcount_blocks"] = _refcount_blocks_json(img, rt)
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
