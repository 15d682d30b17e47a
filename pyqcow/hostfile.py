"""Host files: positional I/O, durability, holes and QEMU-compatible locks.

Locking follows QEMU's block/file-posix.c: a process holds a shared OFD lock on
byte ``100 + i`` while it *uses* permission ``i`` and on byte ``200 + i`` while it
*refuses to share* permission ``i``.  Permission bits: 0 consistent read,
1 write, 2 write-unchanged, 3 resize.  Before taking a permission we test that
nobody refuses to share it, and before refusing to share one we test that
nobody uses it (F_OFD_GETLK with a write lock).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from . import spec
from .errors import BackingChainError, FormatError, ImageLockedError, OperationError, QcowError

_PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}

# Lock profiles: (permissions used, permissions not shared)
LOCK_READ = ((spec.PERM_CONSISTENT_READ,), (spec.PERM_WRITE, spec.PERM_RESIZE))
LOCK_WRITE = (
    (spec.PERM_CONSISTENT_READ, spec.PERM_WRITE, spec.PERM_RESIZE),
    (spec.PERM_WRITE, spec.PERM_RESIZE),
)

_FLOCK_FMT = "hhqqi4x"  # struct flock on Linux (x86_64, aarch64): 32 bytes

# Extra open(2) flags for read-only opens.  ``pyqcow mount`` sets O_NOATIME
# (set_noatime) so serving evidence never changes its access time; the kernel
# allows it to the file's owner and to root, others open without it.
_READ_ONLY_FLAGS = 0


def set_noatime(on: bool = True) -> None:
    """Open host files read-only with O_NOATIME from now on (process-wide)."""
    global _READ_ONLY_FLAGS
    _READ_ONLY_FLAGS = getattr(os, "O_NOATIME", 0) if on else 0


def read_opener(path, flags: int) -> int:
    """An ``open(..., opener=)`` for read-only opens that honours set_noatime."""
    if _READ_ONLY_FLAGS and not flags & (os.O_WRONLY | os.O_RDWR):
        try:
            return os.open(path, flags | _READ_ONLY_FLAGS)
        except PermissionError:
            pass
    return os.open(path, flags)

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): a block device's size in bytes


#: qemu-img's cache modes (-t for the image written, -T for the source read)
CACHE_MODES = ("writeback", "unsafe", "none", "writethrough", "directsync")
_cache = {"write": "writeback", "read": "writeback"}
_DIRECT_ALIGN = 4096


def set_cache_mode(mode: str, *, source: bool = False) -> None:
    """Cache mode for files opened from now on in this process (as qemu-img -t / -T).

    writeback (default): page cache, fsync at each ordering point; unsafe: no
    fsync at all (fast, not crash-safe: for scratch images); none: data writes
    that are 4 KiB-aligned go through an O_DIRECT descriptor (bypassing the page
    cache) where the file system supports it, fsync as writeback; writethrough:
    O_DSYNC writes; directsync: both.  ``source=True`` sets the read side
    (``-T``): none/directsync drop the source's pages from the cache after reading.
    """
    if mode not in CACHE_MODES:
        raise ValueError(f"invalid cache mode {mode!r} (use {', '.join(CACHE_MODES)})")
    _cache["read" if source else "write"] = mode


def cache_mode(*, source: bool = False) -> str:
    return _cache["read" if source else "write"]


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def block_device_size(fd: int) -> int:
    """Size in bytes of the block device open at ``fd`` (BLKGETSIZE64)."""
    buf = fcntl.ioctl(fd, BLKGETSIZE64, bytes(8))
    return struct.unpack("Q", buf)[0]


def _flock(lock_type: int, start: int, length: int) -> bytes:
    return struct.pack(_FLOCK_FMT, lock_type, os.SEEK_SET, start, length, 0)


class HostFile:
    """One open host file (image, data file or raw backing)."""

    def __init__(self, path: str | os.PathLike, writable: bool = False) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        self.cache = _cache["write"] if writable else _cache["read"]
        if writable and self.cache in ("writethrough", "directsync"):
            flags |= os.O_DSYNC
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise QcowError(self.path, "no such file") from None
        except PermissionError:
            raise QcowError(self.path, "permission denied") from None
        if stat.S_ISDIR(st.st_mode):
            raise QcowError(self.path, "is a directory, not an image file")
        try:
            self.fd = read_opener(self.path, flags)
        except PermissionError:
            raise QcowError(
                self.path, "permission denied" + (" (opening for writing)" if writable else "")
            ) from None
        except OSError as e:
            raise QcowError(self.path, f"cannot open: {e.strerror}") from e
        self._locked: list[int] = []
        self.direct_fd = -1
        if writable and self.cache in ("none", "directsync"):
            try:
                self.direct_fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
            except (OSError, AttributeError):
                self.direct_fd = -1  # not supported here (tmpfs...): the page cache it is
        #: a block device (an LVM logical volume, a loop device): its size is fixed
        #: (BLKGETSIZE64), it is never truncated and never has holes punched
        self.is_block_device = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        self._device_size = block_device_size(self.fd) if self.is_block_device else 0

    # -- positional I/O -----------------------------------------------------
    def size(self) -> int:
        """Bytes in the file; for a block device, the device size."""
        if self.is_block_device:
            return self._device_size
        return os.fstat(self.fd).st_size

    def pread(self, length: int, offset: int) -> bytes:
        """Read exactly ``length`` bytes; bytes past the end of file read as zeros."""
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        chunks = [data]
        got = len(data)
        while got < length:
            more = os.pread(self.fd, length - got, offset + got)
            if not more:
                chunks.append(bytes(length - got))
                break
            chunks.append(more)
            got += len(more)
        return b"".join(chunks)

    def preadinto(self, buf, offset: int) -> None:
        """Fill ``buf`` (writable buffer) from ``offset``; zeros past the end of file."""
        mv = memoryview(buf).cast("B")
        total = len(mv)
        got = 0
        while got < total:
            n = os.preadv(self.fd, [mv[got:]], offset + got)
            if n <= 0:
                mv[got:] = bytes(total - got)
                return
            got += n

    def pwrite(self, data, offset: int) -> None:
        mv = memoryview(data).cast("B")
        if self.is_block_device and offset + len(mv) > self._device_size:
            raise self._no_space(offset + len(mv))
        if self.direct_fd >= 0 and not (offset | len(mv)) % _DIRECT_ALIGN and len(mv):
            self._pwrite_direct(mv, offset)
            return
        self.pwrite_buffered(mv, offset)

    def truncate(self, size: int) -> None:
        """Set the file size; on a block device only check that ``size`` fits."""
        if self.is_block_device:
            if size > self._device_size:
                raise self._no_space(size)
            return
        os.ftruncate(self.fd, size)

    def _pwrite_direct(self, mv: memoryview, offset: int) -> None:
        """An aligned write through the O_DIRECT descriptor (page-aligned bounce buffer)."""
        import mmap

        step = 8 << 20
        buf = mmap.mmap(-1, min(step, len(mv)))
        try:
            done = 0
            while done < len(mv):
                n = min(step, len(mv) - done)
                buf[:n] = mv[done : done + n]
                wrote = os.pwrite(self.direct_fd, memoryview(buf)[:n], offset + done)
                if wrote <= 0:
                    raise OSError(errno.EIO, f"short write to {self.path}")
                if wrote < n:  # finish the tail the ordinary way
                    self.pwrite_buffered(mv[done + wrote : done + n], offset + done + wrote)
                done += n
        finally:
            buf.close()

    def pwrite_buffered(self, data, offset: int) -> None:
        """Write all of ``data`` through the ordinary (page-cache) descriptor."""
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            n = os.pwrite(self.fd, mv[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"short write to {self.path}")
            done += n

    def _no_space(self, needed: int) -> OperationError:
        return OperationError(
            self.path,
            f"no space left on block device: the image needs {needed} bytes, the device "
            f"holds {self._device_size} (grow the device, e.g. lvextend)",
        )

    def fsync(self) -> None:
        if self.cache == "unsafe":
            return  # -t unsafe: the caller chose speed over crash safety
        os.fsync(self.fd)

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a byte range (reads as zeros afterwards). False if unsupported
        (always on a block device: pyqcow never discards a device's blocks)."""
        return self.punch_holes(((offset, length),))

    def punch_holes(self, runs) -> bool:
        """``punch_hole`` for each ``(offset, length)`` of ``runs``, in one helper call."""
        if self.is_block_device:
            return False
        from .fastcopy import punch_holes  # the C helper's fallocate (os has none)

        try:
            return punch_holes(self.fd, runs)
        except (OSError, ValueError):
            return False  # the callers write zeros instead

    def data_extents(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) runs from SEEK_DATA/SEEK_HOLE over [start, end)."""
        runs: list[tuple[int, int, bool]] = []
        pos = start
        fsize = self.size()
        while pos < end:
            if pos >= fsize:
                runs.append((pos, end - pos, False))
                break
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    runs.append((pos, end - pos, False))
                    break
                runs.append((pos, end - pos, True))
                break
            if data > pos:
                stop = min(data, end)
                runs.append((pos, stop - pos, False))
                pos = stop
                continue
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            stop = min(hole, end)
            runs.append((pos, stop - pos, True))
            pos = stop
        return runs

    # -- locks ----------------------------------------------------------------
    def _held_by_other(self, byte: int) -> bool:
        probe = _flock(fcntl.F_WRLCK, byte, 1)
        res = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, probe)
        lock_type = struct.unpack(_FLOCK_FMT, res)[0]
        return lock_type != fcntl.F_UNLCK

    def lock(self, profile: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        """Take QEMU-style permission locks, refusing if another process conflicts."""
        used, unshared = profile
        for perm in used:
            if self._held_by_other(spec.RAW_LOCK_SHARED_BASE + perm):
                raise ImageLockedError(
                    self.path,
                    f'image is in use: another process (qemu?) does not share the "{_PERM_NAMES[perm]}"'
                    " permission; is a VM or qemu-io using it?",
                )
        for perm in unshared:
            if self._held_by_other(spec.RAW_LOCK_PERM_BASE + perm):
                raise ImageLockedError(
                    self.path,
                    f'image is in use: another process (qemu?) holds the "{_PERM_NAMES[perm]}"'
                    " permission; stop it first, or use -U/force_share to read it anyway",
                )
        bytes_ = [spec.RAW_LOCK_PERM_BASE + p for p in used]
        bytes_ += [spec.RAW_LOCK_SHARED_BASE + p for p in unshared]
        for b in bytes_:
            try:
                fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, b, 1))
            except OSError as e:
                self.unlock()
                raise ImageLockedError(self.path, f"cannot lock byte {b}: {e.strerror}") from e
            self._locked.append(b)
        # Re-check after locking: a racing process may have locked in between
        # (both directions, as qemu's raw_check_lock_bytes after raw_apply_lock_bytes).
        racing = [spec.RAW_LOCK_SHARED_BASE + p for p in used]
        racing += [spec.RAW_LOCK_PERM_BASE + p for p in unshared]
        if any(self._held_by_other(b) for b in racing):
            self.unlock()
            raise ImageLockedError(
                self.path, "image is in use by another process (it was opened at the same time)"
            )

    def unlock(self) -> None:
        for b in self._locked:
            try:
                fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, b, 1))
            except OSError:
                pass
        self._locked.clear()

    def close(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1
        if self.fd >= 0:
            self.unlock()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> HostFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync the directory containing ``path`` (after a rename or create)."""
    if _cache["write"] == "unsafe":
        return
    d = os.path.dirname(os.path.abspath(os.fspath(path))) or "."
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def path_inside(path: str, root: str) -> bool:
    """Does ``path`` (symbolic links resolved) lie in directory ``root``?"""
    real = os.path.realpath(path)
    root = os.path.realpath(root)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def open_data_file(image_path: str, name: str | None, root: str | None, writable: bool,
                   force_share: bool) -> tuple[HostFile, str]:
    """Open (and lock, unless ``force_share``) the external data file ``name`` of
    the image at ``image_path``: relative to the image's directory, inside
    ``root`` when one is given.  -> (its HostFile, its path)."""
    if not name:
        raise FormatError(image_path, "image needs an external data file but names none")
    full = name if os.path.isabs(name) else os.path.join(os.path.dirname(image_path), name)
    if root is not None and not path_inside(full, root):
        raise BackingChainError(
            image_path, f"external data file {name!r} lies outside the allowed directory {root}"
        )
    try:
        hf = HostFile(full, writable=writable)
    except QcowError as e:
        raise QcowError(image_path, f"external data file {name!r}: {e.message}") from None
    if not force_share:
        try:
            hf.lock(LOCK_WRITE if writable else LOCK_READ)
        except BaseException:
            hf.close()
            raise
    return hf, full


def check_range(path: str, offset: int, length: int, limit: int) -> None:
    if offset < 0 or length < 0 or offset + length > limit:
        raise OperationError(
            path, f"request at offset {offset} length {length} is outside the disk (size {limit})"
        )


def lock_conflict(path: str, profile: tuple[tuple[int, ...], tuple[int, ...]]) -> str | None:
    """Why taking ``profile`` on ``path`` would fail now (None: it would not).

    A probe for plans and dry runs: it takes no lock itself.
    """
    try:
        hf = HostFile(path)
    except QcowError:
        return None  # the real open reports it
    try:
        used, unshared = profile
        for perm in used:
            if hf._held_by_other(spec.RAW_LOCK_SHARED_BASE + perm):
                return f'another process (qemu?) does not share the "{_PERM_NAMES[perm]}" permission'
        for perm in unshared:
            if hf._held_by_other(spec.RAW_LOCK_PERM_BASE + perm):
                return f'another process (qemu?) holds the "{_PERM_NAMES[perm]}" permission'
        return None
    finally:
        hf.close()


# zero source for fills: calloc'd, so every page maps the kernel's zero page
_ZERO_BUFFER = memoryview(bytes(1 << 21))


def zero_fill(dst: memoryview) -> None:
    """Set every byte of ``dst`` (a writable 'B' memoryview) to zero."""
    n = len(dst)
    step = len(_ZERO_BUFFER)
    if n <= step:
        dst[:] = _ZERO_BUFFER[:n]
        return
    for i in range(0, n, step):
        m = min(step, n - i)
        dst[i : i + m] = _ZERO_BUFFER[:m]
