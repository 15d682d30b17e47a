"""convert -O qcow2: fill a qcow2 image with the guest view of a source.

The ranges to copy come from the planner (``plan.plan_raw``, ``cluster_ranges``,
``copy_chunks``) and the clusters are written by the copier's ``BufferWriter``.

Why not ``copier.execute`` (file-to-file copy into prepared clusters): what a
cluster becomes depends on its bytes, which must be read first.  Clusters that
read as zeros are not allocated (and with -S a whole block of them only), with
-c a cluster is stored compressed if that makes it smaller, and over a -B
backing only the clusters that differ from the backing's are written.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable

from .. import fastcopy
from ..entries import ClusterType
from . import copier
from .common import read_guest
from .convert_batch import SHARED_BATCH_BYTES, SHARED_BATCH_CLUSTERS, reflink_fds, write_batch
from .convert_common import (
    ConvertOptions,
    ProgressFn,
    SourceMaps,
    WritebackKicker,
    drop_source_cache,
)
from .plan import (
    Chunk,
    CopyStep,
    RawPlan,
    cluster_ranges,
    copy_chunks,
    pieces_above,
    plan_raw,
)

QCOW2_CHUNK = 4 << 20


def compressor(compression_type: str) -> Callable[[bytes], bytes]:
    """The cluster compressor qemu uses for ``compression_type`` (zlib or zstd)."""
    if compression_type == "zstd":
        import zstandard

        cctx = zstandard.ZstdCompressor()
        return cctx.compress
    import zlib

    def deflate(data: bytes) -> bytes:
        # QEMU block/qcow2-threads.c: raw deflate, window bits -12, memLevel 9
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()

    return deflate


def _compressor_for(out, compress: bool):
    if not compress:
        return None
    return compressor("zstd" if out.header.compression_type == 1 else "zlib")


# ---------------------------------------------------------------- over a -B backing
def fill_over_backing(src, out, compress: bool, progress: ProgressFn | None) -> int:
    """Write into ``out`` (whose backing is compared) the clusters where ``src``
    reads differently from ``out``'s backing.

    Where ``out``'s backing is a layer of ``src``'s own chain (the same files, as
    with ``qemu-img convert -B`` onto the source's base), the guest ranges that
    nothing above that layer allocates read the same on both sides: they are not
    read at all.  The rest is read and compared cluster by cluster (in C); the
    differing clusters of a batch of chunks are allocated together
    (``prepare_writes``) and those that lie in a host file of the source go file
    to file (copy_file_range: shared extents on a reflink file system, one
    in-kernel copy elsewhere), the others are written from the buffer."""
    cs = out.cluster_size
    writer = copier.BufferWriter(out, comp=_compressor_for(out, compress))
    kick = WritebackKicker(out.data_hf.fd, background=True)
    plan, ranges = differing_candidates(src, out.backing, cs)
    chunks = copy_chunks(plan, ranges, max(cs, QCOW2_CHUNK))
    share = _sharing_fds(plan, out) if not compress else frozenset()
    reflink = reflink_fds(share, out)
    if share:
        chunks = split_at_steps(plan, chunks, cs)
    total = sum(c[1] for c in chunks)
    done = written = 0
    bbuf = bytearray(max((c[1] for c in chunks), default=0))
    maps = SourceMaps()
    batch: list[tuple[int, int, object]] = []
    size = 0
    try:
        for g, n, fd, host in chunks:
            view = maps.view(fd, host, n) if fd is not None else None
            if view is None and fd is not None:
                view = memoryview(copier.read_host(fd, host, n))
            elif view is None:
                view = memoryview(bytearray(n))
                src.readinto(view, g)
            bview = memoryview(bbuf)[:n]
            read_guest(out.backing, bview, g)
            origin = (fd, host) if fd in share else None
            written += _differing(out, view, bview, g, origin, batch)
            # (a batch of shared clusters holds no data: it may grow larger)
            size += n if fd not in reflink else n * QCOW2_CHUNK // SHARED_BATCH_BYTES
            done += n
            if size >= QCOW2_CHUNK or len(batch) >= SHARED_BATCH_CLUSTERS:
                written += write_batch(out, writer, batch, reflink)
                batch.clear()
                size = 0
                writer.checkpoint()
                kick()
                if progress:
                    progress(done, total)
        written += write_batch(out, writer, batch, reflink)
        if progress and total:
            progress(done, total)
    finally:
        kick.close()
        maps.close()
    writer.finish()
    return written


def _differing(out, view: memoryview, bview: memoryview, guest_offset: int,
               origin: tuple[int, int] | None, batch: list) -> int:
    """Queue in ``batch`` the data clusters of ``view`` that differ from ``bview``
    (the backing's view): (guest offset, length, (fd, host offset) or the bytes);
    differing clusters of zeros become zero clusters at once.  Returns the bytes
    made zero clusters."""
    cs = out.cluster_size
    zeroed = 0
    for a, ln in copier.diff_runs(view, bview, 0, cs):
        for off, m, zero in fastcopy.zero_runs(view[a : a + ln], cs):
            g = guest_offset + a + off
            if zero:
                out.write_zeroes(g, m)
                zeroed += m
            elif origin is None:
                batch.append((g, m, view[a + off : a + off + m]))
            else:
                batch.append((g, m, (origin[0], origin[1] + a + off)))
    return zeroed


def differing_candidates(src, backing, cs: int) -> tuple[RawPlan, list[tuple[int, int]]]:
    """The (start, end) guest ranges, widened to ``cs`` clusters, where ``src`` may
    read differently from ``backing``, and the plan of where their data lies:
    everything, unless ``backing`` opens the same files as a layer of ``src``'s
    chain, when only what the layers above that layer hold (read from their
    tables only)."""
    size = src.virtual_size
    layer = _same_layer(src, backing) if size else None
    if layer is None:
        return plan_raw(src), ([(0, size)] if size else [])
    plan = RawPlan(size)
    ranges: list[tuple[int, int]] = []
    for p in pieces_above(src, layer, 0, size):
        if p.kind == "below":
            continue
        run = p.run
        if p.kind == "data" and run.type == ClusterType.NORMAL and run.host_offset is not None:
            hf = getattr(p.layer, "data_hf", None) or p.layer.hf
            host = run.host_offset + (p.guest_offset - run.guest_offset)
            plan.steps.append(CopyStep(p.guest_offset, p.length, hf.fd, host))
        a = p.guest_offset // cs * cs
        b = min(size, -(-p.end // cs) * cs)
        if ranges and ranges[-1][1] >= a:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], b))
        else:
            ranges.append((a, b))
    return plan, ranges


def _file_id(img) -> tuple[int, int] | None:
    hf = getattr(img, "hf", None)
    if hf is None or getattr(img, "format", None) not in ("qcow2", "raw"):
        return None
    st = os.fstat(hf.fd)
    return (st.st_dev, st.st_ino)


def _same_layer(src, backing):
    """The layer of ``src``'s chain (below ``src``) that is ``backing``: the same
    file in the same format, over the same files all the way down; or None."""
    if backing is None:
        return None
    want = [(_file_id(i), i.format) for i in backing.chain]
    if any(fid is None for fid, _ in want):
        return None
    chain = list(getattr(src, "chain", None) or [])
    if not chain or chain[0] is not src:  # (a snapshot view: compare everything)
        return None
    layers = chain[1:]
    for k, layer in enumerate(layers):
        if [(_file_id(i), getattr(i, "format", None)) for i in layers[k:]] == want:
            return layer
    return None


# ---------------------------------------------------------------- no -B
def fill_plain(src, out, compress: bool, progress: ProgressFn | None,
               opts: ConvertOptions, *, fresh: bool) -> int:
    """Copy ``src`` into ``out`` (a qcow2 image whose backing, if any, is not compared).

    Ranges that hold data in the source are read in cluster-aligned chunks; with
    ``opts.coroutines`` > 1 the chunks that are plain host data are read by that
    many threads at once (and with ``opts.out_of_order`` also written by them),
    while clusters are allocated in guest order by this thread, so the layout is
    the same as a sequential copy.  Zero clusters are skipped (runs of at least
    ``opts.sparse_size`` bytes; ``-S 0`` writes them as data).  Into an existing
    image (``fresh=False``) ranges that read as zeros are zeroed unless
    ``opts.target_is_zero``.
    """
    from ..writeback import TaskPool

    cs = out.cluster_size
    size = src.virtual_size
    plan = plan_raw(src)
    if opts.sparse_size == 0:
        ranges = [(0, size)] if size else []
    else:
        ranges = cluster_ranges(plan, cs)
    zero_target = not fresh and not opts.target_is_zero
    if zero_target:
        # zero the rest of an existing target (what the source reads as zeros)
        pos = 0
        for a, b in ranges + [(size, size)]:
            if a > pos:
                _zero_existing(out, pos, a - pos)
            pos = b
        out.flush()
    chunks = copy_chunks(plan, ranges, max(cs, QCOW2_CHUNK))
    share = _sharing_fds(plan, out)
    parts: dict[int, list[Chunk]] = {}
    if share and opts.sparse_size <= cs:
        chunks = split_at_steps(plan, chunks, cs)
    elif share:
        # -S over a cluster: a chunk's zero blocks are decided over whole -S blocks,
        # so the chunk stays whole (read through the image) and only its data is
        # written part by part, each part that lies in host data file to file
        parts = parts_by_chunk(chunks, split_at_steps(plan, chunks, cs))
    workers = max(1, opts.coroutines)
    pool = TaskPool(workers, "pyqcow-convert") if workers > 1 else None
    fill = _PlainFill(src, out, _compressor_for(out, compress), opts, zero_target, pool)
    fill.share = share
    fill.reflink = reflink_fds(share, out)
    fill.parts = parts
    if share:
        # the data goes file to file in batches (one C call per source file): the
        # -W write streams would only queue on the destination's inode lock
        # (measured: more CPU and wall, not less)
        fill.writer.pool = None
    try:
        written = fill.run(chunks, workers, progress)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        fill.maps.close()
    out.flush()
    drop_source_cache(src)
    return written


def _sharing_fds(plan, out) -> frozenset[int]:
    """The plan's host files whose data is copied file to file into ``out``:
    every one with the C helper (copy_file_range: shared extents on a reflink
    file system, one in-kernel copy elsewhere, pread/pwrite where refused) when
    the output goes through the page cache; otherwise those from which
    copy_file_range may share extents."""
    from ..hostfile import cache_mode

    fds = {st.fd for st in plan.steps if st.fd is not None}
    if (fastcopy._native_for_call() is not None and cache_mode() in ("writeback", "unsafe")
            and not out.data_hf.is_block_device):
        # (-t none/directsync: written from buffers, O_DIRECT; a block device: through
        # the host file, which knows the device's end)
        return frozenset(fds)
    dst = out.data_hf.fd
    return frozenset(fd for fd in fds if fastcopy.can_share(fd, dst))


def split_at_steps(plan, chunks: list[Chunk], cs: int) -> list[Chunk]:
    """Chunks that span several plan steps (in a chain, where the layer changes),
    cut at the step edges, so that each part lying in host data carries its fd
    and is copied file to file (shared extents on reflink file systems).  Cuts
    fall on cluster boundaries only: host data that does not span whole clusters
    is read through the image with its neighbours."""
    steps = plan.steps
    out: list[Chunk] = []
    si = 0
    for c in chunks:
        g, n, fd, _ = c
        end = g + n
        while si < len(steps) and steps[si].guest_offset + steps[si].length <= g:
            si += 1
        parts: list[Chunk] = []
        pos, j = g, si
        while fd is None and pos < end:
            st = steps[j] if j < len(steps) else None
            if st is not None and st.guest_offset <= pos:
                stop = min(end, st.guest_offset + st.length)
                host = None if st.fd is None else st.host_offset + (pos - st.guest_offset)
                parts.append((pos, stop - pos, st.fd, host))
                j += 1
            else:
                stop = min(end, st.guest_offset) if st is not None else end
                parts.append((pos, stop - pos, None, None))
            pos = stop
        if len(parts) > 1:
            out.extend(_aligned_parts(parts, cs, end))
        else:
            out.append(c)
    return out


def parts_by_chunk(chunks: list[Chunk], parts: list[Chunk]) -> dict[int, list[Chunk]]:
    """``parts`` (``split_at_steps(plan, chunks, cs)``, in order) grouped by the chunk
    of ``chunks`` each lies in, for the chunks that were cut."""
    out: dict[int, list[Chunk]] = {}
    i = 0
    for g, n, _, _ in chunks:
        mine = []
        while i < len(parts) and parts[i][0] < g + n:
            mine.append(parts[i])
            i += 1
        if len(mine) > 1:
            out[g] = mine
    return out


def _aligned_parts(parts: list[Chunk], cs: int, end: int) -> list[Chunk]:
    """``parts`` with host data kept only where it spans whole clusters (or ends
    at ``end``); the rest merged into parts read through the image."""
    out: list[Chunk] = []
    for g, n, fd, host in parts:
        if fd is not None and (g % cs or ((g + n) % cs and g + n != end)):
            fd = host = None
        if fd is None and out and out[-1][2] is None:
            out[-1] = (out[-1][0], out[-1][1] + n, None, None)
        else:
            out.append((g, n, fd, host))
    return out


class _PlainFill:
    """Reads chunks ahead (on ``pool``'s threads when they are host data) and
    writes them, in guest order, through a ``copier.BufferWriter``."""

    def __init__(self, src, out, comp, opts: ConvertOptions, zero_target: bool, pool) -> None:
        self.src = src
        self.out = out
        self.opts = opts
        self.zero_target = zero_target
        self.pool = pool
        # host files whose data is copied file to file (reflink file systems)
        self.share: frozenset[int] = frozenset()
        self.reflink: frozenset[int] = frozenset()  # those of share on a reflink FS
        # chunk guest offset -> its parts (split_at_steps), where they differ
        self.parts: dict[int, list[Chunk]] = {}
        self.maps = SourceMaps()  # the sharing files' data, scanned in place
        self.writer = copier.BufferWriter(
            out, comp=comp, pool=pool if opts.out_of_order else None
        )
        self.native = fastcopy._native_for_call()  # (asked once, not per chunk)
        # data clusters queued for _write_batch: (guest offset, length, source)
        self.batch: list[tuple[int, int, object]] = []
        # what the batch holds, weighed: buffered bytes in full, bytes copied file
        # to file at QCOW2_CHUNK / SHARED_BATCH_BYTES (flushed at QCOW2_CHUNK)
        self.batch_bytes = 0

    def flush_batch(self) -> int:
        wrote = write_batch(self.out, self.writer, self.batch, self.reflink)
        self.batch.clear()
        self.batch_bytes = 0
        return wrote

    def run(self, chunks: list[Chunk], workers: int, progress: ProgressFn | None) -> int:
        out = self.out
        kick = WritebackKicker(out.data_hf.fd, background=True,
                               size=None if out.has_data_file else lambda: out.file_size)
        try:
            return self._run(chunks, workers, progress, kick)
        finally:
            kick.close()

    def _run(self, chunks: list[Chunk], workers: int, progress: ProgressFn | None,
             kick: WritebackKicker) -> int:
        total = sum(c[1] for c in chunks)
        in_flight: deque = deque()
        done = written = 0
        for c in chunks:
            in_flight.append((c, self.read(c)))
            while len(in_flight) > 2 * workers:
                c0, r = in_flight.popleft()
                written += self.consume(c0, r.result() if hasattr(r, "result") else r)
                done += c0[1]
                if progress:
                    progress(done, total)
                if (self.batch_bytes >= QCOW2_CHUNK
                        or len(self.batch) >= SHARED_BATCH_CLUSTERS):
                    self.flush_batch()
                self.writer.checkpoint()  # data before the L2 entries that point at it
                kick()
        while in_flight:
            c0, r = in_flight.popleft()
            written += self.consume(c0, r.result() if hasattr(r, "result") else r)
            done += c0[1]
            if progress:
                progress(done, total)
        self.flush_batch()
        self.writer.settle()
        return written

    def read(self, c: Chunk):
        """The chunk's bytes, or a future of them (host data, with a pool)."""
        g, n, fd, host = c
        if fd is not None and (view := self.maps.view(fd, host, n)) is not None:
            return view  # scanned in place; written from the mapping or file to file
        if fd is not None:
            if self.pool is not None:
                return self.pool.submit(copier.read_host, fd, host, n)
            return copier.read_host(fd, host, n)
        buf = bytearray(n)
        self.src.readinto(memoryview(buf), g)
        return buf

    def _runs(self, g: int, view: memoryview) -> list[tuple[int, int, bool]]:
        cs = self.out.cluster_size
        if self.opts.sparse_size == 0:
            return [(0, len(view), False)]
        runs = _zero_runs(self.native, view, cs)
        if self.opts.sparse_size > cs:
            runs = sparse_runs(runs, g, -(-self.opts.sparse_size // cs) * cs)
        return runs

    def consume(self, c: Chunk, buf: bytearray) -> int:
        """Write the chunk ``c`` read into ``buf``; returns the bytes written."""
        g = c[0]
        out = self.out
        cs = out.cluster_size
        view = memoryview(buf)
        wrote = 0
        for off, length, is_zero in self._runs(g, view):
            if is_zero:
                if self.zero_target:
                    _zero_existing(out, g + off, length)
                continue
            data = view[off : off + length]
            tail = (g + off + length) & (cs - 1)
            if tail and g + off + length != out.virtual_size:
                # the source ends inside a cluster of a larger existing target: the
                # rest of that cluster keeps the target's bytes (read-modify-write)
                out.write(g + off + length - tail, data[length - tail :])
                wrote += tail
                data = data[: length - tail]
                length -= tail
                if not length:
                    continue
            wrote += self.put(c, g + off, data)
        return wrote

    def put(self, c: Chunk, goff: int, data: memoryview) -> int:
        """Write ``data`` (cluster-aligned, at guest offset ``goff`` inside the chunk
        ``c``): the parts that lie in plain host data of a sharing file are copied
        file to file (shared extents on a reflink file system), the rest written."""
        writer = self.writer
        if writer.comp is None and writer.pool is None and c[0] not in self.parts:
            # queued: allocated and copied with the batch (_write_batch)
            fd, host = c[2], c[3]
            if fd in self.share:
                source = (fd, host + (goff - c[0]))
                self.batch_bytes += (len(data) * QCOW2_CHUNK // SHARED_BATCH_BYTES
                                     if fd in self.reflink else len(data))
            else:
                source = data
                self.batch_bytes += len(data)
            self.batch.append((goff, len(data), source))
            return len(data)
        self.flush_batch()  # (guest order kept: what is queued is allocated first)
        if writer.comp is not None or not self.share:
            return writer.write(goff, data)
        wrote = 0
        end = goff + len(data)
        for pg, pn, pfd, phost in self.parts.get(c[0]) or (c,):
            a, b = max(goff, pg), min(end, pg + pn)
            if a >= b:
                continue
            if pfd in self.share:
                wrote += writer.copy(a, b - a, pfd, phost + (a - pg))
            else:
                wrote += writer.write(a, data[a - goff : b - goff])
        return wrote


def _zero_runs(native, view, granularity: int) -> list[tuple[int, int, bool]]:
    """``fastcopy.zero_runs`` of a contiguous byte view with the helper ``native``
    (or None) chosen once by the caller: without the per-call checks and backend
    look-up, which cost more than the scan of a chunk of data."""
    n = len(view)
    if native is None or not n:
        return fastcopy.zero_runs(view, granularity)
    cap = -(-n // granularity)
    out = native.ffi.new("int64_t[]", 3 * cap)
    with native.ffi.from_buffer(view) as p:
        count = fastcopy._check(native.lib.pyqcow_zero_runs(p, n, granularity, out, cap))
    v = native.ffi.unpack(out, 3 * count)
    return [(v[i], v[i + 1], bool(v[i + 2])) for i in range(0, 3 * count, 3)]


def sparse_runs(
    runs: list[tuple[int, int, bool]], guest_offset: int, block: int
) -> list[tuple[int, int, bool]]:
    """-S: only whole ``block``-aligned (guest offsets) blocks of zeros stay sparse; a
    block with any data is written whole, as qemu-img does for sparse sizes larger
    than a cluster.  ``runs`` are zero_runs of a buffer starting at ``guest_offset``."""
    out: list[tuple[int, int, bool]] = []

    def add(off: int, length: int, z: bool) -> None:
        if out and out[-1][2] == z and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, z)
        else:
            out.append((off, length, z))

    if not runs:
        return out
    end = runs[-1][0] + runs[-1][1]
    data = [(off, off + length) for off, length, z in runs if not z]
    pos = 0
    di = 0
    while pos < end:
        # the block containing pos, clipped to the buffer
        b_end = min(end, ((guest_offset + pos) // block + 1) * block - guest_offset)
        while di < len(data) and data[di][1] <= pos:
            di += 1
        has_data = di < len(data) and data[di][0] < b_end
        add(pos, b_end - pos, not has_data)
        pos = b_end
    return out


def _zero_existing(out, offset: int, length: int) -> None:
    """Make a range of an existing target read as zeros (qemu-img convert -n): zero
    clusters where v3 can say so, written zeros where it cannot (v2 over a backing)."""
    for ext in out.map(offset, length):
        if not ext.zero:
            out.write_zeroes(ext.start, ext.length)
