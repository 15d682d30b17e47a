"""libyal's ``pyqcow`` API (libqcow-python), served by this engine.

libyal's binding of libqcow is also imported as ``pyqcow``; dfvfs, plaso,
dfimagetools and Turbinia open QCOW evidence through it.  This module gives the
same names, signatures and exceptions, written from the binding's documented
behaviour and its tests (not from its code):

* module functions ``get_version``, ``check_file_signature``,
  ``check_file_signature_file_object`` and ``open_file_object`` (re-exported
  by ``pyqcow``; ``pyqcow.open`` stays this package's own, see below);
* the types ``file`` and ``encryption_types``;
* the reading methods of libyal's ``file`` (``read_buffer``,
  ``read_buffer_at_offset``, ``seek_offset``, ``get_offset``, ``get_media_size``,
  ``get_backing_filename``, ``set_parent`` ...) are ``LibyalMethods`` in
  pyqcow/libyal_methods.py (an image-level module), mixed into this package's
  image objects, so that what ``pyqcow.open`` returns also serves code written
  for libyal's module (whose ``open()`` returns a ``file``).

Exceptions as libyal's binding raises them: TypeError for an argument of the
wrong type, ValueError for a bad value (mode, negative size or offset),
OSError (IOError) for anything the file or its state refuses (not open,
already open, a seek before the start, an image that cannot be read).

Unlike libqcow, the engine reads zstd-compressed images, extended L2 entries
and external data files.  Encrypted images are refused (``is_locked`` is
always False for an open file).
"""

from __future__ import annotations

import os

from . import libyal_methods, spec
from .errors import QcowError
from .libyal_methods import _check_int, _io_error

__all__ = [
    "LIBYAL_VERSION",
    "check_file_signature",
    "check_file_signature_file_object",
    "encryption_types",
    "file",
    "get_version",
    "open_file_object",
]

# The libqcow release whose Python API this follows.  Dependency checks (plaso's,
# dfvfs's setup) compare get_version() as a YYYYMMDD string, e.g. >= "20201213".
LIBYAL_VERSION = "20260703"


def get_version() -> str:
    """The libyal-style version (YYYYMMDD) of the API served."""
    return LIBYAL_VERSION


class encryption_types:  # noqa: N801 - libyal's name
    """Encryption methods, as libyal numbers them."""

    NONE = 0
    AES_128_CBC = 1


def _check_path(filename, function: str) -> str:
    if isinstance(filename, os.PathLike):
        filename = os.fspath(filename)
    if isinstance(filename, bytes):
        filename = os.fsdecode(filename)
    if not isinstance(filename, str):
        raise TypeError(f"{function}: unsupported string object type")
    return filename


def _check_mode(mode, function: str) -> None:
    if mode is None:
        return
    if not isinstance(mode, str):
        raise TypeError(f"{function}: argument 'mode' must be str, not {type(mode).__name__}")
    if not mode.startswith("r"):
        raise ValueError(f"{function}: unsupported mode: {mode}")



def check_file_signature(filename) -> bool:
    """True if the file starts with the QCOW signature ("QFI\\xfb")."""
    filename = _check_path(filename, "check_file_signature")
    try:
        with open(filename, "rb") as f:
            return f.read(4) == spec.QCOW_MAGIC_BYTES
    except OSError as e:
        raise OSError(e.errno, f"check_file_signature: unable to open file: {e.strerror}",
                      filename) from None


def check_file_signature_file_object(file_object) -> bool:
    """True if the file-like object starts with the QCOW signature."""
    from .fileobj import check_file_object

    if file_object is None:
        raise TypeError("check_file_signature_file_object: unsupported file object")
    check_file_object(file_object)
    file_object.seek(0, os.SEEK_SET)
    return file_object.read(4) == spec.QCOW_MAGIC_BYTES


def open_file_object(file_object, mode: str = "r") -> file:
    """A libyal ``file`` opened on a file-like object (``read`` and ``seek``)."""
    f = file()
    f.open_file_object(file_object, mode)
    return f


class file:  # noqa: N801 - libyal's type name
    """libyal's ``pyqcow.file``: ``file()``, then ``open(path)`` or ``open_file_object(f)``.

    The image is opened read-only and alone: its backing file is read only
    after ``set_parent`` (as with libyal), through a file the caller opened
    and keeps.  A path is opened with a shared read lock, as QEMU does; a
    file-like object is not locked.
    """

    def __init__(self) -> None:
        self._image = None
        self._password: str | None = None
        self._parent = None

    def _require(self, function: str):
        img = self._image
        if img is None:
            raise OSError(f"{function}: invalid file - missing file IO handle (not open)")
        return img

    # -- open / close --------------------------------------------------------------
    def open(self, filename, mode: str = "r") -> None:
        """Open the QCOW image at ``filename`` (mode "r": read-only)."""
        filename = _check_path(filename, "open")
        _check_mode(mode, "open")
        if self._image is not None:
            raise OSError("open: invalid file - file IO handle already set")
        from .chain import probe_format
        from .image import QcowImage

        try:
            if probe_format(filename) != "qcow2":
                raise QcowError(filename, "not a QCOW image (no QFI\\xfb signature)")
            self._image = QcowImage(filename, "r")
        except QcowError as e:
            raise _io_error(e) from None
        self._bind()

    def open_file_object(self, file_object, mode: str = "r") -> None:
        """Open the QCOW image read through ``file_object`` (``read``, ``seek``)."""
        from .fileobj import FileObjectImage, check_file_object

        _check_mode(mode, "open_file_object")
        check_file_object(file_object)
        if self._image is not None:
            raise OSError("open_file_object: invalid file - file IO handle already set")
        try:
            self._image = FileObjectImage(file_object)
        except QcowError as e:
            raise _io_error(e) from None
        self._bind()

    # While open, the reading methods are the image's own (no extra call per read);
    # the class's methods below answer when the file is not open.
    _BOUND = ("read_buffer", "read_buffer_at_offset", "seek_offset", "get_offset")

    def _bind(self) -> None:
        img = self._image
        for name in self._BOUND:
            setattr(self, name, getattr(img, name))
        self.read, self.seek, self.tell = img.read_buffer, img.seek_offset, img.get_offset

    def _unbind(self) -> None:
        for name in (*self._BOUND, "read", "seek", "tell"):
            self.__dict__.pop(name, None)

    def close(self) -> None:
        """Close the image; a parent set with set_parent stays open."""
        img = self._require("close")
        self._unbind()
        self._image = None
        self._parent = None
        img.close()

    # -- reading (delegated to the image's LibyalMethods) ------------------------------
    def read_buffer(self, size=None) -> bytes:
        if size is not None:
            size = _check_int(size, "size", "read_buffer")
            if size < 0:
                raise ValueError("read_buffer: invalid read size value less than zero")
        return self._require("read_buffer").read_buffer(size)

    def read_buffer_at_offset(self, size, offset) -> bytes:
        size = _check_int(size, "size", "read_buffer_at_offset")
        offset = _check_int(offset, "offset", "read_buffer_at_offset")
        if size < 0:
            raise ValueError("read_buffer_at_offset: invalid read size value less than zero")
        if offset < 0:
            raise ValueError("read_buffer_at_offset: invalid read offset value less than zero")
        return self._require("read_buffer_at_offset").read_buffer_at_offset(size, offset)

    def seek_offset(self, offset, whence=os.SEEK_SET) -> None:
        self._require("seek_offset").seek_offset(offset, whence)

    def get_offset(self) -> int:
        return self._require("get_offset").get_offset()

    read = read_buffer
    seek = seek_offset
    tell = get_offset

    # -- values --------------------------------------------------------------------
    def get_media_size(self) -> int:
        return self._require("get_media_size").get_media_size()

    @property
    def media_size(self) -> int:
        return self.get_media_size()

    def get_backing_filename(self) -> str | None:
        return self._require("get_backing_filename").get_backing_filename()

    @property
    def backing_filename(self) -> str | None:
        return self.get_backing_filename()

    def set_parent(self, parent_file) -> None:
        """Read what this image does not allocate from ``parent_file`` (a ``file``)."""
        if not isinstance(parent_file, file):
            raise TypeError(
                f"set_parent: argument 1 must be pyqcow.file, not {type(parent_file).__name__}"
            )
        img = self._require("set_parent")
        parent = parent_file._require("set_parent")
        img.set_parent(parent)
        self._parent = parent_file  # keep it alive while it is read through

    def is_locked(self) -> bool:
        return False

    def set_password(self, password) -> None:
        if not isinstance(password, str):
            raise TypeError(f"set_password: argument 1 must be str, not {type(password).__name__}")
        self._password = password

    def signal_abort(self) -> None:
        """Nothing runs in the background: reads are synchronous."""

    def __repr__(self) -> str:
        return f"<pyqcow.file {self._image!r}>" if self._image else "<pyqcow.file (not open)>"


# set_parent (an image-level method) accepts a libyal file, not only an image
libyal_methods._FILE_TYPES = (file,)
