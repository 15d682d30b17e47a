"""Exception hierarchy.  Every message names the file it is about."""

from __future__ import annotations

import os


class QcowError(Exception):
    """Root of every error pyqcow raises on purpose."""

    def __init__(self, path: str | os.PathLike | None, message: str) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class FormatError(QcowError):
    """The file is not a valid image of the expected format."""


class UnsupportedFeatureError(QcowError):
    """The image uses a feature pyqcow refuses to handle (encryption, unknown bits)."""


class CorruptImageError(QcowError):
    """Metadata is inconsistent (a broken invariant was detected)."""


class BackingChainError(QcowError):
    """The backing chain is broken: missing file, loop, too deep, bad base."""


class ImageLockedError(QcowError):
    """Another process (qemu, qemu-io, pyqcow) holds a conflicting image lock."""


class DomainXMLError(QcowError):
    """The libvirt domain XML cannot be read or does not match the request."""


class OperationError(QcowError):
    """A request that cannot be carried out (bad argument, out of range)."""


# Short aliases named in DESIGN.md section 6.
UnsupportedFeature = UnsupportedFeatureError
ImageLocked = ImageLockedError
ChainError = BackingChainError
