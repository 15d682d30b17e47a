"""What every convert output shares: the copy options, the source/destination
guard and the source's page cache after the copy."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import OperationError
from ..record import FrozenRecord
from ..writeback import BackgroundWriteback
from .plan import data_fds

ProgressFn = Callable[[int, int], None]


class ConvertOptions(FrozenRecord):
    """qemu-img convert's copy options (the CLI's -n, --target-is-zero, -S, -m, -W).

    A FrozenRecord, not a dataclass (``dataclasses`` costs a convert ~8 ms of
    start-up)."""

    __slots__ = _fields = ("existing", "target_is_zero", "sparse_size", "coroutines",
                           "out_of_order", "bitmaps")
    _defaults = {"existing": False, "target_is_zero": False, "sparse_size": 4096,
                 "coroutines": 1, "out_of_order": False, "bitmaps": False}
    existing: bool  # -n: write into DST as it is (no create, no truncate)
    target_is_zero: bool  # --target-is-zero: DST reads as zeros: skip zero ranges
    sparse_size: int  # -S: 0 writes every byte (fully allocated output)
    coroutines: int  # -m: copy streams (threads) working at once
    out_of_order: bool  # -W: writes may complete in any order
    bitmaps: bool  # --bitmaps: copy the source's persistent bitmaps (qcow2 output)


DEFAULT_OPTIONS = ConvertOptions()


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def refuse_source_as_destination(img, dst: str) -> None:
    for layer in img.chain:
        for hf in {id(h): h for h in (layer.hf, getattr(layer, "data_hf", layer.hf))}.values():
            if _same_file(hf.fd, dst):
                raise OperationError(dst, f"destination is the source image file {hf.path}")


def drop_source_cache(img) -> None:
    """-T none/directsync: the source's pages leave the page cache after the copy."""
    from ..hostfile import cache_mode

    if cache_mode(source=True) not in ("none", "directsync"):
        return
    for fd in data_fds(img).values():
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass


KICK_BYTES = 16 << 20  # start the writeback of an output's new bytes in steps of this size


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages in the range to disk now
    (asynchronously: POSIX_FADV_DONTNEED submits the writeback of dirty pages and
    drops only clean ones), so that the final fsync of a durable convert finds
    little left to wait for: the disk writes while the copy goes on, instead of
    after it.  Only with the default cache mode (writeback): -t unsafe leaves the
    pages to the kernel as qemu-img does, and the other modes write through or
    around the page cache anyway.  Durability is unchanged: the fsyncs are where
    they were."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def kick_writeback_wanted() -> bool:
    from ..hostfile import cache_mode

    return cache_mode() == "writeback"


class WritebackKicker:
    """start_writeback over the part of an output file that has grown since the
    last call, once it is KICK_BYTES or more (qcow2 outputs allocate at the end).
    With ``background``, on a thread of its own (pyqcow.writeback; ``close`` waits).
    ``size``: the file's size without an fstat per call (a qcow2 output's allocated
    end, which its writer keeps: a convert calls this once per chunk it reads)."""

    def __init__(self, fd: int, background: bool = False, size=None) -> None:
        self.fd = fd
        self.on = kick_writeback_wanted()
        self.size = size if size is not None else (lambda: os.fstat(fd).st_size)
        self.done = self.size() if self.on else 0
        self.start = BackgroundWriteback(fd, start_writeback) if background and self.on else None

    def __call__(self) -> None:
        if not self.on:
            return
        end = self.size()
        if end - self.done >= KICK_BYTES:
            if self.start is not None:
                self.start(self.done, end - self.done)
            else:
                start_writeback(self.fd, self.done, end - self.done)
            self.done = end

    def close(self) -> None:
        if self.start is not None:
            self.start.close()


DROP_BYTES = 16 << 20  # SourceMaps: scanned bytes after which the mapped pages are let go
LAG_WINDOWS = 3  # SourceMaps: earlier windows let go again with each drop (views scanned late)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class SourceMaps:
    """Read-only mappings of the source's host files, for zero detection without a
    copy: the scan reads the page cache in place, and the data then goes file to
    file (copy_file_range: shared extents on a reflink file system).  A file that
    cannot be mapped is read with pread instead.

    Each file is mapped once, whole (a mapping per range costs an mmap, a munmap
    and a close each: slower than the pread it replaces); every DROP_BYTES
    scanned its pages are let go (MADV_DONTNEED: they stay in the page cache, a
    view still in use faults them in again), so they do not pile up in the
    process's resident set.

    The range must lie inside the file as it was when mapped (a source shrinking
    under a convert would raise SIGBUS; QEMU's locks, taken on every source, keep
    writers out)."""

    def __init__(self) -> None:
        # fd -> [mmap, its memoryview, size, bytes scanned since the last drop, lowest
        # and highest offset scanned since then, (lowest, highest) of the windows
        # let go before] or None
        self.maps: dict[int, list | None] = {}

    def view(self, fd: int, offset: int, length: int) -> memoryview | None:
        """``length`` bytes of ``fd`` at ``offset`` from its mapping, or None."""
        entry = self._entry(fd, offset, length)
        return None if entry is None else entry[1][offset : offset + length]

    def copy_nonzero(self, src_fd: int, dst_fd: int, runs: list[tuple[int, int, int]]) -> int | None:
        """Copy the (source offset, destination offset, length) ``runs`` of ``src_fd``
        into ``dst_fd`` but for their all-zero 4 KiB blocks (aligned to destination
        offsets; the destination must read as zeros there), scanned in place in
        the mapping and copied file to file, in one call of the C helper (which
        releases the GIL).  Returns the bytes written, or None when the file is
        not mapped or the helper is missing (the caller copies another way)."""
        from .. import fastcopy

        native = fastcopy._native_for_call()
        if native is None or not runs:
            return None if native is None else 0
        lo = min(r[0] for r in runs)
        entry = self._entry(src_fd, lo, max(r[0] + r[2] for r in runs) - lo)
        if entry is None:
            return None
        flat = [v for r in runs for v in r]
        with native.ffi.from_buffer(entry[1]) as base:
            rc = native.lib.pyqcow_copy_mapped_runs(
                src_fd, base, entry[2], dst_fd, native.ffi.new("int64_t[]", flat), len(runs)
            )
        return fastcopy._check(rc)

    def _entry(self, fd: int, offset: int, length: int) -> list | None:
        """The mapping entry of ``fd`` if [offset, offset + length) lies inside it,
        after accounting for the range (the scanned pages are let go every
        DROP_BYTES)."""
        entry = self.maps.get(fd, False)
        if entry is False:
            entry = self.maps[fd] = self._map(fd)
        if entry is None or offset + length > entry[2]:
            return None
        if entry[3] >= DROP_BYTES:
            # let go of this window and the LAG_WINDOWS before it: a view taken in
            # an earlier window may have been scanned (its pages faulted in again)
            # only after that window was let go (convert -O qcow2 takes views of
            # the chunks it reads ahead, and scans them later)
            spans = entry[6]
            spans.append((entry[4], entry[5]))
            del spans[:-LAG_WINDOWS - 1]
            lo = min(s[0] for s in spans)
            lo -= lo % PAGE
            try:
                entry[0].madvise(_madv_dontneed(), lo, max(s[1] for s in spans) - lo)
            except (OSError, ValueError, AttributeError):
                pass
            entry[3:6] = [0, offset, offset]
        entry[3] += length
        entry[4] = min(entry[4], offset)
        entry[5] = max(entry[5], offset + length)
        return entry

    @staticmethod
    def _map(fd: int) -> list | None:
        import mmap
        import stat

        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                return None
            mm = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            return None
        return [mm, memoryview(mm), st.st_size, 0, st.st_size, 0, []]

    def close(self) -> None:
        for entry in self.maps.values():
            if entry is not None:
                try:
                    entry[1].release()
                    entry[0].close()
                except BufferError:  # a view still in use: the collector unmaps it
                    pass
        self.maps.clear()

    def __enter__(self) -> SourceMaps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _madv_dontneed() -> int:
    import mmap

    return mmap.MADV_DONTNEED
