"""mmap-backed guest reads of read-only qcow2 images (``GuestMap``).

C does the work (``pyqcow_map_*`` in csrc/pyqcow_copy.c, reached through
pyqcow.fastcopy's handle on ``pyqcow._native``): it maps the image file
read-only, resolves guest offsets through a copy of the L1 table and the L2
tables in the mapping, and copies data clusters, zeros and (through the map of
a qcow2 backing file) unallocated ranges into the caller's buffer.  Compressed
clusters, anything malformed and raw backing files come back to Python.  A
file that shrinks under the mapping raises SIGBUS inside the copy; C catches it
(sigsetjmp) and returns -EFAULT, which the owner turns into a QcowError.

The per-call path is ``GuestMap.fast``: a ``pyqcow._mapread.Reader`` (a small
CPython extension, csrc/pyqcow_mapread.c) whose ``pread(size, offset)`` and
``preadinto(buffer, offset)`` are one C call each, argument checks, the bytes
allocation or buffer export included; without that extension the same two
methods go through cffi (``_CffiReader``), at about half the rate.
"""

from __future__ import annotations

import importlib
import operator
import weakref
from types import ModuleType
from typing import Any

from .fastcopy import _byte_view, _check, _check_fd, _check_int, _native_for_call

__all__ = ["GuestMap", "map_image"]

_INT64_MAX = (1 << 63) - 1

_mapread: ModuleType | None = None
_mapread_tried = False


def _load_mapread() -> ModuleType | None:
    """pyqcow._mapread, or None when it was not built (optional in setup.py)."""
    global _mapread, _mapread_tried
    if not _mapread_tried:
        _mapread_tried = True
        try:
            _mapread = importlib.import_module("pyqcow._mapread")
        except ImportError:
            _mapread = None
    return _mapread


class GuestMap:
    """A read-only mapping of one qcow2 image, resolved in C (``pyqcow_map_*``).

    ``readinto(buf, offset)`` returns True when the C helper filled ``buf``
    with the guest bytes at ``offset``, False when the caller must read the
    range itself (compressed clusters, anything malformed, a backing file that
    is not mapped); OSError(EFAULT) when the file shrank under the mapping.
    ``fast`` is the per-call reader (``pread``/``preadinto``, see the module
    docstring); None when the map was made without an owner.  ``close()``
    unmaps; maps stacked on this one (its overlays) are closed first, so no
    handle outlives its backing.
    """

    __slots__ = ("ctx", "read", "from_buffer", "fast", "_lib", "_dependents", "__weakref__")

    def __init__(self, native: Any, ctx: Any) -> None:
        self.ctx = ctx
        self._lib = native.lib
        self.read = native.lib.pyqcow_map_read
        self.from_buffer = native.ffi.from_buffer
        self.fast: Any = None
        self._dependents: list[GuestMap] = []

    def readinto(self, buf: Any, offset: int) -> bool:
        ctx = self.ctx
        if ctx is None:
            return False
        offset = _check_int(offset, "offset")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        with _byte_view(buf) as view:
            if view.readonly:
                raise TypeError("readinto needs a writable buffer")
            with self.from_buffer("char[]", view, True) as pointer:
                rc = self.read(ctx, pointer, len(view), offset)
        return _check(rc) == 0

    def close(self) -> None:
        for dependent in self._dependents:
            dependent.close()
        self._dependents.clear()
        if self.fast is not None:
            self.fast.close()  # before the unmap: no read can reach the old handle
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            self._lib.pyqcow_map_close(ctx)


class _CffiReader:
    """``pyqcow._mapread.Reader`` through cffi, for when it was not built."""

    __slots__ = ("ctx", "size", "_read", "_from_buffer", "_fallback", "_on_error")

    def __init__(self, gm: GuestMap, size: int, fallback_into, on_error) -> None:
        self.ctx = gm.ctx
        self.size = size
        self._read = gm.read
        self._from_buffer = gm.from_buffer
        self._fallback = fallback_into
        self._on_error = on_error

    @property
    def closed(self) -> bool:
        return self.ctx is None

    def close(self) -> None:
        self.ctx = None

    def _fill(self, buf: Any, pointer: Any, n: int, offset: int) -> None:
        ctx = self.ctx
        rc = 1 if ctx is None else self._read(ctx, pointer, n, offset)
        if rc < 0:
            self._on_error(rc)
            raise OSError(-rc, "guest read failed")
        if rc:
            self._fallback(buf, n, offset)

    def pread(self, size: int, offset: int) -> bytes:
        size, offset = _nonneg(size, "size"), _nonneg(offset, "offset")
        n = min(size, self.size - offset)
        if n <= 0:
            return b""
        buf = bytearray(n)
        self._fill(buf, self._from_buffer("char[]", buf, True), n, offset)
        return bytes(buf)

    def preadinto(self, buf: Any, offset: int) -> int:
        offset = _nonneg(offset, "offset")
        try:
            pointer = self._from_buffer("char[]", buf, True)
        except (TypeError, ValueError, BufferError):
            pointer = None  # not a writable contiguous buffer: the fallback says why
        size = len(pointer) if pointer is not None else memoryview(buf).nbytes
        n = min(size, self.size - offset)
        if n <= 0:
            return 0
        if pointer is None:
            self._fallback(buf, n, offset)
        else:
            self._fill(buf, pointer, n, offset)
        return n


def _nonneg(value: Any, what: str) -> int:
    value = operator.index(value)
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def _owner_callbacks(owner: Any) -> tuple[Any, Any]:
    """fallback_into(buf, n, offset) and on_error(rc) calling the owner's
    ``_map_fallback_into`` and ``_map_error`` through a weak reference (the
    owner holds the map: no reference cycle)."""
    ref = weakref.ref(owner)

    def fallback_into(buf: Any, n: int, offset: int) -> None:
        obj = ref()
        if obj is None:
            raise ValueError("I/O operation on closed file.")
        obj._map_fallback_into(buf, n, offset)

    def on_error(rc: int) -> None:
        obj = ref()
        if obj is not None:
            obj._map_error(rc)
        raise OSError(-rc, "guest read failed")

    return fallback_into, on_error


def map_image(
    fd: int,
    file_size: int,
    cluster_bits: int,
    version: int,
    virtual_size: int,
    l1: Any,
    *,
    backing: GuestMap | None = None,
    has_backing: bool = False,
    owner: Any = None,
) -> GuestMap | None:
    """Map a read-only qcow2 image (standard L2 entries, no external data
    file) for ``GuestMap`` reads; ``l1`` is its L1 table as an ``array("Q")``.
    Unallocated ranges read from ``backing`` (a map of the backing image),
    fall back when ``has_backing`` and no map is given, else read as zeros.
    ``owner`` (the image) gets ``GuestMap.fast``: its ``_map_fallback_into``
    reads what C leaves to Python, its ``_map_error`` raises for C's errors.
    None with the Python backend, or when the file cannot be mapped."""
    native = _native_for_call()
    if native is None:
        return None
    fd = _check_fd(fd, "fd")
    for value, what in ((file_size, "file_size"), (virtual_size, "virtual_size")):
        if _check_int(value, what) < 0 or value > _INT64_MAX:
            raise ValueError(f"{what} out of range: {value}")
    if not 9 <= _check_int(cluster_bits, "cluster_bits") <= 21:
        raise ValueError(f"cluster_bits out of range: {cluster_bits}")
    if getattr(l1, "typecode", None) != "Q":
        raise TypeError("l1 must be an array('Q')")
    if backing is not None and backing.ctx is None:
        raise ValueError("backing map is closed")
    if file_size == 0:
        return None
    ffi, lib = native.ffi, native.lib
    out = ffi.new("void **")
    table = ffi.from_buffer("uint64_t[]", l1) if len(l1) else ffi.NULL
    rc = lib.pyqcow_map_open(fd, file_size, cluster_bits, int(version), virtual_size, table,
                             len(l1), out)
    if rc < 0:
        return None  # e.g. ENODEV: a file that cannot be mapped; pread serves it
    gm = GuestMap(native, out[0])
    lib.pyqcow_map_set_backing(gm.ctx, backing.ctx if backing is not None else ffi.NULL,
                               int(has_backing))
    if backing is not None:
        backing._dependents.append(gm)
    if owner is not None:
        fallback_into, on_error = _owner_callbacks(owner)
        mapread = _load_mapread()
        if mapread is not None:
            addr = int(ffi.cast("uintptr_t", gm.ctx))
            read = int(ffi.cast("uintptr_t", ffi.addressof(lib, "pyqcow_map_read")))
            gm.fast = mapread.Reader(addr, read, virtual_size, fallback_into, on_error)
        else:
            gm.fast = _CffiReader(gm, virtual_size, fallback_into, on_error)
    return gm
