"""Internal snapshots by path or open image: ``pyqcow snapshot`` and the library API.

Each function takes an open image or a path; a path is opened for the call
(read-write for create/apply/delete, read-only for list) and closed after.
The work itself is pyqcow/snapshot.py (on an open image) and the table format
pyqcow/snapshot_table.py.
"""

from __future__ import annotations

import contextlib
import os

from .. import snapshot as _image_level
from ..snapshot_table import SnapshotExistsError, SnapshotInfo, SnapshotNotFoundError

__all__ = [
    "SnapshotExistsError",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "apply_snapshot",
    "create_snapshot",
    "delete_snapshot",
    "list_snapshots",
    "snapshot",
]


@contextlib.contextmanager
def _opened(img, mode: str, force_share: bool = False):
    """``img`` itself, or a QcowImage opened in ``mode`` on a path (closed after)."""
    if not isinstance(img, str | bytes | os.PathLike):
        yield img
        return
    from ..image import QcowImage

    opened = QcowImage(os.fsdecode(img), mode, force_share=force_share)
    try:
        yield opened
    finally:
        opened.close()


def list_snapshots(img, *, force_share: bool = False) -> list[SnapshotInfo]:
    """The snapshot table of ``img`` (an open image or a path; ``force_share``: open
    the path even if another process has it open)."""
    with _opened(img, "r", force_share) as img:
        return _image_level.list_snapshots(img)


def create_snapshot(img, name: str, *, date=None, vm_clock_nsec: int = 0) -> SnapshotInfo:
    """Take internal snapshot ``name`` of ``img`` (an open image or a path); see
    :func:`pyqcow.snapshot.create_snapshot`."""
    with _opened(img, "r+") as img:
        return _image_level.create_snapshot(img, name, date=date, vm_clock_nsec=vm_clock_nsec)


def apply_snapshot(img, name_or_id: str) -> SnapshotInfo:
    """Revert ``img`` (an open image or a path) to snapshot ``name_or_id``."""
    with _opened(img, "r+") as img:
        return _image_level.apply_snapshot(img, name_or_id)


def delete_snapshot(img, name_or_id: str) -> SnapshotInfo:
    """Delete snapshot ``name_or_id`` of ``img`` (an open image or a path)."""
    with _opened(img, "r+") as img:
        return _image_level.delete_snapshot(img, name_or_id)


def snapshot(path, op: str, name: str | None = None):
    """Convenience: ``op`` is "list"/"l", "create"/"c", "apply"/"a" or "delete"/"d"."""
    op = op.lstrip("-")
    if op in ("l", "list"):
        return list_snapshots(path)
    if name is None:
        raise ValueError(f"snapshot operation {op!r} needs a name")
    if op in ("c", "create"):
        return create_snapshot(path, name)
    if op in ("a", "apply"):
        return apply_snapshot(path, name)
    if op in ("d", "delete"):
        return delete_snapshot(path, name)
    raise ValueError(f"unknown snapshot operation {op!r}")
