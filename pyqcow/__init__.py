"""pyqcow: a qcow2 image engine in Python."""

from __future__ import annotations

from . import check  # callable: pyqcow.check(path, repair=None) -> CheckResult
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

__version__ = "0.1.0"


def open(path, mode: str = "r", *, force_share: bool = False, backing_root=None, format=None):  # noqa: A001
    """Open an image and its backing chain.  ``mode`` is "r" or "r+"."""
    from .chain import open_image

    return open_image(
        path, mode, force_share=force_share, backing_root=backing_root, format=format
    )


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
    "open",
]
