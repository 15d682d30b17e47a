"""GuestReader: a read-only, seekable ``io.RawIOBase`` over a guest disk.

Works over anything with ``virtual_size`` and ``readinto(buf, guest_offset)``:
QcowImage, RawImage and SnapshotView.  It never writes and keeps no state but
its position, so several readers may share one image.  Closing a reader does
not close the image it reads.

Hot loop friendly: ``readinto`` with a reused buffer is the fast way to stream
(no allocation per call).  Over a read-only qcow2 image (standard L2 entries,
no external data file) with the C helper built, ``readinto``/``read`` go
through ``image.guest_map()``: C resolves the L1/L2 tables and copies from a
read-only mapping of the file (and of a qcow2 backing chain); compressed
clusters, anything malformed and raw backing files come back to the Python
path.  A file that shrinks under the mapping gives QcowError, not SIGBUS.
``PYQCOW_NO_NATIVE=1`` (when the reader is made) keeps everything in Python.
"""

from __future__ import annotations

import errno
import io
import os

from .errors import QcowError

__all__ = ["GuestReader"]

_DEFAULT_CHUNK = 4 << 20


class GuestReader(io.RawIOBase):
    """File-like view of a guest disk (``img.reader()``)."""

    # Slots for the attributes of the hot path: an io subclass keeps the others
    # in an instance dict, whose lookups cost several times more.
    __slots__ = ("_pos", "_size", "_gmap")

    def __init__(self, image) -> None:
        super().__init__()
        self.image = image
        self.name = getattr(image, "path", None)
        self.mode = "rb"
        self._size = image.virtual_size
        self._pos = 0
        self._readinto = image.readinto
        self._read = image.read
        # mmap-backed C reads where the image offers them (pyqcow.fastcopy.GuestMap)
        guest_map = getattr(image, "guest_map", None)
        self._gmap = guest_map() if guest_map is not None else None

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
        gm = self._gmap  # None once closed (see close)
        if gm is not None:
            ctx = gm.ctx  # None once the image closed its map
            pos = self._pos
            n = self._size - pos
            if ctx is not None and n > 0:
                try:
                    pointer = gm.from_buffer("char[]", b, True)
                except (TypeError, ValueError, BufferError):
                    pointer = None  # not a writable contiguous buffer: the path below says why
                if pointer is not None:
                    size = len(pointer)
                    if size < n:
                        n = size
                    rc = gm.read(ctx, pointer, n, pos)
                    if rc == 0:
                        self._pos = pos + n
                        return n
                    if rc < 0:
                        self._map_failed(rc)
                    # rc 1: read the range in Python (compressed, malformed, ...)
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        pos = self._pos
        n = self._size - pos
        if n <= 0:
            return 0
        mv = memoryview(b).cast("B")
        if len(mv) < n:
            n = len(mv)
            self._readinto(mv, pos)
        else:
            self._readinto(mv[:n], pos)
        self._pos = pos + n
        return n

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if size is None or size < 0:
            return self.readall()
        pos = self._pos
        n = min(size, self._size - pos)
        if n <= 0:
            return b""
        gm = self._gmap
        if gm is not None and gm.ctx is not None:
            buf = bytearray(n)
            if self._map_readinto(gm, buf, pos):
                self._pos = pos + n
                return bytes(buf)
        data = self._read(pos, n)
        self._pos = pos + n
        return data

    def readall(self) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        n = max(0, self._size - self._pos)
        buf = bytearray(n)
        mv = memoryview(buf)
        done = 0
        gm = self._gmap
        while done < n:
            step = min(_DEFAULT_CHUNK, n - done)
            chunk = mv[done : done + step]
            if gm is None or not self._map_readinto(gm, chunk, self._pos + done):
                self._readinto(chunk, self._pos + done)
            done += step
        self._pos += n
        return bytes(buf)

    def close(self) -> None:
        self._gmap = None
        super().close()

    def truncate(self, size=None):
        raise io.UnsupportedOperation("the guest disk reader is read-only")

    def write(self, b):
        raise io.UnsupportedOperation("the guest disk reader is read-only")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("the guest disk reader has no file descriptor")

    # -- helpers -------------------------------------------------------------------
    def _map_readinto(self, gm, buf, pos: int) -> bool:
        """Fill all of ``buf`` (writable bytes) from guest offset ``pos`` through
        the mapping; False: read it another way."""
        ctx = gm.ctx
        if ctx is None:
            return False
        rc = gm.read(ctx, gm.from_buffer("char[]", buf, True), len(buf), pos)
        if rc < 0:
            self._map_failed(rc)
        return rc == 0

    def _map_failed(self, rc: int) -> None:
        """Raise for a negative pyqcow_map_read result."""
        check = getattr(self.image, "check_not_shrunk", None)
        if rc == -errno.EFAULT and check is not None:
            check()  # QcowError: the file shrank under the mapping
        raise QcowError(self.name, f"read failed: {os.strerror(-rc)}")

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pos={self._pos}"
        return f"<GuestReader {self.name!r} size={self._size} {state}>"
