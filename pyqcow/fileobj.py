"""Images read through a Python file-like object instead of a file descriptor.

dfvfs (and through it plaso) hands libyal's ``pyqcow`` its own file-like objects:
something with ``read`` and ``seek`` (and ``get_size``, or ``seek(0, 2)`` +
``tell`` for the size), that may have no file descriptor at all.
``FileObjectHost`` gives such an object the host-file interface the read engine
uses (``size``, ``pread``, ``preadinto``), and
``FileObjectImage`` is a read-only ``QcowImage`` over one.

A file-object host takes no locks (there is no file to lock) and is never
written.  Reads are ``seek`` + ``read`` pairs under a lock, so one image may be
read from several threads; the object's own position is left wherever the
last read put it (as libyal's binding does).
"""

from __future__ import annotations

import os
import threading

from .errors import QcowError
from .image import _DATA, QcowImage

__all__ = ["FileObjectHost", "FileObjectImage", "check_file_object"]


def check_file_object(file_object, what: str = "file object") -> None:
    """TypeError unless ``file_object`` has the ``read`` and ``seek`` methods we use."""
    for attr in ("read", "seek"):
        if not callable(getattr(file_object, attr, None)):
            raise TypeError(f"unsupported {what} - missing {attr} attribute")


class FileObjectHost:
    """The host-file interface of pyqcow.hostfile.HostFile over a file-like object."""

    fd = -1  # no descriptor: FileObjectImage never takes the os.preadv fast path
    writable = False

    def __init__(self, file_object, name: str | None = None) -> None:
        check_file_object(file_object)
        self.file_object = file_object
        if name is None:
            n = getattr(file_object, "name", None)
            name = os.fsdecode(n) if isinstance(n, (str, bytes)) else "<file object>"
        self.path = name
        self._lock = threading.Lock()
        self._size = self._measure()

    def _measure(self) -> int:
        f = self.file_object
        try:
            get_size = getattr(f, "get_size", None)
            if callable(get_size):
                return int(get_size())
            with self._lock:
                f.seek(0, os.SEEK_END)
                return int(f.tell())
        except (OSError, ValueError, AttributeError) as e:
            raise QcowError(self.path, f"cannot determine the size of the file object: {e}") from e

    # -- positional I/O -----------------------------------------------------------
    def size(self) -> int:
        return self._size

    def _read_at(self, length: int, offset: int) -> bytes:
        f = self.file_object
        chunks = []
        got = 0
        with self._lock:
            try:
                f.seek(offset, os.SEEK_SET)
                while got < length:
                    data = f.read(length - got)
                    if not data:
                        break
                    chunks.append(data)
                    got += len(data)
            except (OSError, ValueError) as e:
                raise QcowError(
                    self.path, f"cannot read {length} bytes at offset {offset:#x}: {e}"
                ) from e
        if got < length:
            chunks.append(bytes(length - got))  # past the end of the file: zeros
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def pread(self, length: int, offset: int) -> bytes:
        """Exactly ``length`` bytes; bytes past the end of the object read as zeros."""
        if length <= 0:
            return b""
        return self._read_at(length, offset)

    def preadinto(self, buf, offset: int) -> None:
        mv = memoryview(buf).cast("B")
        if len(mv):
            mv[:] = self._read_at(len(mv), offset)

    def data_extents(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        return [(start, end - start, True)] if end > start else []

    # -- no locks, no writes ---------------------------------------------------------
    def lock(self, profile) -> None:
        """File-like objects cannot be locked: nothing to do."""

    def unlock(self) -> None:
        pass

    def fsync(self) -> None:
        pass

    def close(self) -> None:
        """The caller owns the file object: it stays open."""


class FileObjectImage(QcowImage):
    """A read-only qcow2 image read through a FileObjectHost (no backing opened)."""

    def __init__(self, file_object, *, name: str | None = None) -> None:
        host = file_object if isinstance(file_object, FileObjectHost) else FileObjectHost(
            file_object, name
        )
        super().__init__(host.path, "r", force_share=True, _host=host)

    # The engine reads plain data clusters with os.preadv on the host's descriptor;
    # a file object has none, so route those reads through the host's preadinto.
    def _single_cluster_host(self, offset: int, length: int, l1) -> int:
        host = super()._single_cluster_host(offset, length, l1)
        return -1 if host >= 0 else host

    def _flush_pending(self, mv, offset, kind, d, h, n) -> None:
        if kind == _DATA and self.data_hf.fd < 0:
            self.data_hf.preadinto(mv[d : d + n], h)
            return
        super()._flush_pending(mv, offset, kind, d, h, n)

    def __repr__(self) -> str:
        return f"<FileObjectImage {self.path!r} v{self.header.version} size={self.virtual_size}>"
