"""commit: copy what TOP (and every image above BASE) allocates into BASE.

Crash safety: only BASE is written while copying, and only in ranges that an
image above it overrides, so the chain seen through TOP reads the same guest
data at every instant.  TOP is emptied only after BASE is durable.
"""

from __future__ import annotations

import warnings

from ..record import Record
from . import copier
from .common import dependents, find_layer, open_chain, reopen_rw
from .plan import data_bytes, pieces_above


class CommitResult(Record):
    """top, base (paths), bytes_copied, emptied (whether top was emptied)."""

    __slots__ = ("top", "base", "bytes_copied", "emptied")


def plan_commit(top, base):
    return pieces_above(top, base, 0, top.virtual_size)


def commit(top_path, base=None, *, drop: bool = False, progress=None, _top=None) -> CommitResult:
    """qemu-img commit: merge TOP's data into BASE (its backing unless ``base``)."""
    if base is not None:
        drop = True  # as qemu-img: -b implies -d
    top = _top if _top is not None else open_chain(top_path, "r" if drop else "r+")
    try:
        parent, base_img = find_layer(top, base)
        others = dependents(base_img.path, exclude=tuple(i.path for i in top.chain))
        if others:
            warnings.warn(
                f"{base_img.path}: also the backing file of {', '.join(others)}; "
                "committing changes what they read",
                stacklevel=2,
            )
        base_img = reopen_rw(parent, base_img)
        pieces = plan_commit(top, base_img)
        if top.virtual_size > base_img.virtual_size:
            base_img.resize(top.virtual_size)
        prog = copier.Progress(data_bytes(pieces), progress)
        copied = copier.execute(pieces, base_img, progress=prog)
        base_img.flush()
        emptied = False
        if not drop and parent is top:
            top.make_empty()
            emptied = True
        return CommitResult(top.path, base_img.path, copied, emptied)
    finally:
        if _top is None:
            top.close()
