"""Resize an image's guest disk (qemu-img resize): grow, or shrink with care.

Growing a qcow2 image only changes the header size and, when the L1 table must
grow, writes a larger L1 elsewhere and switches the header to it
(copy-then-switch, ``WriterMixin.resize``).  When the backing file is longer than
the old size, the new area is zeroed first so that old backing data does not
reappear (as QEMU does since 5.1).

Shrinking cuts the disk: ``WriterMixin.shrink`` drops the mapping of every
cluster past the new end and frees what they held (references first, refcounts
after, the ordinary flush order), then the file is truncated after its last
used cluster.  Without ``shrink=True`` a shrink is refused while data lies past
the new end (anything that would be lost).

Everything that can make the operation fail is checked before the first write.
"""

from __future__ import annotations

import os

from .. import spec
from ..chain import open_image
from ..errors import OperationError

__all__ = ["parse_new_size", "resize"]


def parse_new_size(path: str, text: str, current: int) -> int:
    """``SIZE``, ``+SIZE`` or ``-SIZE`` (relative to ``current``) -> bytes."""
    from ..units import parse_size

    rel = text[:1] if text[:1] in "+-" else ""
    try:
        value = parse_size(text[1:] if rel else text)
    except ValueError:
        raise OperationError(
            path,
            f"invalid size {text!r}: expected [+|-]SIZE, optional suffix k, M, G, T, P or E",
        ) from None
    if rel == "+":
        value = current + value
    elif rel == "-":
        value = current - value
    if value <= 0:
        raise OperationError(path, "new image size must be positive")
    return value


def _data_past(img, new_size: int) -> int | None:
    """First guest offset at or past ``new_size`` holding data (None: only zeros/holes)."""
    if new_size >= img.virtual_size:
        return None
    for ext in img.map(new_size, img.virtual_size - new_size):
        if ext.data:
            return max(ext.start, new_size)
    return None


def _trim_file(img) -> None:
    """Truncate a qcow2 file after its last cluster with a nonzero refcount."""
    from ..hostfile import is_block_device

    if is_block_device(img.hf.fd):
        return
    rc = img.refcounts
    last = rc.end_cluster - 1
    while last > 0 and rc.get(last) == 0:
        last -= 1
    end = (last + 1) << img.cluster_bits
    if end < img.hf.size():
        img.hf.truncate(end)
        img.hf.fsync()
        rc.end_cluster = last + 1
        rc.free_hint = min(rc.free_hint, last + 1)
        img.file_size = end


def resize(
    path: str | os.PathLike,
    size: int | str,
    *,
    shrink: bool = False,
    format: str | None = None,
) -> int:
    """Set the guest disk size of ``path`` to ``size`` (bytes, or ``"+1G"``...).

    Returns the new size.  Refused (``OperationError``, nothing written): a qcow2
    size that is not a multiple of 512, a v2 image with internal snapshots, an
    image with an external data file, a shrink of an image
    with internal snapshots, and a shrink that would cut off data unless
    ``shrink=True``.
    """
    path = os.fspath(path)
    with open_image(path, "r+", format=format) as img:
        current = img.virtual_size
        new_size = parse_new_size(path, size, current) if isinstance(size, str) else size
        if new_size <= 0:
            raise OperationError(path, "new image size must be positive")
        if img.format == "raw":
            if new_size < current:
                _refuse_lossy_shrink(img, new_size, shrink)
            from ..hostfile import is_block_device

            if is_block_device(img.hf.fd):
                raise OperationError(path, "cannot resize a raw block device (resize the device)")
            img.resize(new_size)
            img.flush()
            return new_size
        h = img.header
        if new_size % 512:
            raise OperationError(path, "the new size must be a multiple of 512")
        if new_size > spec.MAX_VIRTUAL_SIZE:
            raise OperationError(path, "virtual size too large (maximum 2^61 bytes)")
        if h.version == 2 and h.nb_snapshots:
            raise OperationError(path, "cannot resize a v2 image which has snapshots")
        if img.has_data_file:
            raise OperationError(path, "cannot resize an image with an external data file")
        if new_size == current:
            return new_size
        if new_size < current:
            if h.nb_snapshots:
                raise OperationError(path, "cannot shrink an image with internal snapshots")
            _refuse_lossy_shrink(img, new_size, shrink)
            img.shrink(new_size)
            # persistent bitmaps shrink with the disk (stored on close, as qemu does)
            for b in img.writer.bitmaps or ():
                if b.bits is not None:
                    b.resize(new_size)
            _trim_file(img)
            return new_size
        from ..header import size_to_l1

        if size_to_l1(new_size, img.cluster_bits, h.l2_entry_size) * 8 > spec.MAX_L1_SIZE_BYTES:
            raise OperationError(path, "virtual size too large: the L1 table would exceed 32 MiB")
        b = img.backing
        img.resize(new_size)
        if b is not None and b.virtual_size > current:
            # the new area must read as zeros, not as the backing file's old data
            img.write_zeroes(current, new_size - current)
        img.flush()
        return new_size


def _refuse_lossy_shrink(img, new_size: int, shrink: bool) -> None:
    if shrink:
        return
    at = _data_past(img, new_size)
    if at is not None:
        raise OperationError(
            img.path,
            f"data lies past the new end (at offset {at}); shrinking would delete it: "
            "use --shrink to cut it off",
        )
