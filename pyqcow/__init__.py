"""pyqcow: a qcow2 image engine in Python."""

from __future__ import annotations

import os

from ._version import __version__  # noqa: F401 (public)
from .errors import (
    BackingChainError,
    ChainError,
    CorruptImageError,
    DomainXMLError,
    FormatError,
    ImageLocked,
    ImageLockedError,
    OperationError,
    QcowError,
    UnsupportedFeature,
    UnsupportedFeatureError,
)

#: libyal's pyqcow API (libqcow-python, for dfvfs and plaso): see pyqcow/libyal.py.
#: Loaded on first use (PEP 562), not by every `pyqcow` command (start-up time).
_LIBYAL = ("check_file_signature", "check_file_signature_file_object", "encryption_types",
           "file", "get_version", "open_file_object")


def __getattr__(name: str):
    if name in _LIBYAL:
        from . import libyal

        value = getattr(libyal, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LIBYAL))


def open(path, mode: str = "r", *, force_share: bool = False, backing_root=None, format=None):
    """Open an image and its backing chain.  ``mode`` is "r" or "r+".

    ``path`` may also be a file-like object (``read`` and ``seek``): the qcow2
    image in it is opened read-only, alone (join a backing image with
    ``set_parent``), without locks (pyqcow/fileobj.py).
    """
    from .chain import open_image

    if not isinstance(path, (str, bytes, os.PathLike)) and callable(
        getattr(path, "read", None)
    ) and callable(getattr(path, "seek", None)):
        if mode != "r":
            raise ValueError("a file-like object is opened read-only: mode must be 'r'")
        from .fileobj import FileObjectImage

        return FileObjectImage(path)

    return open_image(
        path, mode, force_share=force_share, backing_root=backing_root, format=format
    )


def create(path, size=None, **options):
    """Create a qcow2 image (``qemu-img create``); see :func:`pyqcow.newimage.create`.
    Returns the probed backing format if it had to probe."""
    from .newimage import create as _create

    return _create(path, size, **options)


def check(path_or_img, repair=None, **kw):
    """Check (and with ``repair`` "leaks" or "all", repair) a qcow2 image like
    ``qemu-img check``; returns a CheckResult (pyqcow/ops/check.py)."""
    from .ops.check import check as _check

    return _check(path_or_img, repair, **kw)


def commit(top, base=None, *, drop: bool = False, progress=None):
    """Copy what TOP (and every image above BASE) allocates into BASE."""
    from .ops.commit import commit as _commit

    return _commit(top, base, drop=drop, progress=progress)


def stream(top, base=None, *, progress=None):
    """Pull backing data into TOP; afterwards TOP's backing is BASE (or none)."""
    from .ops.stream import stream as _stream

    return _stream(top, base, progress=progress)


def rebase(path, backing, *, backing_format=None, unsafe: bool = False, progress=None):
    """Change PATH's backing file; safe mode keeps the guest content."""
    from .ops.rebase import rebase as _rebase

    return _rebase(path, backing, backing_format=backing_format, unsafe=unsafe, progress=progress)


def merge(top, *, keep: str = "base", via: str = "auto", dry_run: bool = False, progress=None,
          force: bool = False):
    """Merge TOP and its backing into one image at the kept name; returns the MergePlan."""
    from .ops.merge import merge as _merge

    return _merge(top, keep=keep, via=via, dry_run=dry_run, progress=progress, force=force)


__all__ = [
    "BackingChainError",
    "ChainError",
    "CorruptImageError",
    "DomainXMLError",
    "FormatError",
    "ImageLocked",
    "ImageLockedError",
    "OperationError",
    "QcowError",
    "UnsupportedFeature",
    "UnsupportedFeatureError",
    "check",
    "check_file_signature",
    "check_file_signature_file_object",
    "commit",
    "create",
    "encryption_types",
    "file",
    "get_version",
    "merge",
    "open",
    "open_file_object",
    "rebase",
    "stream",
]
