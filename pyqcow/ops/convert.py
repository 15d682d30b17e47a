"""convert: copy the guest view of an image (its whole chain) into a new file.

``plan_raw`` turns the chain's block status into a list of copy steps: ranges
whose data lives uncompressed in a host file are copied file-to-file
(``fastcopy.copy_runs``, zero 4 KiB blocks skipped); compressed or otherwise
encoded ranges are read through the image.  Ranges that read as zeros are not
written at all, so the raw output is sparse with the image's virtual size.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import fastcopy
from ..errors import OperationError
from ..hostfile import fsync_dir
from ..mapping import chain_status

__all__ = [
    "CopyStep",
    "RawPlan",
    "compressor",
    "convert_to_qcow2",
    "convert_to_raw",
    "execute_raw",
    "plan_raw",
    "snapshot_source",
]

READ_CHUNK = 1 << 20
ZERO_GRANULARITY = 4096

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class CopyStep:
    guest_offset: int
    length: int
    fd: int | None = None  # copy host bytes from this fd ...
    host_offset: int | None = None  # ... starting here; None: read through the image


@dataclass
class RawPlan:
    virtual_size: int
    steps: list[CopyStep] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(s.length for s in self.steps)


def _data_fds(img) -> dict[str, int]:
    fds = {}
    for layer in img.chain:
        hf = getattr(layer, "data_hf", None) or layer.hf
        name = getattr(layer, "data_file_path", None) or layer.path
        fds.setdefault(name, hf.fd)
    return fds


def plan_raw(img) -> RawPlan:
    """Which guest ranges of ``img`` hold data, and where to copy them from."""
    fds = _data_fds(img)
    plan = RawPlan(img.virtual_size)
    for e in chain_status(img):
        if not e.data or e.zero:
            continue
        fd = fds.get(e.filename) if e.offset is not None and e.filename else None
        if fd is not None:
            plan.steps.append(CopyStep(e.start, e.length, fd, e.offset))
        else:
            plan.steps.append(CopyStep(e.start, e.length))
    return plan


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _refuse_source_as_destination(img, dst: str) -> None:
    for layer in img.chain:
        for hf in {id(h): h for h in (layer.hf, getattr(layer, "data_hf", layer.hf))}.values():
            if _same_file(hf.fd, dst):
                raise OperationError(dst, f"destination is the source image file {hf.path}")


def execute_raw(img, plan: RawPlan, dst: str | os.PathLike, progress: ProgressFn | None = None) -> int:
    """Write ``plan`` into ``dst`` (created or truncated). Returns bytes written.

    ``dst`` is locked (QEMU's write lock) before it is truncated and stays locked
    until it is complete and durable; a file this call created is removed again
    if the copy fails.
    """
    from ..create import OutputFile

    dst = os.fspath(dst)
    _refuse_source_as_destination(img, dst)
    with OutputFile(dst) as out:
        written = _write_raw(img, plan, out.fd, dst, progress)
        if out.created:
            fsync_dir(dst)  # the new name must survive a crash, like the data
    return written


def _write_raw(img, plan: RawPlan, fd: int, dst: str, progress: ProgressFn | None) -> int:
    sparse = stat.S_ISREG(os.fstat(fd).st_mode)
    if sparse:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, plan.virtual_size)
    total = plan.data_bytes
    done = written = 0
    pos = 0
    for step in plan.steps:
        if not sparse and step.guest_offset > pos:
            _write_zeros(fd, pos, step.guest_offset - pos, dst)
        if step.fd is not None:
            written += fastcopy.copy_runs(
                step.fd, fd, [(step.host_offset, step.guest_offset, step.length)],
                skip_zero=sparse,
            )
        else:
            written += _copy_through_image(img, fd, step, sparse, dst)
        pos = step.guest_offset + step.length
        done += step.length
        if progress:
            progress(done, total)
    if not sparse and plan.virtual_size > pos:
        _write_zeros(fd, pos, plan.virtual_size - pos, dst)
    if sparse and os.fstat(fd).st_size != plan.virtual_size:
        os.ftruncate(fd, plan.virtual_size)
    os.fsync(fd)
    return written


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


def snapshot_source(img, param: str):
    """The source ``qemu-img convert -l PARAM`` reads: internal snapshot PARAM of ``img``.

    PARAM is ``snapshot.id=ID,snapshot.name=NAME`` (either or both; with both, one
    snapshot must match both) or a plain ``ID_OR_NAME`` (an exact ID first, then a
    name), as qemu-img takes it.  Like qemu-img, the result keeps the image's
    *current* virtual size: past the snapshot's own L1 table it reads what an
    unallocated cluster reads (the backing file, or zeros).
    """
    from ..snapshot import SnapshotNotFoundError, read_snapshot_table
    from ..snapshot_view import SnapshotView, open_snapshot

    if getattr(img, "format", None) != "qcow2" or not hasattr(img, "snapshot"):
        raise OperationError(img.path, f"-l {param}: a {img.format} image has no internal snapshots")
    if param.startswith("snapshot."):
        want: dict[str, str] = {}
        for item in param.split(","):
            key, eq, val = item.partition("=")
            if key not in ("snapshot.id", "snapshot.name") or not eq or key in want:
                raise OperationError(
                    img.path,
                    f"invalid snapshot parameter {item!r} in -l {param!r} (use "
                    "snapshot.id=ID, snapshot.name=NAME, both separated by a comma, "
                    "or ID_OR_NAME)",
                )
            want[key] = val
        snaps = read_snapshot_table(img)
        for info in snaps:
            if want.get("snapshot.id", info.id_str) == info.id_str and (
                want.get("snapshot.name", info.name) == info.name
            ):
                view = SnapshotView(img, info)
                break
        else:
            known = ", ".join(f"{s.id_str} ({s.name})" for s in snaps[:10]) or "none"
            raise SnapshotNotFoundError(
                img.path, f"no internal snapshot matches -l {param!r} (snapshots: {known})"
            )
    else:
        view = open_snapshot(img, param)
    view.virtual_size = img.virtual_size
    return view


def convert_to_raw(img, dst: str | os.PathLike, progress: ProgressFn | None = None) -> int:
    """Plan and write the raw guest view of ``img`` to ``dst``."""
    return execute_raw(img, plan_raw(img), dst, progress)


# ---------------------------------------------------------------------------- qcow2 output
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


def convert_to_qcow2(
    src,
    dst: str | os.PathLike,
    *,
    compress: bool = False,
    options: dict | None = None,
    backing: str | None = None,
    backing_format: str | None = None,
    progress: ProgressFn | None = None,
) -> int:
    """Write the guest view of ``src`` (whole chain) into a new qcow2 ``dst``.

    Clusters that read as zeros are not allocated.  With ``backing``, ``dst``
    is created as an overlay of it and only clusters whose content differs from
    the backing are written (zeros over non-zero backing data become zero
    clusters).  ``compress`` stores data clusters compressed (per the image's
    compression_type) unless compression does not make them smaller.
    Returns the number of guest bytes written.
    """
    from .. import create as create_mod

    dst = os.fspath(dst)
    _refuse_source_as_destination(src, dst)
    if backing is not None and os.path.exists(dst):
        from ..chain import resolve_backing

        bpath = resolve_backing(dst, backing)
        if os.path.exists(bpath) and os.path.samefile(bpath, dst):
            raise OperationError(dst, "the backing file (-B) is the destination itself")
    opts = dict(options or {})
    if backing is not None:
        opts["backing"] = backing
        if backing_format is not None:
            opts["backing_format"] = backing_format
    if opts.get("preallocation", "off") != "off":
        raise OperationError(dst, "convert -O qcow2 supports preallocation=off only")
    # every option is checked (dry run) before the destination is opened or created
    create_mod.create(dst, src.virtual_size, dry_run=True, force=True, **opts)
    with create_mod.OutputFile(dst) as guard:
        # qemu-img convert replaces what is there: force (the backing chain is still
        # protected); the lock taken by ``guard`` is held until the copy is complete
        create_mod.create(dst, src.virtual_size, force=True, _output=guard, **opts)
        with _open_output(dst) as out:
            return _fill_qcow2(src, out, compress, progress)


def _open_output(dst: str):
    """The new qcow2 ``dst`` read-write, without asking again for the lock our
    OutputFile holds; its backing chain (-B) is opened normally (read locks)."""
    from ..chain import open_image, resolve_backing
    from ..errors import BackingChainError, QcowError
    from ..image import QcowImage

    out = QcowImage(dst, "r+", force_share=True)
    try:
        name = out.header.backing_file
        if name:
            bpath = resolve_backing(dst, name)
            try:
                out.backing = open_image(bpath, "r", format=out.header.backing_format or None)
            except QcowError as e:
                raise BackingChainError(dst, f"backing file {name!r}: {e.message}") from e
    except BaseException:
        out.close()
        raise
    return out


def _fill_qcow2(src, out, compress: bool, progress: ProgressFn | None) -> int:
    cs = out.cluster_size
    size = src.virtual_size
    has_backing = out.backing is not None
    comp = compressor(
        "zstd" if out.header.compression_type == 1 else "zlib"
    ) if compress else None
    # Ranges to visit: without a backing only what the source holds as data;
    # with one, everything (zeros may differ from the backing's data).
    if has_backing:
        ranges = [(0, size)]
    else:
        ranges = []
        for e in chain_status(src):
            if not e.data or e.zero:
                continue
            start = e.start & ~(cs - 1)
            end = min(size, (e.start + e.length + cs - 1) & ~(cs - 1))
            if ranges and ranges[-1][1] >= start:
                ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
            else:
                ranges.append((start, end))
    total = sum(b - a for a, b in ranges)
    done = written = 0
    chunk = max(cs, QCOW2_CHUNK)
    buf = bytearray(chunk)
    bbuf = bytearray(chunk) if has_backing else None
    for start, end in ranges:
        pos = start
        while pos < end:
            n = min(chunk, end - pos)
            view = memoryview(buf)[:n]
            src.readinto(view, pos)
            if has_backing:
                bview = memoryview(bbuf)[:n]
                out._read_backing(bview, pos)
                written += _write_differing(out, view, bview, pos, comp)
            else:
                for off, length, is_zero in fastcopy.zero_runs(view, cs):
                    if not is_zero:
                        written += _write_run(out, view[off : off + length], pos + off, comp)
            if len(out.dirty_l2) > 64:
                out.flush()
            pos += n
            done += n
            if progress:
                progress(done, total)
    out.flush()
    return written


def _write_differing(out, view: memoryview, bview: memoryview, guest_offset: int, comp) -> int:
    """Write the clusters of ``view`` that differ from ``bview`` (the backing's view)."""
    cs = out.cluster_size
    written = 0
    run_start = None
    pos = 0
    n = len(view)
    while pos <= n:
        differs = False
        if pos < n:
            m = min(cs, n - pos)
            differs = bytes(view[pos : pos + m]) != bytes(bview[pos : pos + m])
            zero = differs and fastcopy.is_zero(view[pos : pos + m])
            if zero:
                # flush a pending data run, then make this cluster a zero cluster
                if run_start is not None:
                    written += _write_run(out, view[run_start:pos], guest_offset + run_start, comp)
                    run_start = None
                out.write_zeroes(guest_offset + pos, m)
                written += m
                pos += m
                continue
        if differs:
            if run_start is None:
                run_start = pos
        elif run_start is not None:
            written += _write_run(out, view[run_start:pos], guest_offset + run_start, comp)
            run_start = None
        if pos >= n:
            break
        pos += min(cs, n - pos)
    return written


def _write_run(out, data: memoryview, guest_offset: int, comp) -> int:
    """Write cluster-aligned ``data`` into fresh clusters (compressed if asked)."""
    cs = out.cluster_size
    n = len(data)
    if comp is None:
        pos = 0
        for g, host, length in out.prepare_write(guest_offset, n):
            out.hf.pwrite(data[g - guest_offset : g - guest_offset + length], host)
            pos += length
        return n
    for off in range(0, n, cs):
        piece = data[off : off + cs]
        raw = bytes(piece) if len(piece) == cs else bytes(piece) + bytes(cs - len(piece))
        packed = comp(raw)
        if len(packed) < cs:
            out.write_compressed(guest_offset + off, packed)
        else:
            for g, host, length in out.prepare_write(guest_offset + off, len(piece)):
                out.hf.pwrite(piece[g - guest_offset - off : g - guest_offset - off + length], host)
    return n
