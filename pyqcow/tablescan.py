"""Bulk scans of metadata tables: which entries are not all zero.

A sparse image's L1 and L2 tables are mostly zero; turning each of a 64 KiB
table's 8,192 entries into a Python int costs more than the rest of a check.
``nonzero_indices`` finds the entries that are not all zero with the C helper
(``pyqcow_nonzero_entries``, through pyqcow.fastcopy's backend choice), or in
Python by comparing 1 KiB slices with zeros and looking only inside the slices
that are not.  The C helper comes with cffi, whose import costs about as much as
a few hundred tables scanned in Python: a command that has not loaded it yet
(``info``, ``map`` or ``check`` of a small image) scans its first
``_PYTHON_TABLES`` tables in Python and loads it only past them.  Only zero-ness is tested, so the table may be raw (big-endian)
bytes or a decoded ``array('Q')``; nothing here knows what an entry's bits mean
(that is pyqcow.entries).
"""

from __future__ import annotations

import sys

__all__ = ["nonzero_indices", "scanner"]

_OUT_CAPACITY = 1024  # indices per C call (a table with more takes several calls)
_SLICE = 1024  # bytes per zero comparison of the fallback
_ZEROS = bytes(_SLICE)
_PYTHON_TABLES = 256  # tables scanned in Python before the C helper is worth loading
_scanned = 0


def nonzero_indices(table: object, width: int = 1) -> list[int]:
    """Indices, in order, of the entries of ``table`` (a buffer of 64-bit words,
    ``width`` words per entry: 2 for extended L2 entries) that are not all zero."""
    global _scanned
    view = memoryview(table).cast("B")
    size = view.nbytes // (8 * width)
    fastcopy = sys.modules.get("pyqcow.fastcopy")
    if fastcopy is None:
        if _scanned < _PYTHON_TABLES:
            _scanned += 1
            return _py_nonzero(view, size, width)
        from . import fastcopy
    native = fastcopy._native_for_call()
    if native is None:
        return _py_nonzero(view, size, width)
    if not size:
        return []
    capacity = min(size, _OUT_CAPACITY)
    return _native_scan(native, view, size, width, native.ffi.new("int64_t[]", capacity), capacity)


def scanner(width: int = 1):
    """``nonzero_indices`` for the many tables of one job: the backend is chosen,
    and the C helper's output array made, once instead of once per table."""
    from . import fastcopy

    native = fastcopy._native_for_call()
    if native is None:
        def scan(table: object) -> list[int]:
            view = memoryview(table).cast("B")
            return _py_nonzero(view, view.nbytes // (8 * width), width)
        return scan
    out = native.ffi.new("int64_t[]", _OUT_CAPACITY)

    def scan_native(table: object) -> list[int]:
        view = memoryview(table).cast("B")
        size = view.nbytes // (8 * width)
        return _native_scan(native, view, size, width, out, _OUT_CAPACITY) if size else []
    return scan_native


def _native_scan(native, view: memoryview, size: int, width: int, out, capacity: int) -> list[int]:
    """The C helper's scan of ``view`` (``size`` entries), ``capacity`` indices of
    ``out`` per call."""
    ffi, lib = native.ffi, native.lib
    src = ffi.from_buffer(view)
    found: list[int] = []
    start = 0
    while True:
        n = lib.pyqcow_nonzero_entries(src, size, width, start, out, capacity)
        if n < 0:
            raise ValueError(f"pyqcow_nonzero_entries failed ({n})")
        found += ffi.unpack(out, n)
        if n < capacity or found[-1] + 1 >= size:
            return found
        start = found[-1] + 1


def _py_nonzero(view: memoryview, size: int, width: int) -> list[int]:
    entry = 8 * width
    raw = view.tobytes()
    found: list[int] = []
    step = _SLICE - _SLICE % entry
    zeros = _ZEROS[:step]
    for pos in range(0, size * entry, step):
        chunk = raw[pos : pos + step]
        if chunk == zeros[: len(chunk)]:
            continue
        for k in range(0, len(chunk) - entry + 1, entry):
            if chunk[k : k + entry] != zeros[:entry]:
                found.append((pos + k) // entry)
    return found
