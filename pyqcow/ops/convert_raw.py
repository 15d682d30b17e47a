"""convert -O raw: write the planned guest view of an image into a plain file.

The plan (``plan.plan_raw``) lists the guest ranges that hold data: ranges whose
data lives uncompressed in a host file are copied file-to-file
(``fastcopy.copy_runs``, zero 4 KiB blocks skipped; on a reflink file system
the data blocks go as copy_file_range runs, which share extents); compressed or otherwise
encoded ranges are read through the image.  Ranges that read as zeros are not
written at all, so the output is sparse with the image's virtual size.

Why not ``copier.execute``: the destination is a plain file with no metadata
of its own (nothing is allocated, so there is no flush order to guard), zero
blocks inside data are skipped to keep it sparse, and with -m the pieces are
shared among threads; the copy itself is the same fastcopy call.
"""

from __future__ import annotations

import errno
import os
import stat

from .. import fastcopy
from ..errors import OperationError
from ..hostfile import fsync_dir
from ..writeback import BackgroundWriteback
from .convert_common import (
    DEFAULT_OPTIONS,
    ConvertOptions,
    ProgressFn,
    SourceMaps,
    drop_source_cache,
    kick_writeback_wanted,
    refuse_source_as_destination,
    start_writeback,
)
from .copier import read_host
from .plan import CopyStep, RawPlan

READ_CHUNK = 1 << 20
RAW_PIECE = 8 << 20  # -m: a raw copy is shared among streams in pieces of this size
ZERO_GRANULARITY = 4096



def execute_raw(
    img, plan: RawPlan, dst: str | os.PathLike, progress: ProgressFn | None = None,
    opts: ConvertOptions = DEFAULT_OPTIONS,
) -> int:
    """Write ``plan`` into ``dst`` (created or truncated; with ``opts.existing``
    written in place, never truncated). Returns bytes written.

    ``dst`` is locked (QEMU's write lock) before it is truncated and stays locked
    until it is complete and durable; a file this call created is removed again
    if the copy fails.
    """
    from ..newimage import OutputFile

    dst = os.fspath(dst)
    refuse_source_as_destination(img, dst)
    if opts.existing:
        from ..hostfile import LOCK_WRITE, HostFile

        if not os.path.exists(dst):
            raise OperationError(dst, "-n: the target image does not exist")
        hf = HostFile(dst, writable=True)
        try:
            hf.lock(LOCK_WRITE)
            if hf.size() < plan.virtual_size:
                raise OperationError(
                    dst, f"output file is smaller than input file ({hf.size()} < "
                         f"{plan.virtual_size} bytes)"
                )
            return _write_raw(img, plan, hf, dst, progress, opts)
        finally:
            hf.close()
    with OutputFile(dst) as out:
        written = _write_raw(img, plan, out.hf, dst, progress, opts)
        if out.created:
            fsync_dir(dst)  # the new name must survive a crash, like the data
    return written


class Batch(tuple):
    """Runs of one source copied by one call: (host offset, destination offset,
    length) from the host file ``fd``, or with ``fd`` None (guest offset, the same,
    length) read through the image.  (A tuple ``(fd, runs, length)``, not a
    typing.NamedTuple: importing typing costs a convert ~2.5 ms of start-up.)"""

    __slots__ = ()

    def __new__(cls, fd: int | None, runs: list[tuple[int, int, int]], length: int) -> Batch:
        return tuple.__new__(cls, (fd, runs, length))

    fd = property(lambda self: self[0])
    runs = property(lambda self: self[1])
    length = property(lambda self: self[2])

    def _replace(self, *, length: int) -> Batch:
        return Batch(self[0], self[1], length)


def _split(plan: RawPlan) -> tuple[list[Batch], list[tuple[int, int]]]:
    """The plan's steps in batches of at most RAW_PIECE bytes (so that several
    streams share a big run, and one call copies many small ones), and the
    (offset, length) gaps between them."""
    pos = 0
    work: list[Batch] = []
    gaps: list[tuple[int, int]] = []
    for step in plan.steps:
        if step.guest_offset > pos:
            gaps.append((pos, step.guest_offset - pos))
        for a in range(0, step.length, RAW_PIECE):
            n = min(RAW_PIECE, step.length - a)
            g = step.guest_offset + a
            run = (g if step.fd is None else step.host_offset + a, g, n)
            last = work[-1] if work else None
            if last is not None and last.fd == step.fd and last.length + n <= RAW_PIECE:
                last.runs.append(run)
                work[-1] = last._replace(length=last.length + n)
            else:
                work.append(Batch(step.fd, [run], n))
        pos = step.guest_offset + step.length
    if plan.virtual_size > pos:
        gaps.append((pos, plan.virtual_size - pos))
    return work, gaps


def _write_raw(
    img, plan: RawPlan, hf, dst: str, progress: ProgressFn | None,
    opts: ConvertOptions = DEFAULT_OPTIONS,
) -> int:
    fd = hf.fd
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    # sparse: zero ranges are left as holes (a new regular file, or --target-is-zero)
    sparse = opts.sparse_size > 0 and (
        (regular and not opts.existing) or opts.target_is_zero
    )
    if regular and not opts.existing:
        _truncate_to_nothing(fd)
        os.ftruncate(fd, plan.virtual_size)
    work, gaps = _split(plan)
    if not sparse:
        # zero ranges: a hole (regular file) or written zeros (a device, -S 0)
        for off, n in gaps:
            if opts.sparse_size == 0 or not regular or not hf.punch_hole(off, n):
                _write_zeros(fd, off, n, dst)

    # source fd -> copy_file_range may share extents (asked once per file: fstatfs)
    srcs = {s.fd for s in plan.steps if s.fd is not None}
    shares = {src: fastcopy.can_share(src, fd) for src in srcs}
    # (where every source shares its extents, the copies dirty no page: nothing to start)
    writeback = (BackgroundWriteback(fd, start_writeback)
                 if kick_writeback_wanted() and not (shares and all(shares.values())) else None)
    maps = SourceMaps()

    def batch(item: Batch) -> int:
        src_fd, runs, _ = item
        if src_fd is None:
            return sum(_copy_through_image(img, fd, CopyStep(g, n), sparse, dst)
                       for g, _, n in runs)
        if sparse and shares[src_fd]:
            return sum(_copy_data_blocks(src_fd, *run, fd, maps) for run in runs)
        return fastcopy.copy_runs(src_fd, fd, runs, skip_zero=sparse)

    def piece(group: list[Batch]) -> int:
        done = 0
        mapped: dict[int, list[tuple[int, int, int]]] = {}
        for item in group:
            if sparse and item.fd is not None:
                mapped.setdefault(item.fd, []).extend(item.runs)
            else:
                done += batch(item)
        for src_fd, runs in mapped.items():
            # one C call per source file: scanned in place in its mapping, the data
            # copied file to file (one in-kernel copy; shared extents on reflink)
            n = maps.copy_nonzero(src_fd, fd, runs)
            done += batch(Batch(src_fd, runs, 0)) if n is None else n
        if writeback is not None:
            lo = min(item.runs[0][1] for item in group)
            hi = max(item.runs[-1][1] + item.runs[-1][2] for item in group)
            writeback(lo, hi - lo)
        return done

    try:
        with maps:
            written = _run_pieces(piece, work, max(1, opts.coroutines), plan.data_bytes,
                                  progress)
    finally:
        if writeback is not None:
            writeback.close()  # before the fsync (and the close) of fd
    if regular and not opts.existing and os.fstat(fd).st_size != plan.virtual_size:
        os.ftruncate(fd, plan.virtual_size)
    hf.fsync()
    drop_source_cache(img)
    return written


def _truncate_to_nothing(fd: int) -> None:
    """Empty the output file before it is written again.

    Only when it holds something: on ext4 a truncate to size 0 marks the file
    for "replace via truncate" (auto_da_alloc), and the close that follows then
    forces the writeback of everything written meanwhile (0.4 s per GiB, even
    with -t unsafe).  For a file that had bytes, a second open and close of it at
    once takes that mark while nothing is dirty yet."""
    if os.fstat(fd).st_size == 0:
        return
    os.ftruncate(fd, 0)
    try:
        os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        pass


def _groups(work: list[Batch]) -> list[list[Batch]]:
    """Consecutive batches together, RAW_PIECE bytes at most a group (one call to
    the C copier per source file of a group, one writeback start)."""
    out: list[list[Batch]] = []
    size = RAW_PIECE
    for item in work:
        if size + item.length > RAW_PIECE:
            out.append([])
            size = 0
        out[-1].append(item)
        size += item.length
    return out


def _run_pieces(piece, work: list[Batch], workers: int, total: int,
                progress: ProgressFn | None) -> int:
    """``piece(group)`` for every group of ``work``'s batches: the host-file batches
    on ``workers`` threads (the C copier releases the GIL), the others in order."""
    done = written = 0
    parallel = _groups([w for w in work if w.fd is not None]) if workers > 1 else []
    serial = _groups([w for w in work if w.fd is None] if workers > 1 else work)
    if parallel:
        from ..writeback import TaskPool

        pool = TaskPool(workers, "pyqcow-convert")
        try:
            tasks = [pool.submit(piece, group) for group in parallel]
            for task, group in zip(tasks, parallel, strict=True):
                written += task.result()
                done += sum(item.length for item in group)
                if progress:
                    progress(done, total)
        finally:
            pool.shutdown()
    for group in serial:
        written += piece(group)
        done += sum(item.length for item in group)
        if progress:
            progress(done, total)
    return written


def _copy_data_blocks(src_fd: int, src_offset: int, dst_offset: int, n: int, dst_fd: int,
                      maps: SourceMaps) -> int:
    """Copy the blocks of a host-data range that are not all zeros, as
    copy_file_range runs (``fastcopy.copy_runs``): on a reflink file system
    (XFS, btrfs) the destination then shares the source's extents, since the
    runs are whole ZERO_GRANULARITY blocks at cluster-aligned offsets.  Zero
    blocks stay holes (the destination reads as zeros there)."""
    buf = maps.view(src_fd, src_offset, n)
    if buf is None:
        buf = read_host(src_fd, src_offset, n)
    runs = [
        (src_offset + off, dst_offset + off, length)
        for off, length, is_zero in fastcopy.zero_runs(buf, ZERO_GRANULARITY)
        if not is_zero
    ]
    return fastcopy.copy_runs(src_fd, dst_fd, runs)


def _copy_through_image(img, fd: int, step: CopyStep, sparse: bool, dst: str) -> int:
    written = 0
    buf = bytearray(min(READ_CHUNK, step.length))
    pos, end = step.guest_offset, step.guest_offset + step.length
    while pos < end:
        n = min(len(buf), end - pos)
        view = memoryview(buf)[:n]
        img.readinto(view, pos)
        if sparse:
            for off, length, is_zero in fastcopy.zero_runs(view, ZERO_GRANULARITY):
                if not is_zero:
                    _pwrite_all(fd, view[off : off + length], pos + off, dst)
                    written += length
        else:
            _pwrite_all(fd, view, pos, dst)
            written += n
        pos += n
    return written


def _pwrite_all(fd: int, data: memoryview, offset: int, name: str) -> None:
    """pwrite all of ``data``; a write that writes nothing is an error, not a loop."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(
                errno.ENOSPC,
                f"writing at offset {offset + done} wrote nothing (device full?)",
                name,
            )
        done += n


def _write_zeros(fd: int, offset: int, length: int, name: str) -> None:
    zeros = bytes(min(READ_CHUNK, length))
    while length:
        n = min(len(zeros), length)
        _pwrite_all(fd, memoryview(zeros)[:n], offset, name)
        offset += n
        length -= n
