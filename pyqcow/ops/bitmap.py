"""qemu-img bitmap: add, remove, clear, enable, disable and merge persistent bitmaps.

Operations run in the order given on one image opened read-write; the result is
stored once, crash-safe, by the bitmap engine (pyqcow.bitmaps.store_bitmaps:
new data, tables and directory first, then one header write switches to them,
then the old clusters are freed).  Clusters of removed bitmaps are freed only
after that switch.  Everything that can fail is checked before the first write.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import spec
from ..errors import OperationError

__all__ = ["BitmapOp", "bitmap", "default_granularity"]

OPS = ("add", "remove", "clear", "enable", "disable", "merge")


@dataclass(frozen=True)
class BitmapOp:
    kind: str  # one of OPS
    source: str | None = None  # merge: the source bitmap's name
    source_image: str | None = None  # merge: -b SOURCE_IMAGE (default: the image itself)
    source_format: str | None = None


def default_granularity(cluster_size: int) -> int:
    """qemu's choice for --add without -g: the cluster size, between 4 KiB and 64 KiB."""
    return min(max(cluster_size, 4096), 65536)


def _fail(path: str, op: str, name: str, why: str) -> OperationError:
    return OperationError(path, f"operation {op} on bitmap {name} failed: {why}")


def bitmap(path: str | os.PathLike, name: str, ops: list[BitmapOp], *,
           granularity: int | None = None, format: str | None = None) -> None:
    """Apply ``ops`` to bitmap ``name`` of the qcow2 image ``path``."""
    from ..bitmaps import load_bitmaps
    from ..chain import open_image, probe_format

    path = os.fspath(path)
    if not ops:
        raise OperationError(path, "need at least one of --add, --remove, --clear, --enable, "
                                   "--disable, or --merge")
    fmt = format or probe_format(path)
    if fmt != "qcow2":
        raise OperationError(path, f"persistent bitmaps need a qcow2 image (this one is {fmt})")
    if granularity is not None and not any(o.kind == "add" for o in ops):
        raise OperationError(path, "-g needs --add")
    sources = _read_sources(path, name, ops)
    with open_image(path, "r+", format="qcow2", backing=False) as img:
        if img.header.version < 3:
            raise _fail(path, ops[0].kind, name, "cannot store dirty bitmaps in qcow2 v2 files")
        current = list(load_bitmaps(img) or [])
        _plan(path, name, ops, img.cluster_size, current, granularity)
        live, removed = _apply(img, name, ops, granularity, sources)
        _store(img, live, removed)


def _read_sources(path: str, name: str, ops: list[BitmapOp]) -> dict:
    """The merge sources in other images (opened read-only), read before any write:
    (image, bitmap name) -> (dirty ranges, virtual size)."""
    from ..bitmaps import load_bitmaps
    from ..chain import open_image

    sources = {}
    for op in ops:
        if op.kind != "merge":
            continue
        if op.source_image is None:
            continue
        with open_image(op.source_image, "r", format=op.source_format, backing=False) as simg:
            if simg.format != "qcow2":
                raise _fail(path, "merge", name, f"{op.source_image} has no persistent bitmaps")
            found = {b.name: b for b in load_bitmaps(simg) or []}
            b = found.get(op.source)
            if b is None:
                raise _fail(path, "merge", name, f"dirty bitmap '{op.source}' not found in "
                                                 f"{op.source_image}")
            if b.bits is None:
                raise _fail(path, "merge", name, f"bitmap '{op.source}' is {b.why}")
            sources[(op.source_image, op.source)] = (b.dirty_ranges(), simg.virtual_size)
    return sources


def _plan(path: str, name: str, ops: list[BitmapOp], cluster_size: int, current: list,
          granularity: int | None) -> None:
    """Play ``ops`` on a copy of the directory: every refusal before the first write."""
    from ..bitmap_directory import (
        BME_MAX_GRANULARITY_BITS,
        BME_MAX_NAME_SIZE,
        BME_MIN_GRANULARITY_BITS,
        MAX_BITMAPS,
    )

    plan_names = [b.name for b in current]
    for op in ops:
        present = name in plan_names
        if op.kind == "add":
            if present:
                raise _fail(path, "add", name, f"bitmap already exists: {name}")
            if not name or len(name.encode("utf-8", "surrogateescape")) > BME_MAX_NAME_SIZE:
                raise _fail(path, "add", name, "the name must be 1 to 1023 bytes")
            g = granularity or default_granularity(cluster_size)
            gb = g.bit_length() - 1
            if g & (g - 1) or not BME_MIN_GRANULARITY_BITS <= gb <= BME_MAX_GRANULARITY_BITS:
                raise _fail(path, "add", name, "granularity must be a power of 2 between "
                                               "512 bytes and 2 GiB")
            if len(plan_names) >= MAX_BITMAPS:
                raise _fail(path, "add", name, "too many bitmaps (65535)")
            plan_names.append(name)
        elif not present:
            raise _fail(path, op.kind, name, f"dirty bitmap '{name}' not found")
        elif op.kind == "remove":
            plan_names.remove(name)
        elif op.kind == "merge" and op.source_image is None and op.source not in plan_names:
            raise _fail(path, "merge", name, f"dirty bitmap '{op.source}' not found")
    for b in current:
        if b.name == name and b.bits is None and any(
            o.kind in ("clear", "enable", "disable", "merge") for o in ops
        ):
            raise _fail(path, ops[0].kind, name, f"bitmap '{name}' is {b.why}: it can only "
                                                 "be removed")
    for op in ops:
        if op.kind == "merge" and op.source_image is None:
            src = next((b for b in current if b.name == op.source), None)
            if src is not None and src.bits is None:
                raise _fail(path, "merge", name, f"bitmap '{op.source}' is {src.why}")


def _apply(img, name: str, ops: list[BitmapOp], granularity: int | None,
           sources: dict) -> tuple[list, list]:
    """Apply ``ops`` in memory; -> (the bitmaps to store, the removed ones to free)."""
    from ..bitmap_directory import BME_FLAG_AUTO, BT_DIRTY_TRACKING_BITMAP, BitmapInfo, bitmap_bits
    from ..bitmaps import Bitmap

    img.writer.begin_write()  # loads the bitmaps and flags them in use on disk
    live = img.writer.bitmaps if img.writer.bitmaps is not None else []
    removed = []
    for op in ops:
        target = next((b for b in live if b.name == name), None)
        if op.kind == "add":
            g = granularity or default_granularity(img.cluster_size)
            gb = g.bit_length() - 1
            nbits = bitmap_bits(img.virtual_size, gb)
            info = BitmapInfo(name, gb, BME_FLAG_AUTO, BT_DIRTY_TRACKING_BITMAP, 0, 0)
            nb = Bitmap(info, bytearray((nbits + 7) >> 3), nbits)
            nb.changed = True
            live.append(nb)
        elif op.kind == "remove":
            live.remove(target)
            if target.table_offset:
                removed.append(target)
        elif op.kind == "clear":
            target.bits[:] = bytes(len(target.bits))
            target.changed = True
        elif op.kind == "enable":
            target.flags |= BME_FLAG_AUTO
        elif op.kind == "disable":
            target.flags &= ~BME_FLAG_AUTO
        elif op.kind == "merge":
            if op.source_image is None:
                src = next(b for b in live if b.name == op.source)
                ranges = src.dirty_ranges()
            else:
                ranges, _ = sources[(op.source_image, op.source)]
            for off, length in ranges:
                if off < img.virtual_size:
                    target.set_range(off, min(length, img.virtual_size - off))
            target.changed = True
    return live, removed


def _store(img, live: list, removed: list) -> None:
    """Store the bitmaps (or drop the extension when none is left), then free what the
    removed ones held."""
    from ..bitmaps import _clusters, store_bitmaps
    from ..header import with_extension

    cs = img.cluster_size
    rc = img.refcounts
    if live:
        store_bitmaps(img, live)
    else:
        old = img.header.bitmaps
        img.flush()
        h = with_extension(img.header, spec.ExtType.BITMAPS, None)
        img.switch_header(h.replace(autoclear_features=h.autoclear_features
                                    & ~spec.Autoclear.BITMAPS))
        if old is not None:
            rc.free_later(old.bitmap_directory_offset, _clusters(old.bitmap_directory_size, cs))
    img.writer.bitmaps = None  # stored: nothing left for close()
    for b in removed:
        rc.free_later(b.table_offset, _clusters(b.table_size * 8, cs))
        for c in b.data_clusters:
            rc.free_later(c)
    img.writer.data_written = True
    img.flush()
