"""The one copier: executes planned pieces into a destination image.

Data held at a known host offset (normal clusters, raw files) is copied file to
file by fastcopy (copy_file_range or the C helper: extents shared on a reflink
file system) into host clusters that the destination's writer allocated for a
whole batch at once with ``prepare_writes`` (new clusters in one contiguous
run); compressed data and unaligned edges go through read + write
(``execute``, for commit, stream, merge and the data a safe rebase found
different).  Fresh space of the destination (past its end of file: the new
clusters) is written with O_DIRECT, several writes in flight (directcopy.py);
after each copied slice the write-back of the rest is started
(``start_writeback``, on a thread of its own), so the disk works during the
copy and the final fsync finds little left.

On a reflink file system (source and destination on one XFS/btrfs) each
copy_file_range call shares extents at a fixed cost per call, so the number of
calls is what counts: the batch's new clusters are allocated in the order of
their source offsets (``prepare_writes(sources=...)``), and clusters the
destination already holds privately are moved to new ones too
(``relocate``; the old ones are freed and punched after the new mapping is
durable), so that the top of a commit, written in guest order at random, is
shared in a few long runs (issue 14: XFS commit).

Data that must be looked at before it is written (convert skips zero clusters
and may compress; convert -B writes only what differs from a backing file) is
read into buffers first; ``BufferWriter`` writes such buffers into fresh
clusters of the destination, with the same flush guard.
"""

from __future__ import annotations

import os
import time

from .. import fastcopy
from ..entries import ClusterType
from ..writeback import BackgroundWriteback
from .directcopy import DirectWriter
from .plan import Piece

CHUNK = 32 * 1024 * 1024


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start (not wait for) the write-back of ``fd``'s dirty pages in the range
    (sync_file_range SYNC_FILE_RANGE_WRITE in the C helper; nothing without it).
    After each slice of a copy: the disk writes while the next slice is copied,
    and the final fsync, which alone makes the data durable, finds little left.
    Clean pages in the range cost nothing.  An advice: errors are ignored."""
    native = fastcopy._native_for_call()
    if native is not None and length > 0:
        native.lib.pyqcow_start_writeback(fd, offset, length)


def diff_runs(a, b, first: int, block: int) -> list[tuple[int, int]]:
    """Maximal (offset, length) runs of the ``block``-byte blocks (the first one
    ``first`` bytes) where the equally long buffers ``a`` and ``b`` differ."""
    n = len(a)
    native = fastcopy._native_for_call()
    if native is None:
        out: list[tuple[int, int]] = []
        pos, step = 0, first or block
        while pos < n:
            end = min(n, pos + step)
            if a[pos:end] != b[pos:end]:
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], end - out[-1][0])
                else:
                    out.append((pos, end - pos))
            pos, step = end, block
        return out
    cap = n // block + 2
    buf = native.ffi.new("int64_t[]", 2 * cap)
    with native.ffi.from_buffer(a) as pa, native.ffi.from_buffer(b) as pb:
        count = fastcopy._check(native.lib.pyqcow_diff_runs(pa, pb, n, first, block, buf, cap))
    v = native.ffi.unpack(buf, 2 * count)
    return [(v[i], v[i + 1]) for i in range(0, 2 * count, 2)]


def is_zero(view: memoryview) -> bool:
    """``fastcopy.is_zero`` for a contiguous byte view, without its checks (the
    hot loop of a safe rebase calls it per differing run)."""
    native = fastcopy._native_for_call()
    if native is None:
        return fastcopy.is_zero(view)
    with native.ffi.from_buffer(view) as p:
        return bool(native.lib.pyqcow_is_zero(p, len(view)))


class Progress:
    def __init__(self, total: int, callback=None) -> None:
        self.total = total
        self.done = 0
        self.callback = callback

    def advance(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)


def _src_fd(layer) -> int:
    hf = getattr(layer, "data_hf", None) or layer.hf
    return hf.fd


# Prepared clusters must be filled before the destination publishes the L2 entries
# that point at them.  ``prepare_writes`` returns a handle (writer.PreparedWrite):
# the writer does not flush by itself while one is unfilled, and flushes at the
# filling of the last one if its caches ask for it.  So the copier knows no table
# count or batch size of the writer: it marks each handle filled once its data is
# in place.
BATCH_BYTES = 256 * 1024 * 1024


# A batch is copied in slices, each one call into fastcopy (which Python cannot
# interrupt): progress is reported and Ctrl-C (KeyboardInterrupt) is taken
# between slices.  The slice size adapts to the measured rate so that a slice
# takes about SLICE_SECONDS: progress updates several times a second and an
# interrupt stops the copy well within a second, on fast and slow disks alike.
SLICE_SECONDS = 0.2
SLICE_MIN = 1024 * 1024
SLICE_MAX = 64 * 1024 * 1024
SLICE_START = 8 * 1024 * 1024


class Slicer:
    """``fastcopy.copy_runs`` in calls of about SLICE_SECONDS each.

    ``report(n)`` (optional) is called after each call with the bytes it
    covered; a KeyboardInterrupt is raised between calls.  One Slicer per copy
    (it learns the rate).  Also for copies outside this module (convert).
    """

    def __init__(self) -> None:
        self.size = SLICE_START

    def _cut(self, runs):
        out: list[tuple[int, int, int]] = []
        size = 0
        for src, dst, length in runs:
            while length:
                take = min(length, self.size - size)
                out.append((src, dst, take))
                size += take
                src, dst, length = src + take, dst + take, length - take
                if size >= self.size:
                    yield out, size
                    out, size = [], 0
        if out:
            yield out, size

    def copy_runs(self, src_fd: int, dst_fd: int, runs, *, skip_zero: bool = False,
                  report=None, writeback: bool = False, direct=None) -> int:
        """``writeback``: start writing each slice's destination range to the disk
        once it is copied (start_writeback, or the BackgroundWriteback given),
        not only at the fsync.  ``direct``:
        a DirectWriter on ``dst_fd`` (fastcopy.copy_runs)."""
        written = 0
        for part, size in self._cut(runs):
            t0 = time.monotonic()
            if direct is not None:
                written += fastcopy.copy_runs(src_fd, dst_fd, part, skip_zero=skip_zero,
                                              direct=direct)
            else:
                written += fastcopy.copy_runs(src_fd, dst_fd, part, skip_zero=skip_zero)
            if writeback:
                lo = min(r[1] for r in part)
                n = max(r[1] + r[2] for r in part) - lo
                if writeback is True:
                    start_writeback(dst_fd, lo, n)
                else:  # a BackgroundWriteback of dst_fd
                    writeback(lo, n)
            elapsed = time.monotonic() - t0
            if elapsed > 0:
                step = max(SLICE_MIN, min(SLICE_MAX, int(size / elapsed * SLICE_SECONDS)))
                self.size = step // SLICE_MIN * SLICE_MIN  # slices cut at aligned offsets
            if report is not None:
                report(size)
        return written


#: the cache modes (-t) in which the copier writes fresh space with O_DIRECT
DIRECT_CACHE_MODES = ("writeback", "none")


class _Batch:
    """Cluster-aligned guest ranges whose data lies at a known host offset of a
    source file, not yet prepared nor copied: (guest offset, length, source fd,
    source offset).  ``drain`` prepares them all in the destination at once
    (``prepare_writes``: the new clusters in one contiguous run) and copies them
    file to file, the source runs of each file in one call."""

    def __init__(self, dest, progress: Progress | None = None) -> None:
        self.dest = dest
        self.pending: list[tuple[int, int, int, int]] = []
        self.bytes = 0
        self.progress = progress
        self.unreported = 0  # progress is reported once the bytes are really there
        self.slicer = Slicer()
        # the L2 tables the pending ranges will dirty: the batch drains before they
        # pass the cache's dirty limit, so the tables of one batch are never all
        # pinned at once (clusters scattered one per table: a 256 MiB batch would
        # otherwise hold thousands of dirty tables, and their memory)
        self.tables: set[int] = set()
        cache = getattr(getattr(dest, "writer", None), "l2_cache", None)  # None: raw
        self.table_shift = dest.cluster_bits + dest.l2_bits if cache is not None else 63
        self.table_limit = cache.dirty_limit if cache is not None else 1 << 62
        # start the write-back of what each slice copied at once, so that the
        # disk writes while the next slice is copied and the final fsync finds
        # little left (not with -t unsafe: nothing waits for the disk then)
        hf = getattr(dest, "data_hf", None) or dest.hf
        self.writeback = (BackgroundWriteback(hf.fd, start_writeback)
                          if getattr(hf, "cache", None) != "unsafe" else None)
        # the fresh space through O_DIRECT (qcow2 files only, durable cache modes)
        self.direct = None
        if (cache is not None and getattr(hf, "cache", None) in DIRECT_CACHE_MODES
                and not getattr(hf, "is_block_device", True)):
            self.direct = DirectWriter(hf.fd, hf.path)
        # per source fd: may copy_file_range share its extents with the
        # destination (qcow2 destinations only: a raw one's layout is the guest's)
        self.shares: dict[int, bool] | None = {} if cache is not None else None

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()
        if self.writeback is not None:
            self.writeback.close()

    def done(self, n: int) -> None:
        self.unreported += n
        if not self.pending:
            self.report()

    def report(self, n: int | None = None) -> None:
        """Report ``n`` (default: all) of the bytes done but not yet reported."""
        n = self.unreported if n is None else min(n, self.unreported)
        if self.progress is not None and n:
            self.progress.advance(n)
        self.unreported -= n

    def add(self, src_fd: int, src_offset: int, guest_offset: int, length: int) -> None:
        self.pending.append((guest_offset, length, src_fd, src_offset))
        self.bytes += length
        shift = self.table_shift
        self.tables.update(range(guest_offset >> shift, ((guest_offset + length - 1) >> shift) + 1))
        if self.bytes >= BATCH_BYTES or len(self.tables) >= self.table_limit:
            self.drain()

    def drain(self) -> None:
        if self.pending:
            pend = sorted(self.pending)
            self.pending = []
            self.bytes = 0
            self.tables.clear()
            dst_fd = self.dest.data_hf.fd
            sources = self._sources(pend, dst_fd)
            handle = self.dest.writer.prepare_writes([(g, n) for g, n, _, _ in pend], sources,
                                                     relocate=sources is not None)
            if self.direct is not None:
                self.direct.reserve(max(h + n for _, h, n in handle))
            for fd, runs in _source_runs(handle, pend).items():
                if sources is not None and self.shares.get(fd):
                    runs = in_source_order(runs)
                self.slicer.copy_runs(fd, dst_fd, runs, report=self.report,
                                      writeback=self.writeback or False, direct=self.direct)
            handle.filled()  # the data is in place: the writer may publish the mapping
        self.report()

    def _sources(self, pend, dst_fd: int):
        """``prepare_writes``'s sources for ``pend``: (fd, offset) where the fd
        shares extents with the destination, else None; None if none does."""
        shares = self.shares
        if shares is None:
            return None
        for _g, _n, fd, _so in pend:
            if fd not in shares:
                try:
                    shares[fd] = fastcopy.can_share(fd, dst_fd)
                except (OSError, ValueError):
                    shares[fd] = False
        if not any(shares[fd] for _g, _n, fd, _so in pend):
            return None
        return [(fd, so) if shares[fd] else None for _g, _n, fd, so in pend]


def in_source_order(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(source, destination, length) runs sorted by source, merged where both
    sides continue: the long runs that source-ordered allocation made."""
    out: list[tuple[int, int, int]] = []
    for so, do, n in sorted(runs):
        if out and out[-1][0] + out[-1][2] == so and out[-1][1] + out[-1][2] == do:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
        else:
            out.append((so, do, n))
    return out


def _source_runs(handle, pend) -> dict[int, list[tuple[int, int, int]]]:
    """The (source offset, host offset, length) runs per source fd that fill the
    prepared ``handle`` for the sorted ranges ``pend``."""
    out: dict[int, list[tuple[int, int, int]]] = {}
    j = 0
    for g, h, n in handle:
        while n:
            while pend[j][0] + pend[j][1] <= g:
                j += 1
            pg, pn, fd, so = pend[j]
            take = min(n, pg + pn - g)
            out.setdefault(fd, []).append((so + g - pg, h, take))
            g, h, n = g + take, h + take, n - take
    return out


def execute(pieces: list[Piece], dest, *, write_zero: bool = True, progress: Progress | None = None) -> int:
    """Copy ``pieces`` into ``dest``; returns the number of data bytes copied."""
    try:
        return _execute(pieces, dest, write_zero, progress)
    except BaseException:
        abandon(dest)
        raise


def abandon(dest) -> None:
    """After a failure (KeyboardInterrupt included) in the middle of a copy.

    The destination's in-memory metadata may map clusters that were prepared but
    never filled; it must not reach the disk when the image is closed.  Dropping
    it leaves the file as after its last flush (which ran only with every
    prepared cluster filled): exactly what a crash at that moment would leave.
    """
    writer = getattr(dest, "writer", None)
    if writer is not None and writer.refcounts is not None:
        writer.abandon()  # flush() (and so close()) writes nothing from now on


def _execute(pieces: list[Piece], dest, write_zero: bool, progress: Progress | None) -> int:
    batch = _Batch(dest, progress)
    try:
        return _execute_pieces(pieces, dest, write_zero, batch)
    finally:
        batch.close()


def _execute_pieces(pieces: list[Piece], dest, write_zero: bool, batch: _Batch) -> int:
    copied = 0
    for p in pieces:
        if p.kind == "below":
            continue
        if p.kind == "zero":
            if write_zero:
                batch.drain()
                dest.write_zeroes(p.guest_offset, p.length)
            continue
        pos = p.guest_offset
        while pos < p.end:
            n = min(CHUNK, p.end - pos)
            _copy_data(p, pos, n, dest, batch)
            copied += n
            batch.done(n)
            pos += n
    batch.drain()
    return copied


def _read_write(layer, dest, batch: _Batch, pos: int, n: int) -> None:
    # (dest.write does not flush while the batch's prepared ranges are unfilled)
    buf = bytearray(n)
    layer.readinto(buf, pos)
    dest.write(pos, buf)


def _copy_data(p: Piece, pos: int, n: int, dest, batch: _Batch) -> None:
    run = p.run
    layer = p.layer
    direct = run is not None and run.type == ClusterType.NORMAL and run.host_offset is not None
    if not direct:
        _read_write(layer, dest, batch, pos, n)
        return
    src_fd = _src_fd(layer)
    src_base = run.host_offset + (pos - run.guest_offset)
    if dest.format == "raw":
        fastcopy.copy_range(src_fd, src_base, dest.hf.fd, pos, n)
        return
    cs = dest.cluster_size
    end = pos + n
    a = -(-pos // cs) * cs  # first cluster boundary at or after pos
    b = end // cs * cs
    if end == dest.virtual_size:
        b = end
    if a >= b:
        _read_write(layer, dest, batch, pos, n)
        return
    if a > pos:
        _read_write(layer, dest, batch, pos, a - pos)
    batch.add(src_fd, src_base + (a - pos), a, b - a)
    if end > b:
        _read_write(layer, dest, batch, b, end - b)


# ------------------------------------------------------------------ buffers
class BufferWriter:
    """Writes guest data held in buffers into fresh clusters of ``dest``.

    ``write`` allocates with ``prepare_write`` and fills the clusters with pwrite
    into the destination's data file (with ``pool``: on the pool's threads, in
    any order); with ``comp``, each cluster is stored compressed unless that does
    not make it smaller.  ``checkpoint`` (between buffers) and ``finish`` wait
    for the pending writes before the destination flushes.
    """

    def __init__(self, dest, *, comp=None, pool=None) -> None:
        self.dest = dest
        self.comp = comp
        self.pool = pool
        self.pending: list = []

    def write(self, guest_offset: int, data: memoryview) -> int:
        """Write cluster-aligned ``data`` at ``guest_offset``; returns its length."""
        if self.comp is not None:
            return self._write_compressed(guest_offset, data)
        hf = self.dest.data_hf
        pool = self.pool
        handle = self.dest.prepare_write(guest_offset, len(data))
        writes = []
        for g, host, n in handle:
            piece = data[g - guest_offset : g - guest_offset + n]
            if pool is not None:
                writes.append(pool.submit(hf.pwrite, piece, host))
            else:
                hf.pwrite(piece, host)
        if pool is not None:
            self.pending.append((handle, writes))
        else:
            handle.filled()
        return len(data)

    def copy(self, guest_offset: int, length: int, src_fd: int, src_offset: int) -> int:
        """Like ``write``, for data that lies uncompressed in the host file
        ``src_fd`` at ``src_offset``: copied file to file (copy_file_range, which
        shares the extents on a reflink file system) instead of written from a
        buffer.  Not with ``comp``.  Returns ``length``."""
        fd = self.dest.data_hf.fd
        handle = self.dest.prepare_write(guest_offset, length)
        runs = [(src_offset + (g - guest_offset), host, n) for g, host, n in handle]
        if self.pool is not None:
            self.pending.append((handle, [self.pool.submit(fastcopy.copy_runs, src_fd, fd, runs)]))
        else:
            fastcopy.copy_runs(src_fd, fd, runs)
            handle.filled()
        return length

    def _write_compressed(self, guest_offset: int, data: memoryview) -> int:
        dest = self.dest
        cs = dest.cluster_size
        n = len(data)
        for off in range(0, n, cs):
            piece = data[off : off + cs]
            raw = bytes(piece) if len(piece) == cs else bytes(piece) + bytes(cs - len(piece))
            packed = self.comp(raw)
            if len(packed) < cs:
                dest.write_compressed(guest_offset + off, packed)
                continue
            g0 = guest_offset + off
            handle = dest.prepare_write(g0, len(piece))
            for g, host, ln in handle:
                dest.data_hf.pwrite(piece[g - g0 : g - g0 + ln], host)
            handle.filled()
        return n

    def settle(self) -> None:
        """Wait for the pending (pooled) writes; their prepared ranges are then
        filled (the writer may flush at the last one)."""
        for handle, writes in self.pending:
            for w in writes:
                w.result()
            handle.filled()
        self.pending.clear()

    def checkpoint(self) -> None:
        """Between buffers: once the destination's caches ask for a flush, let the
        pooled writes finish so that it can flush (its data first)."""
        if self.pending and self.dest.writer.needs_flush():
            self.settle()

    def finish(self) -> None:
        self.settle()
        self.dest.flush()


def read_host(fd: int, offset: int, length: int) -> bytearray:
    """``length`` bytes of the host file ``fd`` from ``offset`` (zeros past its end)."""
    buf = bytearray(length)
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return buf
