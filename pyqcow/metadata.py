"""The image's metadata door: the one module that writes a qcow2 header, an active
L1 table or a refcount table.

Today the door's methods live on the image (``QcowImage.switch_header``,
``write_new_clusters``, ``replace_active_l1``, ``write_l1_entry``,
``write_refcount_table``, ``reload`` and the flush path); ``write_new_image``
below lays down the first metadata of a new file (pyqcow.newimage.create).
"""

from __future__ import annotations


def write_new_image(hf, cluster_size: int, cluster0: bytes, reftable: bytes, refblock: bytes) -> None:
    """A new image's metadata, clusters 0-2: header, refcount table, refcount block;
    the file is emptied first and everything is durable on return."""
    hf.truncate(0)
    hf.pwrite(cluster0 + bytes(cluster_size - len(cluster0)), 0)
    hf.pwrite(reftable, cluster_size)
    hf.pwrite(refblock, 2 * cluster_size)
    hf.fsync()
