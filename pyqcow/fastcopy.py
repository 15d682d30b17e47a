"""Bulk byte moving: range copies between file descriptors, zero detection
(the mmap-backed guest reads of read-only qcow2 images: pyqcow.guestmap).

The only module that imports the C helper ``pyqcow._native`` (built by
``csrc/build_native.py`` from ``csrc/pyqcow_copy.{h,c}``).  Every function has
a pure-Python fallback with the same behaviour, used when the extension cannot
be imported, when the environment has ``PYQCOW_NO_NATIVE=1`` (read at each
call), or inside ``with backend("python"):``.

Python checks every argument before C sees it: fds are open ints, offsets and
lengths are non-negative ints whose sums fit in an ``int64_t``, buffers are
contiguous and sized by Python.  C returns ``-errno``; ``_check`` turns that
into ``OSError``.

Semantics shared by both backends:

* Source bytes past the source's end of file read as zeros.
* A copy between two ranges of one file (same fd, or two fds on one inode)
  needs non-overlapping ranges.
* ``skip_zero=True`` reads the source and leaves out 4 KiB destination chunks
  (aligned to destination offsets) that are all zeros: the caller promises the
  destination already reads as zeros there (a fresh sparse file, a new
  cluster).  If the destination is a regular file shorter than the end of the
  last run, it is extended with ftruncate so that every run's bytes exist.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time: typing, re, enum)
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import ModuleType
    from typing import Any, Literal

    BackendName = Literal["native", "python"]

__all__ = [
    "backend",
    "can_share",
    "punch_holes",
    "copy_range",
    "copy_runs",
    "current_backend",
    "fallocate",
    "may_share",
    "is_zero",
    "native_available",
    "native_import_error",
    "zero_runs",
]

#: Environment variable that forces the pure-Python fallback when set to "1".
NO_NATIVE_ENV = "PYQCOW_NO_NATIVE"

COPY_BUFFER_SIZE = 1 << 20  # pread/pwrite buffer, as in pyqcow_copy.c
ZERO_CHUNK_SIZE = 4096  # skip_zero granularity, as in pyqcow_copy.c
_MAX_CFR_SIZE = 1 << 30  # one copy_file_range request, as in pyqcow_copy.c
_INT64_MAX = (1 << 63) - 1
_INT_MAX = (1 << 31) - 1
# copy_file_range errors after which pread/pwrite takes over (as in C).
_CFR_UNSUPPORTED = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_ZEROS = bytes(COPY_BUFFER_SIZE)

# --------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------

_native: ModuleType | None = None  # pyqcow._native once imported
_native_error: BaseException | None = None  # why the import failed
_native_tried = False
_forced: BackendName | None = None  # set by backend()


def _load_native() -> ModuleType | None:
    global _native, _native_error, _native_tried
    if not _native_tried:
        _native_tried = True
        try:
            from . import _native as module  # type: ignore[attr-defined]
        except ImportError as exc:
            _native_error = exc
        else:
            _native = module
    return _native


def native_available() -> bool:
    """True if the compiled helper ``pyqcow._native`` can be imported
    (whatever ``PYQCOW_NO_NATIVE`` says)."""
    return _load_native() is not None


def native_import_error() -> BaseException | None:
    """The ImportError that made the helper unavailable, if any."""
    _load_native()
    return _native_error


def current_backend() -> BackendName:
    """The backend the next call will use: ``backend()``'s choice if inside
    one, else "python" when ``PYQCOW_NO_NATIVE=1`` or the helper is missing,
    else "native"."""
    if _forced is not None:
        return _forced
    if os.environ.get(NO_NATIVE_ENV) == "1" or not native_available():
        return "python"
    return "native"


@contextlib.contextmanager
def backend(name: BackendName) -> Iterator[None]:
    """Force a backend for the calls made inside the block (in every thread;
    meant for tests and benchmarks).  ``backend("native")`` overrides
    ``PYQCOW_NO_NATIVE`` and raises RuntimeError if the helper is missing."""
    global _forced
    if name not in ("native", "python"):
        raise ValueError(f"unknown fastcopy backend {name!r}")
    if name == "native" and not native_available():
        raise RuntimeError(f"pyqcow._native is not available: {_native_error}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _native_for_call() -> Any | None:
    """The native module (``.ffi``, ``.lib``) for this call, or None for the
    fallback."""
    return _native if current_backend() == "native" else None


def _check(rc: int) -> int:
    """Pass a non-negative C result through; turn -errno into OSError."""
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc


# --------------------------------------------------------------------------
# Argument checks (before any C call)
# --------------------------------------------------------------------------


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return value


def _check_fd(fd: object, what: str, *, writable: bool = False) -> int:
    """An open fd (OSError EBADF otherwise); a destination must not be
    O_APPEND, which would make pwrite ignore its offset."""
    fd = _check_int(fd, what)
    if not 0 <= fd <= _INT_MAX:
        raise ValueError(f"{what} must be a file descriptor, got {fd}")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)  # OSError(EBADF) if not open
    if writable and flags & os.O_APPEND:
        raise ValueError(f"{what} {fd} is opened with O_APPEND; positioned writes need it off")
    return fd


def _check_range(offset: object, length: object, what: str) -> tuple[int, int]:
    offset = _check_int(offset, f"{what} offset")
    length = _check_int(length, f"{what} length")
    if offset < 0:
        raise ValueError(f"{what} offset must be >= 0, got {offset}")
    if length < 0:
        raise ValueError(f"{what} length must be >= 0, got {length}")
    if offset + length > _INT64_MAX:
        raise ValueError(f"{what} range {offset}+{length} exceeds the largest file offset")
    return offset, length


def _same_file(fd_a: int, fd_b: int) -> bool:
    if fd_a == fd_b:
        return True
    a, b = os.fstat(fd_a), os.fstat(fd_b)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _check_runs(
    src_fd: int, dst_fd: int, runs: Sequence[tuple[int, int, int]]
) -> list[tuple[int, int, int]]:
    """Validated runs, empty ones dropped, adjacent ones merged (both source
    and destination contiguous)."""
    same_file = _same_file(src_fd, dst_fd)
    merged: list[tuple[int, int, int]] = []
    for index, run in enumerate(runs):
        try:
            src_offset, dst_offset, length = run
        except (TypeError, ValueError):
            raise ValueError(
                f"run {index} must be (src_offset, dst_offset, length), got {run!r}"
            ) from None
        _check_range(src_offset, length, f"run {index} source")
        _check_range(dst_offset, length, f"run {index} destination")
        if length == 0:
            continue
        if merged:
            last_src, last_dst, last_length = merged[-1]
            if last_src + last_length == src_offset and last_dst + last_length == dst_offset:
                merged[-1] = (last_src, last_dst, last_length + length)
                continue
        merged.append((src_offset, dst_offset, length))
    if same_file:
        for src_offset, dst_offset, length in merged:
            if src_offset < dst_offset + length and dst_offset < src_offset + length:
                raise ValueError(
                    f"source range {src_offset}+{length} overlaps destination range "
                    f"{dst_offset}+{length} in the same file"
                )
    return merged


@contextlib.contextmanager
def _byte_view(buf: Any) -> Iterator[memoryview]:
    """A flat, contiguous, unsigned-byte view of any buffer-protocol object,
    released on exit (so an mmap can be closed afterwards)."""
    with contextlib.ExitStack() as stack:
        view = stack.enter_context(memoryview(buf))  # TypeError if not a buffer
        if not view.c_contiguous:
            view = stack.enter_context(memoryview(view.tobytes()))
        if view.ndim != 1 or view.format != "B":
            view = stack.enter_context(view.cast("B"))
        yield view


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
    """Copy ``length`` bytes from ``src_fd`` at ``src_offset`` to ``dst_fd`` at
    ``dst_offset`` (copy_file_range where the kernel allows, pread/pwrite
    otherwise).  Source bytes past its end of file are written as zeros.  The
    fds may be the same file if the ranges do not overlap (ValueError
    otherwise).  OSError for I/O errors and closed fds (EBADF)."""
    src_fd = _check_fd(src_fd, "src_fd")
    dst_fd = _check_fd(dst_fd, "dst_fd", writable=True)
    src_offset, length = _check_range(src_offset, length, "source")
    dst_offset, _ = _check_range(dst_offset, length, "destination")
    if length == 0:
        return
    if _same_file(src_fd, dst_fd) and (
        src_offset < dst_offset + length and dst_offset < src_offset + length
    ):
        raise ValueError(
            f"source range {src_offset}+{length} overlaps destination range "
            f"{dst_offset}+{length} in the same file"
        )
    native = _native_for_call()
    if native is not None:
        _check(native.lib.pyqcow_copy_range(src_fd, src_offset, dst_fd, dst_offset, length))
    else:
        _PyCopier().copy_run(src_fd, src_offset, dst_fd, dst_offset, length, skip_zero=False)


def copy_runs(
    src_fd: int,
    dst_fd: int,
    runs: Sequence[tuple[int, int, int]],
    *,
    skip_zero: bool = False,
    direct: Any = None,
) -> int:
    """Copy each run ``(src_offset, dst_offset, length)`` in order, merging
    runs that are contiguous in both files.  With ``skip_zero=True``, 4 KiB
    destination chunks whose source data is all zeros are not written (the
    destination must already read as zeros there); a regular destination file
    shorter than the last run's end is extended.  Returns the number of bytes
    actually written.

    ``direct`` (not with ``skip_zero``): a ``ops.directcopy.DirectWriter`` on ``dst_fd``;
    the runs it takes are written through it (O_DIRECT, on its threads) while
    the others are copied here; the call returns once all are written."""
    src_fd = _check_fd(src_fd, "src_fd")
    dst_fd = _check_fd(dst_fd, "dst_fd", writable=True)
    merged = _check_runs(src_fd, dst_fd, runs)
    if not merged:
        return 0
    if direct is not None and not skip_zero:
        pending, merged = direct.start(src_fd, merged)
        try:
            written = _copy_merged(src_fd, dst_fd, merged, False) if merged else 0
        finally:
            written_direct = direct.wait(pending)
        return written + written_direct
    return _copy_merged(src_fd, dst_fd, merged, skip_zero)


def _copy_merged(src_fd: int, dst_fd: int, merged: list[tuple[int, int, int]],
                 skip_zero: bool) -> int:
    native = _native_for_call()
    if native is not None:
        flat = native.ffi.new("int64_t[]", [value for run in merged for value in run])
        written = _check(
            native.lib.pyqcow_copy_runs(src_fd, dst_fd, flat, len(merged), int(skip_zero))
        )
    else:
        copier = _PyCopier()
        for src_offset, dst_offset, length in merged:
            copier.copy_run(src_fd, src_offset, dst_fd, dst_offset, length, skip_zero=skip_zero)
        written = copier.written
    if skip_zero:
        end = max(dst_offset + length for _, dst_offset, length in merged)
        st = os.fstat(dst_fd)
        if stat.S_ISREG(st.st_mode) and st.st_size < end:
            os.ftruncate(dst_fd, end)
    return written


# statfs f_type of the file systems where copy_file_range can share extents
# (reflink) instead of copying data: XFS (made with reflink=1, the default since
# xfsprogs 5.1), btrfs, bcachefs.
_REFLINK_FS_TYPES = frozenset({0x58465342, 0x9123683E, 0xCA451A4E})


def _fs_type(fd: int) -> int | None:
    import ctypes  # only here: a start-up cost every command would pay

    class _StatFs(ctypes.Structure):
        # struct statfs: f_type (__fsword_t, a long) first; the rest is not read
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = _StatFs()
    if libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def can_share(src_fd: int, dst_fd: int) -> bool:
    """True when ``copy_range``/``copy_runs`` from ``src_fd`` to ``dst_fd`` may
    share extents instead of copying: both on one file system of a kind that
    reflinks (XFS, btrfs, bcachefs).  Callers that would read the data anyway
    (zero detection) then copy it file to file in FS-block-aligned runs; elsewhere
    a write from their buffer is cheaper than a second, in-kernel copy."""
    src_fd = _check_fd(src_fd, "src_fd")
    dst_fd = _check_fd(dst_fd, "dst_fd")
    if os.fstat(src_fd).st_dev != os.fstat(dst_fd).st_dev:
        return False
    return _fs_type(dst_fd) in _REFLINK_FS_TYPES


def is_zero(buf: Any) -> bool:
    """True if every byte of the buffer-protocol object ``buf`` (bytes,
    bytearray, memoryview, mmap, array, ...) is zero; True for an empty one."""
    with _byte_view(buf) as view:
        native = _native_for_call()
        if native is None:
            return _py_is_zero(view)
        with native.ffi.from_buffer("char[]", view) as pointer:
            return bool(native.lib.pyqcow_is_zero(pointer, len(view)))


def zero_runs(buf: Any, granularity: int) -> list[tuple[int, int, bool]]:
    """Split ``buf`` into maximal runs ``(offset, length, is_zero)`` of
    ``granularity``-byte blocks (a power of two; the last block may be short)
    that are all zeros or not.  Empty buffer: empty list."""
    granularity = _check_int(granularity, "granularity")
    if granularity <= 0 or granularity & (granularity - 1):
        raise ValueError(f"granularity must be a power of two, got {granularity}")
    with _byte_view(buf) as view:
        size = len(view)
        if size == 0:
            return []
        native = _native_for_call()
        if native is None:
            return _py_zero_runs(view, granularity)
        capacity = -(-size // granularity)  # runs <= blocks
        out = native.ffi.new("int64_t[]", 3 * capacity)
        with native.ffi.from_buffer("char[]", view) as pointer:
            count = _check(native.lib.pyqcow_zero_runs(pointer, size, granularity, out, capacity))
    values = native.ffi.unpack(out, 3 * count)
    return [(values[i], values[i + 1], bool(values[i + 2])) for i in range(0, 3 * count, 3)]


# --------------------------------------------------------------------------
# mmap-backed guest reads (native only: the fallback is the caller's own path)
# --------------------------------------------------------------------------

#: pyqcow_map_read's "read this range in Python instead".
MAP_FALLBACK = 1


# --------------------------------------------------------------------------
# Pure-Python fallback (mirrors pyqcow_copy.c)
# --------------------------------------------------------------------------


def _py_is_zero(view: memoryview) -> bool:
    # bytes == bytes is a memcmp; memoryview == bytes compares item by item.
    for start in range(0, len(view), COPY_BUFFER_SIZE):
        chunk = bytes(view[start : start + COPY_BUFFER_SIZE])
        if chunk != (_ZEROS if len(chunk) == COPY_BUFFER_SIZE else bytes(len(chunk))):
            return False
    return True


def _py_zero_runs(view: memoryview, granularity: int) -> list[tuple[int, int, bool]]:
    runs: list[tuple[int, int, bool]] = []
    for offset in range(0, len(view), granularity):
        block = view[offset : offset + granularity]
        zero = _py_is_zero(block)
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], runs[-1][1] + len(block), zero)
        else:
            runs.append((offset, len(block), zero))
    return runs


def _pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd``; fewer bytes only at end of file."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view = view[n:]
        offset += n


class _PyCopier:
    """State shared by the runs of one call, as ``struct copier`` in C.
    (os functions already retry on EINTR.)"""

    def __init__(self) -> None:
        self.buffer: memoryview | None = None
        self.no_cfr = not hasattr(os, "copy_file_range")
        self.written = 0

    def _fill(self, fd: int, size: int, offset: int) -> tuple[memoryview, int]:
        if self.buffer is None:
            self.buffer = memoryview(bytearray(COPY_BUFFER_SIZE))
        view = self.buffer[:size]
        got = _pread_full(fd, view, offset)
        if got < size:
            view[got:] = bytes(size - got)
        return view, got

    def copy_run(
        self,
        src_fd: int,
        src_offset: int,
        dst_fd: int,
        dst_offset: int,
        length: int,
        *,
        skip_zero: bool,
    ) -> None:
        if skip_zero:
            self._copy_sparse(src_fd, src_offset, dst_fd, dst_offset, length)
            return
        while length > 0 and not self.no_cfr:
            try:
                done = os.copy_file_range(
                    src_fd, dst_fd, min(length, _MAX_CFR_SIZE), src_offset, dst_offset
                )
            except OSError as exc:
                if exc.errno not in _CFR_UNSUPPORTED:
                    raise
                self.no_cfr = True
                break
            if done == 0:  # end of file, or a file system that cannot tell
                break
            self.written += done
            src_offset += done
            dst_offset += done
            length -= done
        self._copy_plain(src_fd, src_offset, dst_fd, dst_offset, length)

    def _copy_plain(
        self, src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int
    ) -> None:
        while length > 0:
            size = min(length, COPY_BUFFER_SIZE)
            view, _ = self._fill(src_fd, size, src_offset)
            _pwrite_full(dst_fd, view, dst_offset)
            self.written += size
            src_offset += size
            dst_offset += size
            length -= size

    def _copy_sparse(
        self, src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int
    ) -> None:
        while length > 0:
            # After the first buffer, buffers start on a chunk boundary.
            size = min(length, COPY_BUFFER_SIZE - dst_offset % ZERO_CHUNK_SIZE)
            view, got = self._fill(src_fd, size, src_offset)
            data_start: int | None = None
            pos = 0
            while pos < size:
                chunk = min(ZERO_CHUNK_SIZE - (dst_offset + pos) % ZERO_CHUNK_SIZE, size - pos)
                zero = _py_is_zero(view[pos : pos + chunk])
                if not zero and data_start is None:
                    data_start = pos
                pos += chunk
                if data_start is not None and (zero or pos == size):
                    end = pos - chunk if zero else pos
                    _pwrite_full(dst_fd, view[data_start:end], dst_offset + data_start)
                    self.written += end - data_start
                    data_start = None
            if got < size:
                return  # the rest of the run lies past the source's end: zeros
            src_offset += size
            dst_offset += size
            length -= size


# --- added by h-copier


def fallocate(fd: int, offset: int, length: int) -> bool:
    """Allocate [offset, offset + length) of the regular file ``fd`` (fallocate
    mode 0: the file grows to cover it; the new space reads as zeros).  False
    where it cannot be done cheaply: no helper, or a file system without
    fallocate (never emulated by writing zeros)."""
    fd = _check_fd(fd, "fd", writable=True)
    offset, length = _check_range(offset, length, "fallocate")
    return _fallocate(fd, 0, offset, length)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset + length) of the regular file ``fd``
    (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE: the range reads as zeros, the size stays).
    False where it cannot be done: no helper, or a file system without it."""
    return _punch(fd, ((offset, length),), "punch_hole")


def punch_holes(fd: int, runs) -> bool:
    """``punch_hole`` for each ``(offset, length)`` of ``runs`` (the fd checked
    once).  False as soon as one cannot be done (the rest are left)."""
    return _punch(fd, runs, "punch_holes")


def _punch(fd: int, runs, what: str) -> bool:
    fd = _check_fd(fd, "fd", writable=True)
    runs = [_check_range(offset, length, what) for offset, length in runs]
    native = _native_for_call()  # (chosen once: a commit may punch thousands of runs)
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    return all(_fallocate_with(native, fd, mode, offset, length) for offset, length in runs)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    return _fallocate_with(_native_for_call(), fd, mode, offset, length)


def _fallocate_with(native, fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate through ``native`` (None: no helper); False where it cannot be done."""
    if native is None or length == 0:
        return length == 0
    rc = native.lib.pyqcow_fallocate(fd, mode, offset, length)
    if rc in (-errno.EOPNOTSUPP, -errno.ENOSYS):
        return False
    _check(rc)
    return True


def may_share(fd: int) -> bool:
    """True if ``fd`` is on a file system whose copy_file_range can share extents
    (reflink: XFS, btrfs, bcachefs): copies into it should stay file to file."""
    return _fs_type(_check_fd(fd, "fd")) in _REFLINK_FS_TYPES
