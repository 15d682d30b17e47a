"""The one copier: executes planned pieces into a destination image.

Data held at a known host offset (normal clusters, raw files) is copied file to
file by fastcopy (copy_file_range or the C helper) into host clusters that the
destination's writer allocated with ``prepare_write``; compressed data and
unaligned edges go through read + write (``execute``, for commit and stream).

Data that must be looked at before it is written (convert skips zero clusters
and may compress; rebase and convert -B write only what differs from a backing
file) is read into buffers first; ``BufferWriter`` writes such buffers into
fresh clusters of the destination, with the same flush guard.
"""

from __future__ import annotations

import os
import time

from .. import fastcopy
from ..entries import ClusterType
from .plan import Piece

CHUNK = 32 * 1024 * 1024


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


# ------------------------------------------------------------------ batch sizes
# The one place that knows how the destination's writer batches its L2 tables
# (to go once prepare_write returns a handle that a flush will not publish
# before it is filled).  Prepared clusters must be filled before the
# destination flushes its L2 tables (a crash in between would expose unwritten
# clusters).  The writer flushes by itself once more than MAX_DIRTY_L2 tables
# are dirty, so:
# - ``execute``: a prepare_write call touches at most PREPARE_TABLES tables,
#   and the copier copies what is pending and flushes first when the next call
#   could cross MAX_DIRTY_L2;
# - ``BufferWriter``: one buffer touches a few tables at most; between buffers
#   the destination is flushed (its pending writes complete first) once more
#   than FILL_DIRTY_L2 tables are dirty, far below MAX_DIRTY_L2.
PREPARE_TABLES = 32
FILL_DIRTY_L2 = 64
BATCH_BYTES = 256 * 1024 * 1024


def dirty_tables(dest) -> int:
    """How many L2 tables of ``dest`` are changed in memory only."""
    return len(dest.dirty_l2)


def note_data_written(dest) -> None:
    """Guest data went into host clusters of ``dest`` behind its back (pwrite
    into prepared clusters): its next flush must make it durable first.

    TODO(lead): an image method for this (or the prepare_write handle's fill)."""
    dest._data_written = True

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
                  report=None) -> int:
        written = 0
        for part, size in self._cut(runs):
            t0 = time.monotonic()
            written += fastcopy.copy_runs(src_fd, dst_fd, part, skip_zero=skip_zero)
            elapsed = time.monotonic() - t0
            if elapsed > 0:
                self.size = max(SLICE_MIN, min(SLICE_MAX, int(size / elapsed * SLICE_SECONDS)))
            if report is not None:
                report(size)
        return written


class _Batch:
    """Prepared (source fd, source offset, host offset, length) runs not yet copied."""

    def __init__(self, dest, progress: Progress | None = None) -> None:
        self.dest = dest
        self.fd = -1
        self.runs: list[tuple[int, int, int]] = []
        self.bytes = 0
        self.progress = progress
        self.unreported = 0  # progress is reported once the bytes are really there
        self.slicer = Slicer()

    def done(self, n: int) -> None:
        self.unreported += n
        if not self.runs:
            self.report()

    def report(self, n: int | None = None) -> None:
        """Report ``n`` (default: all) of the bytes done but not yet reported."""
        n = self.unreported if n is None else min(n, self.unreported)
        if self.progress is not None and n:
            self.progress.advance(n)
        self.unreported -= n

    def add(self, src_fd: int, runs: list[tuple[int, int, int]]) -> None:
        if src_fd != self.fd:
            self.drain()
            self.fd = src_fd
        self.runs.extend(runs)
        self.bytes += sum(r[2] for r in runs)
        if self.bytes >= BATCH_BYTES:
            self.drain()

    def drain(self) -> None:
        if self.runs:
            self.slicer.copy_runs(self.fd, self.dest.data_hf.fd, self.runs, report=self.report)
            self.runs = []
            self.bytes = 0
        self.report()

    def before_prepare(self) -> None:
        """Make sure the next prepare_write cannot flush uncopied clusters."""
        from ..writer import MAX_DIRTY_L2

        if dirty_tables(self.dest) + PREPARE_TABLES + 2 > MAX_DIRTY_L2:
            self.drain()
            self.dest.flush()


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

    TODO(lead): reaches into the writer's state (dirty sets, ``refcounts``); an
    image method (e.g. ``drop_unflushed()``) should own this.
    """
    if getattr(dest, "refcounts", None) is None:
        return  # raw, or read-only: nothing cached
    dest.dirty_l2.clear()
    dest.l1_dirty = False
    dest.header_dirty = False
    dest.refcounts = None  # flush() (and so close()) writes nothing from now on


def _execute(pieces: list[Piece], dest, write_zero: bool, progress: Progress | None) -> int:
    copied = 0
    batch = _Batch(dest, progress)
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
    batch.drain()  # dest.write may flush
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
    span = PREPARE_TABLES * dest.l2_entries * cs
    g = a
    while g < b:
        m = min(b - g, span - g % span)
        batch.before_prepare()
        hosts = dest.prepare_write(g, m)
        batch.add(src_fd, [(src_base + (h_g - pos), h, ln) for h_g, h, ln in hosts])
        g += m
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
        for g, host, n in self.dest.prepare_write(guest_offset, len(data)):
            piece = data[g - guest_offset : g - guest_offset + n]
            if pool is not None:
                self.pending.append(pool.submit(hf.pwrite, piece, host))
            else:
                hf.pwrite(piece, host)
        return len(data)

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
            for g, host, ln in dest.prepare_write(g0, len(piece)):
                dest.data_hf.pwrite(piece[g - g0 : g - g0 + ln], host)
        return n

    def settle(self) -> None:
        """Wait for the pending (pooled) writes."""
        for w in self.pending:
            w.result()
        self.pending.clear()

    def checkpoint(self) -> None:
        """Flush the destination once enough tables are dirty (its data first)."""
        if dirty_tables(self.dest) > FILL_DIRTY_L2:
            self.settle()
            self.dest.flush()

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
