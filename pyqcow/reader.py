"""GuestReader: a read-only, seekable ``io.RawIOBase`` over a guest disk.

Works over anything with ``virtual_size`` and ``readinto(buf, guest_offset)``:
QcowImage, RawImage and SnapshotView.  It never writes and keeps no state but
its position, so several readers may share one image.  Closing a reader does
not close the image it reads.

Hot loop friendly: ``pread(size, offset)`` (bytes) and ``preadinto(buffer,
offset)`` read at an offset without moving the position, one call per read;
``readinto`` with a reused buffer is the fast way to stream (no allocation per
call).  Over a read-only qcow2 image (standard L2 entries, no external data
file) with the C helper built, these go through ``image.guest_map()``
(pyqcow.guestmap): C resolves the L1/L2 tables and copies from a read-only
mapping of the file (and of a qcow2 backing chain); compressed clusters,
anything malformed and raw backing files come back to the Python path.  A file
that shrinks under the mapping gives QcowError, not SIGBUS.
``PYQCOW_NO_NATIVE=1`` (when the reader is made) keeps everything in Python.
"""

from __future__ import annotations

import io
import operator
import os

__all__ = ["GuestReader"]

_DEFAULT_CHUNK = 4 << 20


def _nonneg(value, what: str) -> int:
    value = operator.index(value)
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


class GuestReader(io.RawIOBase):
    """File-like view of a guest disk (``img.reader()``)."""

    # Slots for the attributes of the hot path: an io subclass keeps the others
    # in an instance dict, whose lookups cost several times more.
    __slots__ = ("_pos", "_size", "_gmap", "_fast")

    def __init__(self, image) -> None:
        super().__init__()
        self.image = image
        self.name = getattr(image, "path", None)
        self.mode = "rb"
        self._size = image.virtual_size
        self._pos = 0
        self._readinto = image.readinto
        self._read = image.read
        # mmap-backed C reads where the image offers them (pyqcow.guestmap.GuestMap)
        guest_map = getattr(image, "guest_map", None)
        self._gmap = guest_map() if guest_map is not None else None
        self._fast = self._gmap.fast if self._gmap is not None else None
        if self._fast is not None:
            # the C methods themselves, in the instance dict: pread/preadinto are
            # then one C call each (close() puts the methods below back)
            self.pread = self._fast.pread
            self.preadinto = self._fast.preadinto

    # -- io.RawIOBase --------------------------------------------------------------
    def readable(self) -> bool:
        self._check_open()
        return True

    def seekable(self) -> bool:
        self._check_open()
        return True

    def writable(self) -> bool:
        self._check_open()
        return False

    @property
    def size(self) -> int:
        """Size of the guest disk in bytes."""
        return self._size

    def __len__(self) -> int:
        return self._size

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == 0 and type(offset) is int and offset >= 0 and not self.closed:
            self._pos = offset  # the common case, kept short for random-read loops
            return offset
        self._check_open()
        offset = offset.__index__()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, b) -> int:
        fast = self._fast  # None once closed (see close)
        if fast is not None:
            n = fast.preadinto(b, self._pos)
            self._pos += n
            return n
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        n = self._preadinto(b, self._pos)
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        fast = self._fast
        if fast is not None:
            data = fast.pread(size, self._pos)
        else:
            data = self.pread(size, self._pos)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        n = max(0, self._size - self._pos)
        buf = bytearray(n)
        mv = memoryview(buf)
        done = 0
        fast = self._fast
        while done < n:
            step = min(_DEFAULT_CHUNK, n - done)
            chunk = mv[done : done + step]
            if fast is not None:
                fast.preadinto(chunk, self._pos + done)
            else:
                self._preadinto(chunk, self._pos + done)
            done += step
        self._pos += n
        return bytes(buf)

    def pread(self, size: int, offset: int) -> bytes:
        """Up to ``size`` guest bytes at ``offset`` (fewer at the end of the
        disk, b"" past it), as os.pread; the position does not move."""
        size, offset = _nonneg(size, "size"), _nonneg(offset, "offset")
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        n = min(size, self._size - offset)
        if n <= 0:
            return b""
        return self._read(offset, n)

    def preadinto(self, b, offset: int) -> int:
        """Fill the writable buffer ``b`` with guest bytes at ``offset``, up to
        the end of the disk; the number of bytes read.  The position does not
        move."""
        offset = _nonneg(offset, "offset")
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        return self._preadinto(b, offset)

    def close(self) -> None:
        self._gmap = self._fast = None
        self.__dict__.pop("pread", None)
        self.__dict__.pop("preadinto", None)
        super().close()

    def truncate(self, size=None):
        raise io.UnsupportedOperation("the guest disk reader is read-only")

    def write(self, b):
        raise io.UnsupportedOperation("the guest disk reader is read-only")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("the guest disk reader has no file descriptor")

    # -- helpers -------------------------------------------------------------------
    def _preadinto(self, b, pos: int) -> int:
        """The Python path of preadinto (and of readinto)."""
        n = self._size - pos
        if n <= 0:
            return 0
        mv = memoryview(b).cast("B")
        if len(mv) < n:
            n = len(mv)
            self._readinto(mv, pos)
        else:
            self._readinto(mv[:n], pos)
        return n

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pos={self._pos}"
        return f"<GuestReader {self.name!r} size={self._size} {state}>"
