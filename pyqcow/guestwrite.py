"""Guest writes through a Writer (pyqcow/writer.py): data, compressed clusters,
zeroes and discard.

Every function here changes data clusters with pwrite and the L2 tables in
memory only (marked dirty in the image's table cache); the writer's flush makes
them durable in the order DESIGN.md section 4 gives.
"""

from __future__ import annotations

from . import entries
from .entries import ClusterType
from .errors import OperationError
from .hostfile import check_range


def write(w, offset: int, data) -> None:
    img = w.img
    w.check_writable()
    mv = memoryview(data).cast("B")
    check_range(img.path, offset, len(mv), img.virtual_size)
    if not len(mv):
        return
    w.begin_write()
    w.mark_dirty(offset, len(mv))
    cb, cs = img.cluster_bits, img.cluster_size
    pos = 0
    total = len(mv)
    batch = not (img.extended_l2 or img.has_data_file)
    while pos < total:
        g = offset + pos
        a = g & (cs - 1)
        if batch and not a and total - pos >= 2 * cs:
            done = _write_full_clusters(w, g >> cb, mv[pos:])
            if done:
                pos += done
                continue
        n = min(cs - a, total - pos)
        _write_in_cluster(w, g >> cb, a, mv[pos : pos + n])
        pos += n
    w.data_written = True
    w.flush_if_needed()


def _write_full_clusters(w, cluster: int, mv: memoryview) -> int:
    """Whole clusters from ``cluster`` on, up to the end of its L2 table, with one
    allocation per run of clusters that need new host clusters and one pwrite
    per run of contiguous host clusters.  Same result as _write_in_cluster per
    cluster: private clusters (normal or zero-with-offset, COPIED) are written
    in place, everything else gets a new cluster and its old allocation is
    freed (deferred).  Returns the bytes written (0: fewer than 2 clusters)."""
    img = w.img
    cb, cs = img.cluster_bits, img.cluster_size
    l2_mask = img.l2_entries - 1
    i0 = cluster & l2_mask
    count = min(len(mv) >> cb, l2_mask + 1 - i0)
    if count < 2:
        return 0
    table, l2_off = w.l2_for_write(cluster)
    hosts = w.alloc_for_entries(table, i0, count)
    w.note_alloc()
    s = 0
    pwrite = img.hf.pwrite
    while s < count:
        t = s + 1
        while t < count and hosts[t] == hosts[t - 1] + cs:
            t += 1
        pwrite(mv[s << cb : t << cb], hosts[s])
        s = t
    data_entry = entries.data_entry
    for k in range(count):
        table[i0 + k] = data_entry(hosts[k])
    w.l2_cache.dirty.add(l2_off)  # (mark_dirty inlined: l2_for_write's table is cached)
    return count << cb


def guest_bytes(img, guest_offset: int, length: int) -> bytearray:
    """Current guest view of a range, zero-padded past the virtual size."""
    buf = bytearray(length)
    inside = max(0, min(length, img.virtual_size - guest_offset))
    if inside:
        img.readinto(memoryview(buf)[:inside], guest_offset)
    return buf


def _write_in_cluster(w, cluster: int, a: int, chunk: memoryview) -> None:
    img = w.img
    cb, cs = img.cluster_bits, img.cluster_size
    base = cluster << cb
    n = len(chunk)
    table, l2_off = w.l2_for_write(cluster)
    i = cluster & (img.l2_entries - 1)
    if img.extended_l2:
        _write_extended(w, table, l2_off, i, base, a, chunk)
        return
    e = table[i]
    if img.has_data_file:
        t = entries.l2_type(e, True)
        if t != ClusterType.NORMAL and not (a == 0 and n == cs):
            buf = guest_bytes(img, base, cs)
            buf[a : a + n] = chunk
            img.data_hf.pwrite(buf, base)
        else:
            img.data_hf.pwrite(chunk, base + a)
        new_e = entries.data_entry(base)
        if new_e != e:
            table[i] = new_e
            w.l2_cache.mark_dirty(l2_off)
        return
    host = entries.writable_host(e)  # NORMAL and COPIED: in place
    if host:
        img.hf.pwrite(chunk, host + a)
        return
    t = entries.l2_type(e)
    # the rest of the cluster reads as zeros (nothing to copy on write)?
    zero_rest = t == ClusterType.ZERO_PLAIN and img.header.version >= 3 or (
        t in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN) and img.backing is None
    )
    if a == 0 and n == cs:
        buf = chunk
    elif zero_rest:
        buf = None
    else:
        buf = guest_bytes(img, base, cs)
        buf[a : a + n] = chunk
    if t == ClusterType.ZERO_ALLOC and entries.is_copied(e):
        host = entries.l2_host_offset(e)
    else:
        host = w.refcounts.alloc(1)
        w.note_alloc()
        w._free_entry_allocation(e)
    if buf is None:
        if host >= img.hf.size():
            # a cluster past the end of the file was never written: its
            # other bytes read as zeros already (holes), write the chunk only
            img.hf.pwrite(chunk, host + a)
        else:
            buf = bytearray(cs)
            buf[a : a + n] = chunk
            img.hf.pwrite(buf, host)
    else:
        img.hf.pwrite(buf, host)
    table[i] = entries.data_entry(host)
    w.l2_cache.dirty.add(l2_off)  # (mark_dirty inlined: l2_for_write's table is cached)


def _write_extended(w, table, l2_off, i, base, a, chunk) -> None:
    img = w.img
    cs = img.cluster_size
    scb = img.subcluster_bits
    n = len(chunk)
    e, bm = table[2 * i], table[2 * i + 1]
    first_sc, last_sc = a >> scb, (a + n - 1) >> scb
    span_start, span_end = first_sc << scb, (last_sc + 1) << scb
    if span_start == a and span_end == a + n:
        buf = chunk
    else:
        buf = guest_bytes(img, base + span_start, span_end - span_start)
        buf[a - span_start : a - span_start + n] = chunk
    compressed = entries.is_compressed(e)
    host = entries.l2_host_offset(e)
    if img.has_data_file:
        host = base
    elif compressed or not (host and entries.is_copied(e)):
        new = w.refcounts.alloc(1)
        w.note_alloc()
        if compressed:
            img.hf.pwrite(guest_bytes(img, base, cs), new)
            bm = entries.ALL_ALLOC_BITS
        elif host:
            img.hf.pwrite(img.hf.pread(cs, host), new)
        w._free_entry_allocation(e)
        host = new
    img.data_hf.pwrite(buf, host + span_start)
    bm = entries.bitmap_allocate(bm, entries.subclusters(first_sc, last_sc + 1 - first_sc))
    table[2 * i] = entries.data_entry(host)
    table[2 * i + 1] = bm
    w.l2_cache.mark_dirty(l2_off)


# ------------------------------------------------------------------ compressed clusters
def write_compressed(w, guest_offset: int, data) -> None:
    """Store one guest cluster as ``data`` (already compressed for this image's
    compression_type).  Compressed clusters are packed into host clusters at
    sector granularity; every host cluster a compressed cluster's sector range
    touches gets one reference per compressed cluster (as qemu counts them).
    """
    img = w.img
    w.check_writable()
    cs, cb = img.cluster_size, img.cluster_bits
    if guest_offset & (cs - 1):
        raise OperationError(img.path, "compressed writes must start at a cluster boundary")
    check_range(img.path, guest_offset, min(cs, img.virtual_size - guest_offset),
                img.virtual_size)
    if guest_offset >= img.virtual_size:
        raise OperationError(img.path, f"request at offset {guest_offset} is outside the disk")
    if img.has_data_file:
        raise OperationError(img.path, "compressed clusters need the data in the image file")
    mv = memoryview(data).cast("B")
    length = len(mv)
    if not 0 < length < cs:
        raise OperationError(img.path, "compressed data must be smaller than one cluster")
    w.begin_write()
    w.mark_dirty(guest_offset, min(cs, img.virtual_size - guest_offset))
    cluster = guest_offset >> cb
    table, l2_off = w.l2_for_write(cluster)
    pos = _compressed_space(w, length)
    img.hf.pwrite(mv, pos)
    descriptor = entries.encode_compressed(pos, length, cb)
    i = cluster & (img.l2_entries - 1)
    if img.extended_l2:
        w._free_entry_allocation(table[2 * i])
        table[2 * i] = descriptor
        table[2 * i + 1] = 0
    else:
        w._free_entry_allocation(table[i])
        table[i] = descriptor
    w.l2_cache.mark_dirty(l2_off)
    w.data_written = True
    w.flush_if_needed()


def _compressed_space(w, length: int) -> int:
    """Host byte offset for ``length`` compressed bytes, packed after the previous
    compressed cluster when they fit; takes the references (one per compressed
    cluster on every host cluster its sectors touch) and moves the packing point."""
    img = w.img
    rc = w.refcounts
    cs, cb = img.cluster_size, img.cluster_bits
    pos, end = w.cpos, w.cend
    if pos and rc.get(pos >> cb) >= rc.max:
        pos = end = 0  # narrow refcounts (refcount_bits=1): no sharing
    old_end_cluster = end >> cb
    if not pos or pos + length > end:
        extra = length if not pos else pos + length - end
        k = (extra + cs - 1) >> cb
        new = rc.alloc(k)
        w.note_alloc()
        if not pos or new != end:
            pos = new
            old_end_cluster = new >> cb  # every touched cluster is fresh
        end = new + (k << cb)
    first, last = pos >> cb, (pos + length - 1) >> cb
    for c in range(first, last + 1):
        if c < old_end_cluster:
            rc.incref(c)  # shared with an earlier compressed cluster
        # else: a fresh cluster, alloc() already gave it its one reference
    nxt = (pos + length + 511) & ~511
    if nxt >= end:
        w.cpos = w.cend = 0
    else:
        w.cpos, w.cend = nxt, end
    return pos


# ------------------------------------------------------------------ zeroes / discard
def write_zeroes(w, offset: int, length: int, *, unmap: bool = False) -> None:
    img = w.img
    w.check_writable()
    check_range(img.path, offset, length, img.virtual_size)
    if not length:
        return
    w.begin_write()
    w.mark_dirty(offset, length)
    cb, cs = img.cluster_bits, img.cluster_size
    end = offset + length
    pos = offset
    while pos < end:
        a = pos & (cs - 1)
        n = min(cs - a, end - pos)
        cluster = pos >> cb
        full = a == 0 and (n == cs or pos + n == img.virtual_size)
        if not _zero_cluster(w, cluster, a, n, full, discard=False):
            _write_in_cluster(w, cluster, a, memoryview(bytes(n)))
        pos += n
        w.flush_if_needed()  # between clusters: a safe point
    w.data_written = True


def discard(w, offset: int, length: int) -> None:
    """Deallocate whole clusters in the range (partial clusters are left alone)."""
    img = w.img
    w.check_writable()
    check_range(img.path, offset, length, img.virtual_size)
    w.begin_write()
    w.mark_dirty(offset, length)
    cb, cs = img.cluster_bits, img.cluster_size
    end = offset + length
    pos = offset
    while pos < end:
        a = pos & (cs - 1)
        n = min(cs - a, end - pos)
        full = a == 0 and (n == cs or pos + n == img.virtual_size)
        if full:
            _zero_cluster(w, pos >> cb, 0, n, True, discard=True)
            w.flush_if_needed()  # between clusters: a safe point
        pos += n


def _zero_cluster(w, cluster: int, a: int, n: int, full: bool, discard: bool) -> bool:
    """Make (part of) a cluster read as zeros via metadata.  False: not possible."""
    img = w.img
    v3 = img.header.version >= 3
    has_backing = img.header.backing_file is not None
    l1_index = cluster >> img.l2_bits
    l1e = img.l1[l1_index] if l1_index < len(img.l1) else 0
    if not entries.l1_l2_offset(l1e) and not has_backing:
        return True  # nothing allocated, nothing behind: already zeros
    if img.extended_l2:
        return _zero_subclusters(w, cluster, a, n, full, discard, has_backing)
    if not full:
        return discard
    if not v3 and has_backing:
        return discard  # v2 cannot express zeros over a backing file
    table, l2_off = w.l2_for_write(cluster)
    i = cluster & (img.l2_entries - 1)
    e = table[i]
    if img.has_data_file:
        host = entries.data_entry(cluster << img.cluster_bits)
        table[i] = entries.zero_entry(host) if v3 else host
        if not v3 or img.header.data_file_raw:
            img.data_hf.pwrite(bytes(n), cluster << img.cluster_bits)
    else:
        w._free_entry_allocation(e)
        table[i] = entries.zero_entry() if (v3 and (has_backing or not discard)) else 0
    if table[i] != e:
        w.l2_cache.mark_dirty(l2_off)
    return True


def _zero_subclusters(w, cluster, a, n, full, discard, has_backing) -> bool:
    """_zero_cluster for extended L2 entries (subcluster granularity)."""
    img = w.img
    scb = img.subcluster_bits
    if a & ((1 << scb) - 1) or (n & ((1 << scb) - 1) and not full):
        return discard  # discard ignores partial subclusters
    table, l2_off = w.l2_for_write(cluster)
    i = cluster & (img.l2_entries - 1)
    e, bm = table[2 * i], table[2 * i + 1]
    first_sc = a >> scb
    nsc = (n + (1 << scb) - 1) >> scb
    mask = entries.subclusters(first_sc, nsc)
    zero = not (discard and not has_backing)
    if full or mask == entries.ALL_ALLOC_BITS:
        w._free_entry_allocation(e)
        if img.has_data_file:
            table[2 * i] = entries.data_entry(cluster << img.cluster_bits)
        else:
            table[2 * i] = 0
        table[2 * i + 1] = entries.ALL_ZERO_BITS if zero else 0
    else:
        if entries.is_compressed(e) or (entries.l2_host_offset(e) and not entries.is_copied(e)):
            return discard
        table[2 * i + 1] = entries.bitmap_unallocate(bm, mask, zero)
    w.l2_cache.mark_dirty(l2_off)
    return True


# ------------------------------------------------------------------ bulk prepare
def check_prepare(w, ranges) -> None:
    """``Writer.prepare_writes``'s checks, then the first-write duties (bitmaps)."""
    img = w.img
    cs = img.cluster_size
    prev = 0
    for offset, length in ranges:
        check_range(img.path, offset, length, img.virtual_size)
        if offset & (cs - 1) or offset < prev or (
            length & (cs - 1) and offset + length != img.virtual_size
        ):
            raise ValueError("prepare_writes needs sorted, cluster-aligned ranges")
        prev = offset + length
    w.begin_write()
    for offset, length in ranges:
        w.mark_dirty(offset, length)


def fill_prepared(w, out, ranges, sources=None, relocate: bool = False) -> None:
    """Map ``ranges`` to private host clusters in memory; the (guest, host,
    length) runs go to ``out`` (a PreparedWrite), merged where both are
    contiguous.  First every L2 table is made private (which may allocate
    tables), then the clusters that need new hosts are allocated together.

    ``sources`` (one per range: a sort key ``(fd, offset)`` of the data's
    origin, or None): the new clusters are handed out in the order of their
    origin, not of the guest, so that data copied file to file from scattered
    guest offsets but one region of its source lands in one run (one
    copy_file_range: one reflink on XFS/btrfs, instead of one per guest run).
    ``relocate`` (with ``sources``): the private clusters of ranges that have a
    source get new clusters too, their old ones freed (deferred: after the new
    mapping is durable), so that a commit on a reflink file system shares the
    top's data in a few long runs instead of writing into the base's clusters
    one guest run at a time."""
    img = w.img
    if img.extended_l2 or img.has_data_file:
        for offset, length in ranges:  # (rare: the per-range path)
            out.extend(_runs_of(w.prepare_write(offset, length)))
        return
    cb, cs = img.cluster_bits, img.cluster_size
    private = entries.l2_private
    segs, need = _segments(w, ranges, sources, relocate)
    if sources is None:
        fresh = _alloc_clusters(w, need)  # taken in order, from fi on
        hosts = None
    else:
        hosts = _fresh_in_source_order(w, segs, need, ranges, sources)
    host_of, data_entry = entries.l2_host_offset, entries.data_entry
    pending_free = w.refcounts.pending_free
    at = 0  # index of the segment's first cluster in ``hosts``
    fi = 0
    for table, i0, count, pos, seg_end, _r, move in segs:
        seg = table[i0 : i0 + count]
        unallocated = seg.count(0) == count
        if move or unallocated:  # every cluster gets a new host (the common case)
            if hosts is None:
                hs = fresh[fi : fi + count]
                fi += count
            else:
                hs = hosts[at : at + count]
            if not unallocated:
                # moved: the old clusters are freed once the new mapping is durable
                olds = [e for e in seg if e]
                moved = [(host_of(e) >> cb, 1) for e in olds if private(e)]
                if moved:
                    pending_free.extend(moved)
                    w.relocated = True
                if len(moved) != len(olds):
                    for e in olds:
                        if not private(e):
                            w.free_entry_allocation(e)
        else:  # private clusters are overwritten in place, the others get new hosts
            hs = []
            for k, e in enumerate(seg):
                if private(e):
                    hs.append(host_of(e))
                    continue
                if hosts is None:
                    hs.append(fresh[fi])
                    fi += 1
                else:
                    hs.append(hosts[at + k])
                w.free_entry_allocation(e)  # (a preallocated zero cluster: data now)
        table[i0 : i0 + count] = type(table)(table.typecode, [data_entry(h) for h in hs])
        _add_runs(out, pos, seg_end, hs, cs)
        at += count
    w.note_alloc()


def _segments(w, ranges, sources, relocate: bool) -> tuple[list, int]:
    """fill_prepared's segments, ``(table, first index, count, guest offset, guest
    end, range index, move)`` (each within one L2 table, made private and marked
    dirty), and the number of clusters that need a new host."""
    img = w.img
    cb, cs = img.cluster_bits, img.cluster_size
    l2_mask = img.l2_entries - 1
    private = entries.l2_private
    l2_bits = img.l2_bits
    segs = []
    need = 0
    current = -1  # the L1 index of ``table`` (private, dirty: pinned in the cache)
    for r, (offset, length) in enumerate(ranges):
        pos, end = offset, offset + length
        move = relocate and sources is not None and sources[r] is not None
        while pos < end:
            cluster = pos >> cb
            if cluster >> l2_bits != current:
                current = cluster >> l2_bits
                table, l2_off = w.l2_for_write(cluster)
                w.l2_cache.mark_dirty(l2_off)
            seg_end = min(end, ((cluster | l2_mask) + 1) << cb)
            i0 = cluster & l2_mask
            count = (seg_end - pos + cs - 1) >> cb
            if move:
                need += count
            else:  # (private clusters keep their host)
                seg = table[i0 : i0 + count]
                need += count if seg.count(0) == count else count - sum(map(private, seg))
            segs.append((table, i0, count, pos, seg_end, r, move))
            pos = seg_end
    return segs, need


def _add_runs(out, pos: int, end: int, hosts, cs: int) -> None:
    """Append the (guest, host, length) runs of guest ``[pos, end)`` whose clusters
    went to ``hosts`` (one per cluster) to ``out``, merged where both are contiguous."""
    breaks = [k for k in range(1, len(hosts)) if hosts[k] - hosts[k - 1] != cs]
    start = 0
    for k in (*breaks, len(hosts)):
        g, host = pos + start * cs, hosts[start]
        n = min(end, pos + k * cs) - g
        if out and out[-1][0] + out[-1][2] == g and out[-1][1] + out[-1][2] == host:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
        else:
            out.append((g, host, n))
        start = k


def _fresh_in_source_order(w, segs, need: int, ranges, sources) -> list:
    """New hosts for the clusters of ``segs`` that need one, handed out in the
    order of their source offsets (those without a source last, in guest
    order): a list indexed by the cluster's place among all of ``segs``'
    clusters (None where the cluster keeps its host)."""
    cb = w.img.cluster_bits
    private = entries.l2_private
    fds: dict[int, int] = {}
    keys: list[int] = []
    slots: list[int] = []
    at = 0
    for table, i0, count, pos, _end, r, move in segs:
        src = sources[r]
        if src is None:
            base = (1 << 62) + pos  # after every sourced one, in guest order
        else:
            rank = fds.setdefault(src[0], len(fds))
            base = (rank << 56) + src[1] + pos - ranges[r][0]
        if move or table[i0 : i0 + count].count(0) == count:  # every cluster (the common case)
            keys.extend(range(base, base + (count << cb), 1 << cb))
            slots.extend(range(at, at + count))
        else:
            for k in range(count):
                if not private(table[i0 + k]):
                    keys.append(base + (k << cb))
                    slots.append(at + k)
        at += count
    rc = w.refcounts
    if rc.free_hint < rc.end_cluster and need > 1:
        # holes below the used area (the frees of an earlier relocation): one
        # run all the same where one fits, not a cluster per hole
        start = rc.alloc(need)
        fresh = range(start, start + (need << cb), 1 << cb)
    else:
        fresh = _alloc_clusters(w, need)
    hosts: list = [None] * at
    for j, i in enumerate(sorted(range(len(keys)), key=keys.__getitem__)):
        hosts[slots[i]] = fresh[j]
    return hosts


def _runs_of(handle) -> list:
    runs = list(handle)
    handle.filled()  # its runs now belong to the caller's handle (still unfilled)
    return runs


def _alloc_clusters(w, count: int) -> list[int]:
    """Host offsets of ``count`` new clusters: in one run where nothing below the
    used area is free, else the free clusters below it first."""
    rc = w.refcounts
    step = 1 << w.img.cluster_bits
    hosts: list[int] = []
    while count > 0:
        n = count if rc.free_hint >= rc.end_cluster else 1
        h = rc.alloc(n)
        hosts.extend(range(h, h + n * step, step))
        count -= n
    return hosts
