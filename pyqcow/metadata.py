"""The image's metadata door: the one module that writes a qcow2 header, an active
L1 table or a refcount table.

Today the door's methods live on the image (``QcowImage.switch_header``,
``write_new_clusters``, ``replace_active_l1``, ``write_l1_entry``,
``write_refcount_table``, ``reload`` and the flush path); ``write_new_image``
below lays down the first metadata of a new file (pyqcow.newimage.create).
"""

from __future__ import annotations

from .entries import RefcountBlock
from .errors import FormatError, OperationError
from .header import Header, build_cluster0


def write_new_image(hf, cluster_size: int, cluster0: bytes, reftable: bytes, refblock: bytes) -> None:
    """A new image's metadata, clusters 0-2: header, refcount table, refcount block;
    the file is emptied first and everything is durable on return."""
    hf.truncate(0)
    hf.pwrite(cluster0 + bytes(cluster_size - len(cluster0)), 0)
    hf.pwrite(reftable, cluster_size)
    hf.pwrite(refblock, 2 * cluster_size)
    hf.fsync()


def first_metadata(path: str, hdr: Header) -> tuple[bytes, bytes, bytes]:
    """(cluster 0: the header, cluster 1: the refcount table, cluster 2: the refcount
    block describing clusters 0..2) of a new image."""
    try:
        cluster0 = build_cluster0(hdr)
    except FormatError as e:
        raise OperationError(path, e.message) from None
    cluster_size = hdr.cluster_size
    reftable = (2 * cluster_size).to_bytes(8, "big") + bytes(cluster_size - 8)
    blk = RefcountBlock(bytes(cluster_size), hdr.refcount_order)
    for c in range(3):
        blk.set(c, 1)
    return cluster0, reftable, blk.tobytes()
