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
* every pointer an L1 tree cannot count is also a ``Problem`` record
  (``problems``, in walk order): an L2 table unaligned, past the end of the file
  or unreadable; a data cluster (normal, zero with a host cluster, VM state) in
  the image file that is unaligned or past the end of the file; a compressed
  cluster at offset 0 or starting past the end of the file ("the end of the
  file" rounded up to a whole cluster).  The tree is still walked (a reference
  is still recorded) unless the caller asks to stop at the first problem;
  ``refuse_problems`` is what a refcount update (snapshot create, apply,
  delete) raises for them.  Ranges in an external data file are not checked
  against the image file and have no refcount;
* entries are decoded by pyqcow.entries only.

``pyqcow.scan`` (``qemu-img check``, which must also reproduce QEMU's messages
and counts for every broken entry) walks the same structures with the same
primitives (``nonzero_entries``, ``read_snapshots``, ``snapshot_entry_end``);
forensic's ``dump`` and ``orphans`` consume the records.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter, namedtuple

from . import entries, layout, spec
from .errors import CorruptImageError, QcowError
from .record import FrozenRecord, Record
from .tablescan import nonzero_indices

__all__ = [
    "Problem",
    "Reference",
    "ReferenceWalk",
    "cluster_references",
    "l1_tree",
    "nonzero_entries",
    "prefetch_l2_tables",
    "read_snapshots",
    "refuse_problems",
    "snapshot_entry_end",
    "walk_references",
]


class Reference(namedtuple("Reference", ("host_offset", "length", "kind", "owner",
                                         "guest_offset", "in_data_file"),
                            defaults=(None, False))):
    """``length`` bytes at ``host_offset`` that ``owner`` points to as ``kind``.

    kind: header, refcount_table, refcount_block, l1_table, l2_table, data,
    zero_alloc (a zero cluster keeping its host cluster), compressed, vmstate
    (snapshot VM state), snapshot_table, bitmap_directory, bitmap_table,
    bitmap_data.  owner: "image", "active", "snapshot ID (NAME)" or
    "bitmap NAME".  guest_offset: the guest byte the range maps (data), or the
    first guest byte an L2 table maps.  in_data_file: the range lies in the
    external data file, not in the image file.  (A NamedTuple, not a frozen
    dataclass: the walk makes one per run of data clusters, and a frozen
    dataclass is four times slower to build; collections' namedtuple, not
    typing's NamedTuple: typing costs milliseconds at start-up.)
    """

    __slots__ = ()

    def as_json(self) -> dict:
        d: dict = {"host_offset": self.host_offset, "length": self.length, "kind": self.kind,
                   "owner": self.owner}
        if self.guest_offset is not None:
            d["guest_offset"] = self.guest_offset
        if self.in_data_file:
            d["in_data_file"] = True
        return d


_REF: list = []


def _ref_maker():
    """Reference from a complete tuple (host_offset, length, kind, owner,
    guest_offset, in_data_file), without the argument parsing of Reference(...):
    a functools.partial, made on first use (functools with types is ~1.5 ms of
    ``check``'s start-up, and check's scan does not walk)."""
    if not _REF:
        import functools

        _REF.append(functools.partial(tuple.__new__, Reference))
    return _REF[0]


class Problem(FrozenRecord):
    """A pointer of an L1 tree that cannot be counted (see the module's rules).

    kind: "l2_table" (unaligned or past the end of the file), "l2_read" (reading
    the table raised ``error``), "data" or "compressed".  host_offset: where the
    pointer points; entry: the raw L2 entry (data, compressed).
    """

    __slots__ = ("kind", "owner", "l1_index", "host_offset", "entry", "error")
    _fields = __slots__
    _defaults = {"entry": 0, "error": None}


class ReferenceWalk(Record):
    """references, errors, problems (Problem), snapshots (SnapshotInfo),
    snapshot_l1 (id -> L1), bitmaps (BitmapInfo; None: no valid bitmaps),
    bitmap_tables (name -> table), l2_owners (L2 offset -> [(owner, L1 index)])."""

    __slots__ = ("references", "errors", "problems", "snapshots", "snapshot_l1", "bitmaps",
                 "bitmap_tables", "l2_owners")
    _defaults = {"bitmaps": None}
    _factories = {"references": list, "errors": list, "problems": list, "snapshots": list,
                  "snapshot_l1": dict, "bitmap_tables": dict, "l2_owners": dict}


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
    _walk_l1(img, w, img.l1, "active", img.virtual_size, img.file_size)

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
            _walk_l1(img, w, l1, owner, sn.disk_size, img.file_size)

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


def l1_tree(img, l1, owner: str = "active", disk_size: int | None = None, *,
            stop_at_problem: bool = False) -> ReferenceWalk:
    """The references one L1 table makes (its L2 tables and their data; not the L1
    table itself), e.g. for the refcount updates of a snapshot operation.
    ``disk_size``: the guest size the tree maps (data beyond it is "vmstate" for a
    snapshot owner); default the image's.  The end of the file is the larger of
    the image's idea and the host file's size.  ``stop_at_problem``: end the walk
    at the first ``Problem`` (nothing after it is read)."""
    w = ReferenceWalk()
    _walk_l1(img, w, l1, owner, img.virtual_size if disk_size is None else disk_size,
             max(img.file_size, img.hf.size()), stop_at_problem)
    return w


def refuse_problems(img, w: ReferenceWalk, what: str) -> None:
    """Raise for the first problem of ``w`` (an L1 tree ``what`` names, e.g. "active
    L1"): a tree with a pointer that cannot be counted cannot have its refcounts
    updated.  An unreadable L2 table raises what reading it raised."""
    if not w.problems:
        return
    p = w.problems[0]
    if p.error is not None:
        raise p.error
    if p.kind == "l2_table":
        msg = f"L1 entry {p.l1_index} points at an invalid L2 table {p.host_offset:#x}"
    elif p.kind == "compressed":
        msg = f"compressed cluster at {p.host_offset:#x} lies outside the file"
    else:
        msg = f"L2 entry {p.entry:#018x} points at an invalid data cluster"
    raise CorruptImageError(img.path, f"{what}: {msg}")


def cluster_references(references, cluster_bits: int) -> Counter:
    """Host cluster -> how many of ``references`` point into it (ranges in an
    external data file do not count: they have no refcount)."""
    counts: Counter = Counter()
    single: list[int] = []  # one-cluster references, counted in C at the end
    for host, length, _kind, _owner, _guest, in_data_file in references:
        if in_data_file or length <= 0:
            continue
        first = host >> cluster_bits
        last = (host + length - 1) >> cluster_bits
        if first == last:
            single.append(first)
        else:
            counts.update(range(first, last + 1))
    counts.update(single)
    return counts


def _walk_l1(img, w: ReferenceWalk, l1, owner: str, disk_size: int, file_size: int,
             stop: bool = False) -> None:
    refs = w.references
    cs = img.cluster_size
    l2_shift = img.cluster_bits + img.l2_bits
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
            w.problems.append(Problem("l2_table", owner, l1_index, l2_offset))
        else:
            try:
                table = img.l2_table(l2_offset)
            except QcowError as e:
                w.errors.append(f"{owner}: {e.message}")
                w.problems.append(Problem("l2_read", owner, l1_index, l2_offset, error=e))
            else:
                _walk_l2(img, w, table, owner, l1_index, disk_size, file_size, stop)
        if stop and w.problems:
            return


def _walk_l2(img, w: ReferenceWalk, table, owner: str, l1_index: int, disk_size: int,
             file_size: int, stop: bool) -> None:
    """The data references of one L2 table (runs of adjacent clusters merged).

    The hot loop of every walk (a snapshot create walks each data cluster): the
    entry functions are bound to locals and records built without the keyword
    machinery of ``Reference(...)``."""
    refs = w.references
    append = refs.append
    _ref = _ref_maker()
    problems = w.problems
    cs = img.cluster_size
    cb = img.cluster_bits
    file_clusters = (file_size + cs - 1) >> cb
    file_end = file_clusters << cb
    data_file = img.has_data_file
    guest_base = l1_index << (cb + img.l2_bits)
    descriptors = table[::2] if img.extended_l2 else table
    zero_flag = None if img.extended_l2 else entries.has_zero_flag
    is_compressed = entries.is_compressed
    host_of = entries.l2_host_offset
    vmstate_from = disk_size if owner != "active" else 1 << 64  # guest bytes past it
    # pending merged run
    pk = None
    ph = pg = pl = 0
    for j in nonzero_indices(descriptors):  # nonzero, in C
        e = descriptors[j]
        if is_compressed(e):
            host, nbytes = entries.decode_compressed(e, cb)
            if pk is not None:
                append(_ref((ph, pl, pk, owner, pg, data_file)))
                pk = None
            append(Reference(host, nbytes, "compressed", owner, guest_base + (j << cb)))
            if not host or host >> cb >= file_clusters:
                problems.append(Problem("compressed", owner, l1_index, host, e))
                if stop:
                    return
            continue
        host = host_of(e)
        if not host and not (data_file and entries.is_copied(e)):
            continue
        if (host % cs or host + cs > file_end) and not data_file:
            problems.append(Problem("data", owner, l1_index, host, e))
            if stop:
                return
        guest = guest_base + (j << cb)
        if zero_flag is not None and zero_flag(e):
            kind = "zero_alloc"
        elif guest >= vmstate_from:
            kind = "vmstate"
        else:
            kind = "data"
        if host == ph + pl and guest == pg + pl and pk == kind:
            pl += cs
            continue
        if pk is not None:
            append(_ref((ph, pl, pk, owner, pg, data_file)))
        pk, ph, pg, pl = kind, host, guest, cs
    if pk is not None:
        append(_ref((ph, pl, pk, owner, pg, data_file)))


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


def prefetch_l2_tables(img, l1=None) -> None:
    """Ask the kernel to read the L2 tables of ``l1`` (default: ``img``'s active L1)
    ahead, in host order (posix_fadvise WILLNEED: asynchronous, many reads in
    flight), so that a walk over a cold page cache does not wait for one table
    at a time.  Only advice: nothing happens for other formats or on error."""
    if l1 is None:
        l1 = getattr(img, "l1", None)
    advise = getattr(os, "posix_fadvise", None)
    if l1 is None or advise is None or getattr(img, "format", None) != "qcow2":
        return
    cs = img.cluster_size
    offsets = sorted({entries.l1_l2_offset(l1[i]) for i in nonzero_indices(l1)} - {0})
    try:
        for off in offsets:
            advise(img.hf.fd, off, cs, os.POSIX_FADV_WILLNEED)
    except (OSError, AttributeError):
        pass


def nonzero_entries(table: array, extended: bool) -> list[int]:
    """Indices of the L2 entries that are not all zero (pyqcow.tablescan: the scan
    runs in C, so a sparse image's empty entries never become Python ints)."""
    return nonzero_indices(table, 2 if extended else 1)
