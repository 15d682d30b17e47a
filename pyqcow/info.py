"""What ``info`` reports about an image: qemu-img's ImageInfo, as plain data.

``image_info(img)`` is one qemu ImageInfo object (QAPI ``ImageInfo``) for an
open image; ``chain_info(path, ...)`` is that object for ``path`` and, with
``backing_chain=True``, for every image of its backing chain, opened by
:func:`pyqcow.chain.open_image` (the one chain walker: it resolves the names as
qemu does and refuses loops, missing files and too deep chains).  The dicts
have their keys in QAPI declaration order, the order qemu inserts them, so
``pyqcow.cli.output.qemu_json`` renders them byte for byte as
``qemu-img info --output=json`` does.
"""

from __future__ import annotations

import os

from . import spec
from .chain import open_image, resolve_backing
from .errors import QcowError

__all__ = ["chain_info", "full_backing_filename", "image_info", "qcow2_specific"]


def chain_info(
    filename: str, *, fmt: str | None = None, backing_chain: bool = False,
    force_share: bool = False,
) -> list[dict]:
    """qemu-img's ImageInfo dicts for ``filename`` (and, with ``backing_chain``, its
    backing files, top first).  Without ``backing_chain`` the image is opened on its
    own, without its backing file, so an image with a broken chain can be inspected."""
    with open_image(filename, "r", format=fmt, force_share=force_share,
                    backing=backing_chain) as top:
        return [image_info(img, filename if img is top else img.path) for img in top.chain]


def full_backing_filename(image_path: str, backing: str) -> str:
    """The path qemu opens for backing name ``backing`` of ``image_path`` (the name
    itself if it cannot be resolved)."""
    try:
        return resolve_backing(image_path, backing)
    except QcowError:
        return backing


def image_info(img, filename: str | None = None) -> dict:
    """One qemu ImageInfo object; keys inserted in QAPI order (the renderer reorders)."""
    qcow2 = img.format == "qcow2"
    d: dict = {"filename": img.path if filename is None else filename, "format": img.format}
    d["dirty-flag"] = bool(qcow2 and img.header.dirty)
    # qemu 7.2: the image file's own allocation (an external data file is not counted)
    d["actual-size"] = os.stat(img.path).st_blocks * 512
    d["virtual-size"] = img.virtual_size
    if not qcow2:
        return d
    h = img.header
    d["cluster-size"] = img.cluster_size
    if h.backing_file:
        d["backing-filename"] = h.backing_file
        d["full-backing-filename"] = full_backing_filename(img.path, h.backing_file)
        if h.backing_format:
            d["backing-filename-format"] = h.backing_format
    snapshots = []
    if h.nb_snapshots:  # the snapshot code loads only for an image that has some
        from .snapshot_table import read_snapshot_table

        snapshots = read_snapshot_table(img)
    if snapshots:
        d["snapshots"] = [s.as_qemu_json() for s in snapshots]
    d["format-specific"] = {"type": "qcow2", "data": qcow2_specific(img)}
    return d


def qcow2_specific(img) -> dict:
    """ImageInfoSpecificQCow2 (block/qcow2.c qcow2_get_specific_info)."""
    h = img.header
    compression = "zstd" if h.compression_type == spec.CompressionType.ZSTD else "zlib"
    if h.version == 2:
        return {"compat": "0.10", "refcount-bits": h.refcount_bits,
                "compression-type": compression}
    data: dict = {"compat": "1.1"}
    if h.data_file is not None:
        data["data-file"] = h.data_file
    if h.has_data_file:
        data["data-file-raw"] = h.data_file_raw
    data["extended-l2"] = h.extended_l2
    data["lazy-refcounts"] = h.lazy_refcounts
    data["corrupt"] = h.corrupt
    data["refcount-bits"] = h.refcount_bits
    bitmaps = None
    if h.extension(spec.ExtType.BITMAPS) is not None:  # the bitmap code loads only if needed
        from .bitmap_directory import read_bitmap_directory

        bitmaps = read_bitmap_directory(img)
    if bitmaps is not None:
        data["bitmaps"] = [b.as_qemu_json() for b in bitmaps]
    data["compression-type"] = compression
    return data
