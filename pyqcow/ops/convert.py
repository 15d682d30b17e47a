"""convert: copy the guest view of an image (its whole chain) into a new file.

The entry points and their checks.  The work is planned as data by the one
planner (``plan.plan_raw``: which guest ranges hold data, and where to copy them
from) and executed by ``convert_raw`` (-O raw: file-to-file copies into a plain
file) or ``convert_qcow2`` (-O qcow2: chunks read, then written by the copier's
``BufferWriter``); their docstrings say why neither is ``copier.execute``.
"""

from __future__ import annotations

import os

from ..errors import OperationError
from .convert_common import (
    DEFAULT_OPTIONS,
    ConvertOptions,
    ProgressFn,
    refuse_source_as_destination,
)
from .plan import CopyStep, RawPlan, plan_raw

# the writer of each output format is imported when that format is asked for (a
# start-up cost otherwise); these names stay importable from this module
_LAZY = {"compressor": "convert_qcow2", "fill_over_backing": "convert_qcow2",
         "fill_plain": "convert_qcow2", "execute_raw": "convert_raw"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ConvertOptions",
    "CopyStep",
    "RawPlan",
    "convert_to_qcow2",
    "convert_to_raw",
    "plan_raw",
    "snapshot_source",
]


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
    from .convert_raw import execute_raw

    return execute_raw(img, plan_raw(img), dst, progress, opts)


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
    from .convert_qcow2 import fill_over_backing, fill_plain

    dst = os.fspath(dst)
    refuse_source_as_destination(src, dst)
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
                n = fill_over_backing(src, out, compress, progress)
            else:
                n = fill_plain(src, out, compress, progress, opts, fresh=True)
            _add_bitmaps(out, bitmaps)
            return n


def _convert_into_existing(src, dst: str, compress: bool, progress, opts: ConvertOptions) -> int:
    """qemu-img convert -n -O qcow2: the existing qcow2 ``dst`` takes ``src``'s content."""
    from ..chain import open_image, probe_format
    from .convert_qcow2 import fill_plain

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
            from ..bitmap_directory import read_bitmap_directory

            have = {b.name for b in read_bitmap_directory(out) or []}
            clash = [b.name for b in bitmaps if b.name in have]
            if clash:
                raise OperationError(dst, f"--bitmaps: the target already has bitmap {clash[0]!r}")
        n = fill_plain(src, out, compress, progress, opts, fresh=False)
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
    """Give ``out`` copies of ``bitmaps`` (stored on close, copy-then-switch).

    TODO(lead): uses the writer's private ``_begin_write``/``_bitmaps`` (as
    ops/bitmap.py does); an image method to add a bitmap would replace both."""
    if not bitmaps:
        return
    from ..bitmaps import BME_FLAG_IN_USE, Bitmap, BitmapInfo

    out.flush()
    out.writer.begin_write()
    live = list(out.writer.bitmaps or [])
    for b in bitmaps:
        info = BitmapInfo(b.name, b.granularity_bits, b.flags & ~BME_FLAG_IN_USE, b.type, 0, 0,
                          b.extra_data)
        nb = Bitmap(info, bytearray(b.bits), b.nbits)
        if out.virtual_size != b.nbits << b.granularity_bits:
            nb.resize(out.virtual_size)
        nb.changed = True
        live.append(nb)
    out.writer.bitmaps = live


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
