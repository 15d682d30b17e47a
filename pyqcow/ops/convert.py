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
RAW_PIECE = 8 << 20  # -m: a raw copy is shared among streams in pieces of this size
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


@dataclass(frozen=True)
class ConvertOptions:
    """qemu-img convert's copy options (the CLI's -n, --target-is-zero, -S, -m, -W)."""

    existing: bool = False  # -n: write into DST as it is (no create, no truncate)
    target_is_zero: bool = False  # --target-is-zero: DST reads as zeros: skip zero ranges
    sparse_size: int = 4096  # -S: 0 writes every byte (fully allocated output)
    coroutines: int = 1  # -m: copy streams (threads) working at once
    out_of_order: bool = False  # -W: writes may complete in any order
    bitmaps: bool = False  # --bitmaps: copy the source's persistent bitmaps (qcow2 output)


DEFAULT_OPTIONS = ConvertOptions()


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
    _refuse_source_as_destination(img, dst)
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
        os.ftruncate(fd, 0)
        os.ftruncate(fd, plan.virtual_size)
    total = plan.data_bytes
    done = written = 0
    pos = 0
    work: list[tuple[CopyStep, int, int]] = []  # (step, start, length) pieces
    gaps: list[tuple[int, int]] = []
    for step in plan.steps:
        if step.guest_offset > pos:
            gaps.append((pos, step.guest_offset - pos))
        # pieces of at most RAW_PIECE bytes, so that several streams share a big run
        for a in range(0, step.length, RAW_PIECE):
            work.append((step, a, min(RAW_PIECE, step.length - a)))
        pos = step.guest_offset + step.length
    if plan.virtual_size > pos:
        gaps.append((pos, plan.virtual_size - pos))
    skip_zero = sparse and opts.sparse_size > 0

    def piece(item: tuple[CopyStep, int, int]) -> int:
        step, a, n = item
        if step.fd is not None:
            return fastcopy.copy_runs(
                step.fd, fd, [(step.host_offset + a, step.guest_offset + a, n)],
                skip_zero=skip_zero,
            )
        return _copy_through_image(
            img, fd, CopyStep(step.guest_offset + a, n), skip_zero, dst
        )

    if not sparse:
        # zero ranges: a hole (regular file) or written zeros (a device, -S 0)
        for off, n in gaps:
            if opts.sparse_size == 0 or not regular or not hf.punch_hole(off, n):
                _write_zeros(fd, off, n, dst)
    workers = max(1, opts.coroutines)
    parallel = [w for w in work if w[0].fd is not None] if workers > 1 else []
    serial = [w for w in work if w[0].fd is None] if workers > 1 else work
    if parallel:
        from concurrent.futures import ThreadPoolExecutor

        # the C copier releases the GIL: several streams read and write at once
        with ThreadPoolExecutor(workers) as pool:
            for n, item in zip(pool.map(piece, parallel), parallel, strict=True):
                written += n
                done += item[2]
                if progress:
                    progress(done, total)
    for item in serial:
        written += piece(item)
        done += item[2]
        if progress:
            progress(done, total)
    if regular and not opts.existing and os.fstat(fd).st_size != plan.virtual_size:
        os.ftruncate(fd, plan.virtual_size)
    hf.fsync()
    _drop_source_cache(img)
    return written


def _drop_source_cache(img) -> None:
    """-T none/directsync: the source's pages leave the page cache after the copy."""
    from ..hostfile import cache_mode

    if cache_mode(source=True) not in ("none", "directsync"):
        return
    for fd in _data_fds(img).values():
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass


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
    from ..snapshot_table import SnapshotNotFoundError, read_snapshot_table
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


def convert_to_raw(
    img, dst: str | os.PathLike, progress: ProgressFn | None = None,
    opts: ConvertOptions = DEFAULT_OPTIONS,
) -> int:
    """Plan and write the raw guest view of ``img`` to ``dst``."""
    return execute_raw(img, plan_raw(img), dst, progress, opts)


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
    opts: ConvertOptions = DEFAULT_OPTIONS,
) -> int:
    """Write the guest view of ``src`` (whole chain) into a new qcow2 ``dst``
    (with ``opts.existing``: into the existing qcow2 ``dst``, as ``qemu-img convert -n``).

    Clusters that read as zeros are not allocated.  With ``backing``, ``dst``
    is created as an overlay of it and only clusters whose content differs from
    the backing are written (zeros over non-zero backing data become zero
    clusters).  ``compress`` stores data clusters compressed (per the image's
    compression_type) unless compression does not make them smaller.
    Returns the number of guest bytes written.
    """
    from .. import newimage as create_mod

    dst = os.fspath(dst)
    _refuse_source_as_destination(src, dst)
    if backing is not None and os.path.exists(dst):
        from ..chain import resolve_backing

        bpath = resolve_backing(dst, backing)
        if os.path.exists(bpath) and os.path.samefile(bpath, dst):
            raise OperationError(dst, "the backing file (-B) is the destination itself")
    if opts.existing:
        if options:
            raise OperationError(dst, "-o has no effect when skipping image creation (-n)")
        if backing is not None or backing_format is not None:
            raise OperationError(dst, "-B/-F need a new image; with -n the target keeps its own")
        return _convert_into_existing(src, dst, compress, progress, opts)
    copts = dict(options or {})
    if backing is not None:
        copts["backing"] = backing
        if backing_format is not None:
            copts["backing_format"] = backing_format
    if copts.get("preallocation", "off") != "off":
        raise OperationError(dst, "convert -O qcow2 supports preallocation=off only")
    if opts.bitmaps and str(copts.get("compat", "1.1")) in ("0.10", "v2"):
        raise OperationError(dst, "--bitmaps: a v2 (compat=0.10) image cannot hold bitmaps")
    bitmaps = _source_bitmaps(src, dst) if opts.bitmaps else []
    # every option is checked (dry run) before the destination is opened or created
    create_mod.create(dst, src.virtual_size, dry_run=True, force=True, **copts)
    with create_mod.OutputFile(dst) as guard:
        # qemu-img convert replaces what is there: force (the backing chain is still
        # protected); the lock taken by ``guard`` is held until the copy is complete
        create_mod.create(dst, src.virtual_size, force=True, _output=guard, **copts)
        with _open_output(dst) as out:
            if out.backing is not None:
                n = _fill_qcow2(src, out, compress, progress)
            else:
                n = _fill_qcow2_plain(src, out, compress, progress, opts, fresh=True)
            _add_bitmaps(out, bitmaps)
            return n


def _convert_into_existing(src, dst: str, compress: bool, progress, opts: ConvertOptions) -> int:
    """qemu-img convert -n -O qcow2: the existing qcow2 ``dst`` takes ``src``'s content."""
    from ..chain import open_image, probe_format

    if not os.path.exists(dst):
        raise OperationError(dst, "-n: the target image does not exist")
    if probe_format(dst) != "qcow2":
        raise OperationError(dst, "-n -O qcow2: the target is not a qcow2 image")
    with open_image(dst, "r+") as out:
        if out.virtual_size < src.virtual_size:
            raise OperationError(
                dst, f"output file is smaller than input file ({out.virtual_size} < "
                     f"{src.virtual_size} bytes)"
            )
        if opts.target_is_zero and out.backing is not None:
            raise OperationError(
                dst, "cannot use --target-is-zero when the destination image has a backing file"
            )
        from .. import writer

        writer.require_writable_features(out)
        bitmaps = _source_bitmaps(src, dst) if opts.bitmaps else []
        if bitmaps:
            if out.header.version < 3:
                raise OperationError(dst, "--bitmaps: a v2 (compat=0.10) image cannot hold bitmaps")
            from ..bitmaps import read_bitmap_directory

            have = {b.name for b in read_bitmap_directory(out) or []}
            clash = [b.name for b in bitmaps if b.name in have]
            if clash:
                raise OperationError(dst, f"--bitmaps: the target already has bitmap {clash[0]!r}")
        n = _fill_qcow2_plain(src, out, compress, progress, opts, fresh=False)
        _add_bitmaps(out, bitmaps)
        return n


def _source_bitmaps(src, dst: str) -> list:
    """The persistent bitmaps of the source's top image, with their bits (--bitmaps)."""
    from ..bitmaps import load_bitmaps

    if getattr(src, "format", None) != "qcow2" or not hasattr(src, "header"):
        raise OperationError(dst, "--bitmaps: the source has no persistent bitmaps (not a "
                                  "qcow2 image)")
    out = load_bitmaps(src) or []
    for b in out:
        if b.bits is None:
            raise OperationError(src.path, f"--bitmaps: cannot copy bitmap {b.name!r}: {b.why}")
    return out


def _add_bitmaps(out, bitmaps: list) -> None:
    """Give ``out`` copies of ``bitmaps`` (stored on close, copy-then-switch)."""
    if not bitmaps:
        return
    from ..bitmaps import BME_FLAG_IN_USE, Bitmap, BitmapInfo

    out.flush()
    out._begin_write()
    live = list(out._bitmaps or [])
    for b in bitmaps:
        info = BitmapInfo(b.name, b.granularity_bits, b.flags & ~BME_FLAG_IN_USE, b.type, 0, 0,
                          b.extra_data)
        nb = Bitmap(info, bytearray(b.bits), b.nbits)
        if out.virtual_size != b.nbits << b.granularity_bits:
            nb.resize(out.virtual_size)
        nb.changed = True
        live.append(nb)
    out._bitmaps = live


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


# ------------------------------------------------------------------ qcow2 output, no -B
def _fill_qcow2_plain(src, out, compress: bool, progress: ProgressFn | None,
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
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    cs = out.cluster_size
    size = src.virtual_size
    comp = compressor("zstd" if out.header.compression_type == 1 else "zlib") if compress else None
    full = opts.sparse_size == 0
    plan = plan_raw(src)
    ranges: list[tuple[int, int]] = []
    if full:
        ranges = [(0, size)] if size else []
    else:
        for st in plan.steps:
            start = st.guest_offset & ~(cs - 1)
            end = min(size, (st.guest_offset + st.length + cs - 1) & ~(cs - 1))
            if ranges and ranges[-1][1] >= start:
                ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
            else:
                ranges.append((start, end))
    # zero the rest of an existing target (what the source reads as zeros)
    zero_target = not fresh and not opts.target_is_zero
    if zero_target:
        pos = 0
        for a, b in ranges + [(size, size)]:
            if a > pos:
                _zero_existing(out, pos, a - pos)
            pos = b
        out.flush()
    # which chunks can be read straight from a host file
    chunk = max(cs, QCOW2_CHUNK)
    chunks: list[tuple[int, int, int | None, int]] = []  # (guest, length, fd, host)
    steps = plan.steps
    si = 0
    for a, b in ranges:
        pos = a
        while pos < b:
            n = min(chunk, b - pos)
            while si < len(steps) and steps[si].guest_offset + steps[si].length <= pos:
                si += 1
            fd = host = None
            if si < len(steps):
                st = steps[si]
                if st.fd is not None and st.guest_offset <= pos and pos + n <= st.guest_offset + st.length:
                    fd, host = st.fd, st.host_offset + (pos - st.guest_offset)
            chunks.append((pos, n, fd, host))
            pos += n
    total = sum(c[1] for c in chunks)
    workers = max(1, opts.coroutines)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    in_flight: deque = deque()
    writes: list = []
    done = written = 0

    def read_fd(fd: int, host: int, n: int) -> bytearray:
        buf = bytearray(n)
        fastcopy._pread_full(fd, memoryview(buf), host)
        return buf

    def read(c) -> object:
        g, n, fd, host = c
        if fd is not None and pool is not None:
            return pool.submit(read_fd, fd, host, n)
        buf = bytearray(n)
        if fd is not None:
            fastcopy._pread_full(fd, memoryview(buf), host)
        else:
            src.readinto(memoryview(buf), g)
        return buf

    def settle_writes() -> None:
        for w in writes:
            w.result()
        writes.clear()

    def consume(c, buf: bytearray) -> int:
        g, n = c[0], c[1]
        view = memoryview(buf)
        if full:
            runs = [(0, n, False)]
        else:
            runs = fastcopy.zero_runs(view, cs)
            if opts.sparse_size > cs:
                runs = _sparse_runs(runs, g, -(-opts.sparse_size // cs) * cs)
        wrote = 0
        for off, length, is_zero in runs:
            if is_zero:
                if zero_target:
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
            if comp is not None:
                wrote += _write_run(out, data, g + off, comp)
                continue
            for gg, host, ln in out.prepare_write(g + off, length):
                piece = data[gg - g - off : gg - g - off + ln]
                if pool is not None and opts.out_of_order:
                    writes.append(pool.submit(out.hf.pwrite, piece, host))
                else:
                    out.hf.pwrite(piece, host)
            wrote += length
        return wrote

    try:
        for c in chunks:
            in_flight.append((c, read(c)))
            while len(in_flight) > 2 * workers:
                c0, r = in_flight.popleft()
                written += consume(c0, r.result() if hasattr(r, "result") else r)
                done += c0[1]
                if progress:
                    progress(done, total)
                if len(out.dirty_l2) > 64:
                    settle_writes()  # data before the L2 entries that point at it
                    out.flush()
        while in_flight:
            c0, r = in_flight.popleft()
            written += consume(c0, r.result() if hasattr(r, "result") else r)
            done += c0[1]
            if progress:
                progress(done, total)
        settle_writes()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    out._data_written = True
    out.flush()
    _drop_source_cache(src)
    return written


def _sparse_runs(
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
