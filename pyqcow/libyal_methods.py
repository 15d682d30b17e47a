"""libyal's reading methods of ``pyqcow.file``, mixed into pyqcow's image objects.

``LibyalMethods`` gives QcowImage, RawImage and FileObjectImage libyal's
``read_buffer``, ``read_buffer_at_offset``, ``seek_offset``, ``get_offset``,
``get_media_size``, ``get_backing_filename``, ``set_parent`` ..., so that what
``pyqcow.open`` returns also serves code written for libyal's module.  This is
an image-level module: it imports nothing that opens images.  libyal's module
API (``file``, ``check_file_signature``, ``open_file_object``), which does,
lives above the chain in pyqcow/libyal.py and registers its ``file`` type in
``_FILE_TYPES`` so that ``set_parent`` accepts it.
"""

from __future__ import annotations

import os

from .errors import QcowError
from .hostfile import check_range

__all__ = ["LibyalMethods"]

#: libyal ``file`` types set_parent accepts (pyqcow.libyal.file registers itself;
#: there is no instance of it before that module is imported)
_FILE_TYPES: tuple[type, ...] = ()


def _check_int(value, name: str, function: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            return value.__index__()
        except AttributeError:
            raise TypeError(f"{function}: unsupported integer object type ({name})") from None
    return value


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

        ``parent_file`` is a ``pyqcow.file`` (a type in ``_FILE_TYPES``) or one of
        pyqcow's image objects.
        A backing chain this image opened itself is closed and replaced.
        """
        if _FILE_TYPES and isinstance(parent_file, _FILE_TYPES):
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
