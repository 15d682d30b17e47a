"""Guest-to-host mapping as data: runs of one layer, and chain-wide status.

``Run`` describes a guest byte range of one image layer.  ``chain_status`` walks a
backing chain the way ``qemu-img map`` does and yields ``Extent``s with the same
fields and merging as its JSON output.
"""

from __future__ import annotations

import os

from . import entries
from .entries import ClusterType
from .errors import CorruptImageError, QcowError
from .record import Record
from .tablescan import nonzero_indices

ALLOCATED_TYPES = (
    ClusterType.NORMAL,
    ClusterType.ZERO_PLAIN,
    ClusterType.ZERO_ALLOC,
    ClusterType.COMPRESSED,
)
UNALLOCATED_TYPES = (ClusterType.UNALLOCATED, ClusterType.UNALLOCATED_ALLOC)
ZERO_TYPES = (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC)


class Run(Record):
    """(A Record with its own __init__: one is made per run on the hot paths.)
    guest_offset, length, type; host_offset: NORMAL / ZERO_ALLOC: byte offset in
    the data file; entry: COMPRESSED: the raw L2 entry; file_zero: NORMAL in a hole
    of the host file (metadata preallocation)."""

    __slots__ = ("guest_offset", "length", "type", "host_offset", "entry", "file_zero")

    def __init__(self, guest_offset: int, length: int, type: ClusterType,  # noqa: A002
                 host_offset: int | None = None, entry: int = 0, file_zero: bool = False) -> None:
        self.guest_offset = guest_offset
        self.length = length
        self.type = type
        self.host_offset = host_offset
        self.entry = entry
        self.file_zero = file_zero

    @property
    def allocated(self) -> bool:
        return self.type in ALLOCATED_TYPES

    @property
    def end(self) -> int:
        return self.guest_offset + self.length


class Extent(Record):
    """One line of ``map``: a guest range, the layer it comes from and how."""

    __slots__ = ("start", "length", "depth", "present", "zero", "data", "offset", "filename")

    def __init__(self, start: int, length: int, depth: int, present: bool, zero: bool,
                 data: bool, offset: int | None = None, filename: str | None = None) -> None:
        self.start = start
        self.length = length
        self.depth = depth
        self.present = present
        self.zero = zero
        self.data = data
        self.offset = offset
        self.filename = filename

    def as_json(self) -> dict:
        d = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        return d

    def mergeable(self, nxt: Extent) -> bool:
        if (self.depth, self.present, self.zero, self.data) != (
            nxt.depth,
            nxt.present,
            nxt.zero,
            nxt.data,
        ):
            return False
        if (self.offset is None) != (nxt.offset is None) or self.filename != nxt.filename:
            return False
        if self.offset is not None and self.offset + self.length != nxt.offset:
            return False
        return self.start + self.length == nxt.start


def merge_runs(runs: list[Run]) -> list[Run]:
    out: list[Run] = []
    for r in runs:
        if out:
            p = out[-1]
            if (
                p.type == r.type
                and p.end == r.guest_offset
                and p.type != ClusterType.COMPRESSED
                and p.file_zero == r.file_zero
                and (
                    (p.host_offset is None and r.host_offset is None)
                    or (
                        p.host_offset is not None
                        and r.host_offset is not None
                        and p.host_offset + p.length == r.host_offset
                    )
                )
            ):
                p.length += r.length
                continue
        out.append(r)
    return out


# -- the L1/L2 lookup (pure: table contents in, runs out) ---------------------------
# ``geo`` is anything with the image geometry (cluster_bits, l2_bits, l2_entries,
# subcluster_bits, extended_l2, has_data_file, header.version, path): a QcowImage.
# ``l2_table(offset)`` returns the L2 table at a host offset (the caller's cache
# and I/O); ``check_host(host, entry)`` raises on a host offset that cannot be.
def layer_runs(geo, l1, l2_table, check_host, guest_offset: int, length: int) -> list[Run]:
    """Runs of one layer over [guest_offset, guest_offset+length).

    Empty L1 and L2 entries are skipped in bulk (pyqcow.tablescan), so the time
    is proportional to the allocated entries, not to the length."""
    out: list[Run] = []
    cb = geo.cluster_bits
    span_shift = geo.l2_bits + cb
    end = guest_offset + length
    if length <= 0:
        return out
    first = guest_offset >> span_shift
    stop = min(len(l1), ((end - 1) >> span_shift) + 1)  # L1 indices [first, stop)
    used = nonzero_indices(memoryview(l1)[first:stop]) if first < stop else []
    pos = guest_offset
    for k in used:
        l1_index = first + k
        l2_offset = entries.l1_l2_offset(l1[l1_index])
        if not l2_offset:
            continue  # (only reserved bits set: unallocated)
        span_start = max(pos, l1_index << span_shift)
        if span_start > pos:  # the empty L1 entries before it: one run
            out.append(Run(pos, span_start - pos, ClusterType.UNALLOCATED))
        l2_span_end = min(end, (l1_index + 1) << span_shift)
        _table_runs(geo, l2_table(l2_offset), check_host, span_start, l2_span_end, out)
        pos = l2_span_end
    if pos < end:
        out.append(Run(pos, end - pos, ClusterType.UNALLOCATED))
    return merge_runs(out)


def _table_runs(geo, table, check_host, pos: int, l2_span_end: int, out: list[Run]) -> None:
    """Runs of [pos, l2_span_end), which one L2 ``table`` maps, appended to ``out``."""
    cb = geo.cluster_bits
    cs = 1 << cb
    l2_mask = geo.l2_entries - 1
    words = 2 if geo.extended_l2 else 1
    data_file = geo.has_data_file
    version = geo.header.version
    first = (pos >> cb) & l2_mask
    last_index = ((l2_span_end - 1) >> cb) & l2_mask
    # the entries that are not all zero, found in bulk; the rest is unallocated
    used = nonzero_indices(memoryview(table)[words * first : words * (last_index + 1)], words)
    k = 0
    while pos < l2_span_end:
        cluster = pos >> cb
        l2_index = cluster & l2_mask
        while k < len(used) and first + used[k] < l2_index:
            k += 1
        nxt = first + used[k] if k < len(used) else last_index + 1
        if nxt > l2_index:  # a run of all-zero (unallocated) entries, in one step
            run_end = min(l2_span_end, (cluster + nxt - l2_index) << cb)
            out.append(Run(pos, run_end - pos, ClusterType.UNALLOCATED))
            pos = run_end
            continue
        cl_end = min(l2_span_end, (cluster + 1) << cb)
        if geo.extended_l2:
            _extended_runs(geo, check_host, out, pos, cl_end, cluster,
                           table[2 * l2_index], table[2 * l2_index + 1])
            pos = cl_end
            continue
        e = table[l2_index]
        t = entries.l2_read_type(e, data_file, version)
        if t == ClusterType.COMPRESSED:
            out.append(Run(pos, cl_end - pos, t, None, e))
        elif t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            host = entries.l2_host_offset(e)
            check_host(host, e)
            # a stretch of entries whose host clusters follow each other (equal
            # flags, offsets one cluster apart) is one run: compare raw entries,
            # check only the last host (the largest)
            j = l2_index + 1
            expect = e + cs
            while j <= last_index and table[j] == expect:
                j += 1
                expect += cs
            if j > l2_index + 1:
                check_host(entries.l2_host_offset(expect - cs), expect - cs)
                cl_end = min(l2_span_end, (cluster + j - l2_index) << cb)
            out.append(Run(pos, cl_end - pos, t, host + (pos & (cs - 1))))
        else:
            out.append(Run(pos, cl_end - pos, t))
        pos = cl_end


def _extended_runs(geo, check_host, out, pos, cl_end, cluster, e, bm) -> None:
    """Runs of one cluster with an extended L2 entry (subclusters)."""
    cb = geo.cluster_bits
    data_file = geo.has_data_file
    if entries.is_compressed(e):
        out.append(Run(pos, cl_end - pos, ClusterType.COMPRESSED, None, e))
        return
    if not entries.extended_bitmap_valid(e, bm, data_file):
        raise CorruptImageError(
            geo.path, f"invalid extended L2 entry for guest cluster {cluster} ({e:#x}/{bm:#x})"
        )
    host = entries.l2_host_offset(e)
    if host:
        check_host(host, e)
    scb = geo.subcluster_bits
    base = cluster << cb
    while pos < cl_end:
        sc = (pos - base) >> scb
        sc_end = min(cl_end, base + ((sc + 1) << scb))
        t = entries.subcluster_type(e, bm, sc, data_file)
        if t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC, ClusterType.UNALLOCATED_ALLOC):
            # UNALLOCATED_ALLOC keeps its host offset too: qemu reports it
            # ("offset" of a present: false subcluster) when nothing is below.
            h = host + (pos - base) if (host or data_file) else None
            out.append(Run(pos, sc_end - pos, t, h))
        else:
            out.append(Run(pos, sc_end - pos, t))
        pos = sc_end


def _data_filename(img) -> str:
    return getattr(img, "data_file_path", None) or img.path


#: a layer with more holes than this over a range asks its backing file once,
#: for the span of them all, and cuts the answer (one lookup per hole costs far
#: more than the backing's entries under the layer's own data)
BELOW_AT_ONCE = 8


def _layer_extents(img, start: int, length: int, depth: int) -> list[Extent]:
    out: list[Extent] = []
    size = img.virtual_size
    if start >= size:
        return [Extent(start, length, max(depth - 1, 0) if depth else 0, False, True, False)]
    fname = _data_filename(img)
    runs = img.runs(start, min(length, size - start))
    below = _below_at_once(img, runs, depth)
    for run in runs:
        t = run.type
        if t in UNALLOCATED_TYPES:
            # An unallocated subcluster of an allocated cluster keeps its host
            # offset (qemu: OFFSET_VALID without DATA/ZERO).
            host = run.host_offset
            backing = img.backing
            if backing is None:
                out.append(
                    Extent(run.guest_offset, run.length, depth, False, True, False, host,
                           fname if host is not None else None)
                )
                continue
            bsize = backing.virtual_size
            inside = max(0, min(run.end, bsize) - run.guest_offset)
            if inside:
                if below is not None:
                    out.extend(below.cut(run.guest_offset, run.guest_offset + inside))
                else:
                    out.extend(_layer_extents(backing, run.guest_offset, inside, depth + 1))
            if inside < run.length:
                out.append(
                    Extent(run.guest_offset + inside, run.length - inside, depth, False, True, False,
                           host + inside if host is not None else None,
                           fname if host is not None else None)
                )
        elif t == ClusterType.NORMAL:
            if getattr(img, "format", None) == "qcow2" and img.metadata_preallocation:
                # qemu (BDRV_BLOCK_RECURSE): data clusters of a metadata-preallocated
                # image ask the host file, whose holes read as zeros.
                out.extend(_file_extents(img, run, depth, fname))
            else:
                out.append(
                    Extent(run.guest_offset, run.length, depth, True, run.file_zero, True,
                           run.host_offset, fname)
                )
        elif t == ClusterType.COMPRESSED:
            out.append(Extent(run.guest_offset, run.length, depth, True, False, True))
        else:  # zero
            out.append(
                Extent(run.guest_offset, run.length, depth, True, True, False, run.host_offset,
                       fname if run.host_offset is not None else None)
            )
    if start + length > size:
        out.append(Extent(size, start + length - size, depth, False, True, False))
    return out


def _below_at_once(img, runs, depth: int):
    """A _Below over the span of ``runs``' holes that lie in the backing file,
    when there are more than BELOW_AT_ONCE of them; else None."""
    backing = img.backing
    if backing is None:
        return None
    bsize = backing.virtual_size
    holes = [r for r in runs if r.type in UNALLOCATED_TYPES and r.guest_offset < bsize]
    if len(holes) <= BELOW_AT_ONCE:
        return None
    lo = holes[0].guest_offset
    hi = min(holes[-1].end, bsize)
    return _Below(_layer_extents(backing, lo, hi - lo, depth + 1))


class _Below:
    """Extents of a backing file over a span, cut to ascending sub-ranges."""

    __slots__ = ("extents", "i")

    def __init__(self, extents: list[Extent]) -> None:
        self.extents = extents
        self.i = 0

    def cut(self, a: int, b: int) -> list[Extent]:
        ext = self.extents
        i = self.i
        while i < len(ext) and ext[i].start + ext[i].length <= a:
            i += 1
        self.i = i
        out = []
        while i < len(ext) and ext[i].start < b:
            e = ext[i]
            lo, hi = max(a, e.start), min(b, e.start + e.length)
            if lo == e.start and hi == e.start + e.length:
                out.append(e)
            else:
                off = e.offset + (lo - e.start) if e.offset is not None else None
                out.append(Extent(lo, hi - lo, e.depth, e.present, e.zero, e.data, off,
                                  e.filename))
            i += 1
        return out


def _file_extents(img, run: Run, depth: int, fname: str) -> list[Extent]:
    host = run.host_offset
    out = []
    for off, ln, is_data in img.data_hf.data_extents(host, host + run.length):
        out.append(
            Extent(run.guest_offset + (off - host), ln, depth, True, not is_data, True, off, fname)
        )
    return out


def detect_metadata_preallocation(img) -> bool:
    """qemu's qcow2_detect_metadata_preallocation (block/qcow2-refcount.c).

    Count host clusters with a non-zero refcount over the file's length; the
    image counts as metadata-preallocated once that count reaches
    max(real_clusters * 10 / 9, real_clusters + 2), where real_clusters are the
    clusters the host file really occupies.  Errors mean "no", as in qemu.
    """
    cs = img.cluster_size
    try:
        file_length = img.hf.size()
        real_clusters = os.fstat(img.hf.fd).st_blocks * 512 // cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = (file_length + cs - 1) // cs
        bits = img.refcount_block_bits
        per_block = 1 << bits
        count = 0
        for table_index in range((end_cluster + per_block - 1) // per_block):
            block = img.refcount_block(table_index)
            if block is None:
                continue
            count += block.count_nonzero(end_cluster - (table_index << bits))
            if count >= threshold:
                return True
        return False
    except (QcowError, OSError):
        return False


def chain_status(img, start: int = 0, length: int | None = None) -> list[Extent]:
    """qemu-img map's view: merged extents over [start, start+length)."""
    if length is None:
        length = img.virtual_size - start
    length = max(0, min(length, img.virtual_size - start))
    merged: list[Extent] = []
    for e in _layer_extents(img, start, length, 0):
        if e.length == 0:
            continue
        if merged and merged[-1].mergeable(e):
            merged[-1].length += e.length
        else:
            merged.append(e)
    return merged


def allocated_bytes(img, start: int = 0, length: int | None = None) -> int:
    """Bytes that this layer alone allocates (data, zero or compressed)."""
    if length is None:
        length = img.virtual_size - start
    return sum(r.length for r in img.runs(start, length) if r.allocated)
