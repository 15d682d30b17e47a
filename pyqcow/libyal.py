"""libyal's ``pyqcow`` API (libqcow-python), served by this engine.

libyal's binding of libqcow is also imported as ``pyqcow``; dfvfs, plaso,
dfimagetools and Turbinia open QCOW evidence through it.  This module gives the
same names, signatures and exceptions, written from the binding's documented
behaviour and its tests (not from its code):

* module functions ``get_version``, ``check_file_signature``,
  ``check_file_signature_file_object`` and ``open_file_object`` (re-exported
  by ``pyqcow``; ``pyqcow.open`` stays this package's own, see below);
* the types ``file`` and ``encryption_types``;
* ``LibyalMethods``: the reading methods of libyal's ``file`` (``read_buffer``,
  ``read_buffer_at_offset``, ``seek_offset``, ``get_offset``, ``get_media_size``,
  ``get_backing_filename``, ``set_parent`` ...), mixed into this package's image
  objects, so that what ``pyqcow.open`` returns also serves code written for
  libyal's module (whose ``open()`` returns a ``file``).

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

from . import spec
from .errors import QcowError
from .hostfile import check_range

__all__ = [
    "LIBYAL_VERSION",
    "LibyalMethods",
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


def _check_int(value, name: str, function: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            return value.__index__()
        except AttributeError:
            raise TypeError(f"{function}: unsupported integer object type ({name})") from None
    return value


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


def _bytes_filler():
    """fill(n, into) -> bytes: a new bytes object of n bytes that into(view) fills.

    libyal's C binding allocates the result with PyBytes_FromStringAndSize(NULL, n)
    and reads into it; doing the same here (CPython) spares a large read the
    bytearray's page faults and the copy into bytes.  Elsewhere: bytearray + copy.
    """
    try:
        import ctypes

        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        new.restype = ctypes.py_object
        new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        header = __import__("sys").getsizeof(b"") - 1  # offset of ob_sval
        probe = new(None, 3)
        view = memoryview((ctypes.c_char * 3).from_address(id(probe) + header)).cast("B")
        view[:] = b"abc"
        view.release()
        if probe != b"abc":
            raise RuntimeError("unexpected bytes layout")
    except Exception:  # not CPython, or not its layout

        def fill(n: int, into) -> bytes:
            buf = bytearray(n)
            into(buf)
            return bytes(buf)

        return fill

    c_char = ctypes.c_char

    def fill(n: int, into) -> bytes:
        out = new(None, n)  # nobody else holds it until it is returned
        view = memoryview((c_char * n).from_address(id(out) + header)).cast("B")
        try:
            into(view)
        finally:
            view.release()
        return out

    return fill


def _fill_bytes(n: int, into) -> bytes:
    """The first call builds the filler (ctypes loads on first use: start-up time)
    and puts it in this name's place."""
    global _fill_bytes
    _fill_bytes = _bytes_filler()
    return _fill_bytes(n, into)


# pyqcow.image._UNALLOCATED: what QcowImage._single_cluster_host answers for a range
# inside one unallocated cluster (tests/interop/test_libyal_api.py checks the value)
_UNALLOCATED = -2


def _io_error(e: QcowError) -> OSError:
    return OSError(f"pyqcow: {e}")


class _BorrowedLayer:
    """A parent set with ``set_parent``: read through, never closed by the child."""

    def __init__(self, image) -> None:
        self.__dict__["_image"] = image
        self.__dict__["readinto"] = image.readinto
        self.__dict__["read"] = image.read

    def __getattr__(self, name):
        return getattr(self._image, name)

    def close(self) -> None:
        """The parent belongs to whoever set it."""


class LibyalMethods:
    """libyal's ``file`` reading methods for pyqcow's image objects.

    The libyal offset is kept per image object (``_libyal_offset``); pyqcow's
    own ``read(offset, length)`` does not use or move it.  An image's own
    ``read(size)`` with one argument (or none) is libyal's ``read``.
    """

    _libyal_offset = 0
    _single_cluster_host = None  # QcowImage's own (the read fast path) overrides it

    # -- state ------------------------------------------------------------------
    def _libyal_check_open(self, function: str) -> None:
        closed = getattr(self, "_closed", None)
        if closed is None:
            closed = self.hf.fd < 0
        if closed:
            raise OSError(f"{function}: invalid file - missing file IO handle (not open)")

    # -- reading -----------------------------------------------------------------
    def read_buffer(self, size=None) -> bytes:
        """Read ``size`` bytes (None: up to the end) at the current offset."""
        self._libyal_check_open("read_buffer")
        pos = self._libyal_offset
        remaining = max(0, self.virtual_size - pos)
        if size is None:
            size = remaining
        else:
            size = _check_int(size, "size", "read_buffer")
            if size < 0:
                raise ValueError("read_buffer: invalid read size value less than zero")
        n = min(size, remaining)
        if n <= 0:
            return b""
        data = self._libyal_read(pos, n)
        self._libyal_offset = pos + n
        return data

    def read_buffer_at_offset(self, size, offset) -> bytes:
        """Read ``size`` bytes at ``offset``; the current offset moves past them."""
        if (type(size) is int and type(offset) is int and size >= 0 and offset >= 0
                and self.hf.fd >= 0):
            # fast path: an open image on a file (the checks below, in one test)
            n = self.virtual_size - offset
            if size < n:
                n = size
            if n > 0:
                self._libyal_offset = offset + n
                single = self._single_cluster_host
                if single is not None and n <= 65536:
                    # inside one cluster: its data straight from the file, or the
                    # backing image's bytes when the cluster is unallocated
                    host = single(offset, n, self.l1)
                    if host >= 0:
                        data = os.pread(self.hf.fd, n, host)
                        if len(data) == n:
                            return data
                    elif host == _UNALLOCATED:
                        b = self.backing
                        if b is not None and offset + n <= b.virtual_size:
                            try:
                                return b.read(offset, n)
                            except QcowError as e:
                                raise _io_error(e) from None
                return self._libyal_read(offset, n)
        size = _check_int(size, "size", "read_buffer_at_offset")
        offset = _check_int(offset, "offset", "read_buffer_at_offset")
        if size < 0:
            raise ValueError("read_buffer_at_offset: invalid read size value less than zero")
        if offset < 0:
            raise ValueError("read_buffer_at_offset: invalid read offset value less than zero")
        self._libyal_check_open("read_buffer_at_offset")
        n = min(size, self.virtual_size - offset)
        if n <= 0:
            self._libyal_offset = offset
            return b""
        data = self._libyal_read(offset, n)
        self._libyal_offset = offset + n
        return data

    def _libyal_read(self, offset: int, length: int) -> bytes:
        try:
            if length <= 65536:
                return self.read(offset, length)
            check_range(self.path, offset, length, self.virtual_size)
            return _fill_bytes(length, lambda view: self.readinto(view, offset))
        except QcowError as e:
            raise _io_error(e) from None

    def seek_offset(self, offset, whence=os.SEEK_SET) -> None:
        """Move the current offset (whence: os.SEEK_SET, SEEK_CUR or SEEK_END)."""
        offset = _check_int(offset, "offset", "seek_offset")
        whence = _check_int(whence, "whence", "seek_offset")
        self._libyal_check_open("seek_offset")
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._libyal_offset + offset
        elif whence == os.SEEK_END:
            pos = self.virtual_size + offset
        else:
            raise OSError(f"seek_offset: unsupported whence: {whence}")
        if pos < 0:
            raise OSError(f"seek_offset: invalid offset value {pos} out of bounds")
        self._libyal_offset = pos

    def get_offset(self) -> int:
        """The current offset."""
        self._libyal_check_open("get_offset")
        return self._libyal_offset

    def seek(self, offset, whence=os.SEEK_SET) -> None:
        """Alias of ``seek_offset`` (libyal)."""
        self.seek_offset(offset, whence)

    def tell(self) -> int:
        """Alias of ``get_offset`` (libyal)."""
        return self.get_offset()

    # -- values ------------------------------------------------------------------
    def get_media_size(self) -> int:
        """The size of the guest disk in bytes."""
        self._libyal_check_open("get_media_size")
        return self.virtual_size

    @property
    def media_size(self) -> int:
        return self.get_media_size()

    def get_backing_filename(self) -> str | None:
        """The backing file name stored in the header (None: no backing file)."""
        self._libyal_check_open("get_backing_filename")
        header = getattr(self, "header", None)
        name = getattr(header, "backing_file", None) if header is not None else None
        return name or None

    @property
    def backing_filename(self) -> str | None:
        return self.get_backing_filename()

    def set_parent(self, parent_file) -> None:
        """Read unallocated clusters from ``parent_file`` (not owned: not closed with this).

        ``parent_file`` is a ``pyqcow.file`` or one of pyqcow's image objects.
        A backing chain this image opened itself is closed and replaced.
        """
        if isinstance(parent_file, file):
            parent = parent_file._require("set_parent")
        elif isinstance(parent_file, LibyalMethods):
            parent = parent_file
        else:
            raise TypeError("set_parent: argument 1 must be pyqcow.file, not "
                            f"{type(parent_file).__name__}")
        self._libyal_check_open("set_parent")
        parent._libyal_check_open("set_parent")
        if parent is self:
            raise OSError("set_parent: a file cannot be its own parent")
        old = getattr(self, "backing", None)
        if old is not None and not isinstance(old, _BorrowedLayer):
            old.close()
        self.backing = _BorrowedLayer(parent)

    def is_locked(self) -> bool:
        """True if the image is encrypted and not unlocked (pyqcow refuses those)."""
        return False

    def set_password(self, password) -> None:
        """Accepted for compatibility; encrypted images are not supported."""
        if not isinstance(password, str):
            raise TypeError(f"set_password: argument 1 must be str, not {type(password).__name__}")
        self._libyal_password = password

    def signal_abort(self) -> None:
        """Nothing runs in the background: reads are synchronous."""


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
