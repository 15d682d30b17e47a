"""convert: copy the guest view of an image (its whole chain) into a new file.

``plan_raw`` turns the chain's block status into a list of copy steps: ranges
whose data lives uncompressed in a host file are copied file-to-file
(``fastcopy.copy_runs``, zero 4 KiB blocks skipped); compressed or otherwise
encoded ranges are read through the image.  Ranges that read as zeros are not
written at all, so the raw output is sparse with the image's virtual size.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import fastcopy
from ..errors import OperationError
from ..mapping import chain_status

__all__ = [
    "CopyStep",
    "RawPlan",
    "compressor",
    "convert_to_qcow2",
    "convert_to_raw",
    "execute_raw",
    "plan_raw",
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


def _refuse_if_in_use(dst: str) -> None:
    """Never truncate an image a VM (or qemu-io) has open: take and drop its lock."""
    if os.path.isfile(dst):
        from ..hostfile import LOCK_WRITE, HostFile

        with HostFile(dst, writable=True) as hf:
            hf.lock(LOCK_WRITE)


def execute_raw(img, plan: RawPlan, dst: str | os.PathLike, progress: ProgressFn | None = None) -> int:
    """Write ``plan`` into ``dst`` (created or truncated). Returns bytes written."""
    dst = os.fspath(dst)
    for layer in img.chain:
        for hf in {id(h): h for h in (layer.hf, getattr(layer, "data_hf", layer.hf))}.values():
            if _same_file(hf.fd, dst):
                raise OperationError(dst, f"destination is the source image file {hf.path}")
    _refuse_if_in_use(dst)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        sparse = stat.S_ISREG(os.fstat(fd).st_mode)
        if sparse:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, plan.virtual_size)
        total = plan.data_bytes
        done = written = 0
        pos = 0
        for step in plan.steps:
            if not sparse and step.guest_offset > pos:
                _write_zeros(fd, pos, step.guest_offset - pos)
            if step.fd is not None:
                written += fastcopy.copy_runs(
                    step.fd, fd, [(step.host_offset, step.guest_offset, step.length)],
                    skip_zero=sparse,
                )
            else:
                written += _copy_through_image(img, fd, step, sparse)
            pos = step.guest_offset + step.length
            done += step.length
            if progress:
                progress(done, total)
        if not sparse and plan.virtual_size > pos:
            _write_zeros(fd, pos, plan.virtual_size - pos)
        if sparse and os.fstat(fd).st_size != plan.virtual_size:
            os.ftruncate(fd, plan.virtual_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _copy_through_image(img, fd: int, step: CopyStep, sparse: bool) -> int:
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
                    _pwrite_all(fd, view[off : off + length], pos + off)
                    written += length
        else:
            _pwrite_all(fd, view, pos)
            written += n
        pos += n
    return written


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _write_zeros(fd: int, offset: int, length: int) -> None:
    zeros = bytes(min(READ_CHUNK, length))
    while length:
        n = min(len(zeros), length)
        _pwrite_all(fd, memoryview(zeros)[:n], offset)
        offset += n
        length -= n


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
    from ..chain import open_image

    dst = os.fspath(dst)
    for layer in src.chain:
        for hf in {id(h): h for h in (layer.hf, getattr(layer, "data_hf", layer.hf))}.values():
            if _same_file(hf.fd, dst):
                raise OperationError(dst, f"destination is the source image file {hf.path}")
    if backing is not None and os.path.exists(dst):
        from ..chain import resolve_backing

        bpath = resolve_backing(dst, backing)
        if os.path.exists(bpath) and os.path.samefile(bpath, dst):
            raise OperationError(dst, "the backing file (-B) is the destination itself")
    _refuse_if_in_use(dst)
    opts = dict(options or {})
    if backing is not None:
        opts["backing"] = backing
        if backing_format is not None:
            opts["backing_format"] = backing_format
    if opts.get("preallocation", "off") != "off":
        raise OperationError(dst, "convert -O qcow2 supports preallocation=off only")
    create_mod.create(dst, src.virtual_size, **opts)
    with open_image(dst, "r+", format="qcow2") as out:
        return _fill_qcow2(src, out, compress, progress)


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
