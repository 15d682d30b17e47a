"""QcowImage: open a qcow2 file, read guest data through the backing chain.

The image does the I/O of the read path: the L1/L2 lookup itself is in
mapping.py (pure functions over table contents), entry bits in entries.py, the
table cache in cache.py.  Writes belong to ``img.writer`` (writer.py, composed:
QcowImage's write methods delegate to it).
"""

from __future__ import annotations

import errno
import os
import warnings

from . import entries, spec
from .cache import L2_CACHE_TABLES, MAX_DIRTY_L2, OnFirstUse, TableCache
from .entries import ClusterType
from .errors import CorruptImageError, FormatError, QcowError
from .header import Header, parse_header
from .hostfile import LOCK_READ, LOCK_WRITE, HostFile, check_range, open_data_file, zero_fill
from .libyal_methods import LibyalMethods

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    from array import array

    from .mapping import Run  # mapping (and dataclasses) load on first use: start-up time

_L1_TABLE_MASK = entries.L1_TABLE_MASK
_L2E_OFFSET_MASK = entries.L2_HOST_MASK
_COMPRESSED = entries.COMPRESSED_BIT
_COPIED = entries.COPIED_BIT
_ZERO = entries.ZERO_BIT

# kinds of a coalesced run in readinto
_DATA, _ZEROS_KIND, _BACKING = 1, 2, 3
_UNALLOCATED = -2  # _single_cluster_host: the range reads from the backing file (or zeros)


def _new_writer(img):
    from .writer import Writer

    return Writer(img)


def _to_writer(name: str) -> property:
    """The writer's state ``name``, as an attribute of the image."""
    return property(lambda self: getattr(self.writer, name),
                    lambda self, value: setattr(self.writer, name, value))


class QcowImage(LibyalMethods):
    format = "qcow2"
    writer = OnFirstUse(_new_writer)
    # the active L1 table, decoded on first use: info needs none, and the decoding's
    # array module (with collections) is ~2 ms of its start-up
    l1 = OnFirstUse(lambda img: entries.decode_u64_table(img._l1_raw))

    def __init__(
        self,
        path: str | os.PathLike,
        mode: str = "r",
        *,
        force_share: bool = False,
        data_file: str | None = None,
        data_root: str | None = None,
        _repair: bool = False,
        _host=None,
    ) -> None:
        if mode not in ("r", "r+"):
            raise ValueError("mode must be 'r' or 'r+'")
        self.path = os.fspath(path)
        self.writable = mode == "r+"
        self.backing = None
        # _host: an already open host (pyqcow.fileobj.FileObjectHost: a file-like object)
        self.hf = _host if _host is not None else HostFile(self.path, writable=self.writable)
        self.data_hf = self.hf
        self._closed = False
        try:
            if not force_share:
                self.hf.lock(LOCK_WRITE if self.writable else LOCK_READ)
            self.file_size = self.hf.size()
            self._load_header(_repair=_repair)
            self._data_root = data_root
            self._open_data_file(data_file, force_share)
        except BaseException:
            self.hf.close()
            raise
        #: L2 tables by host offset (pyqcow.cache: bounded, dirty ones pinned)
        self.l2_cache = TableCache(L2_CACHE_TABLES, MAX_DIRTY_L2)
        self._l2_tables = self.l2_cache.tables  # the read path's direct lookup
        self._decomp_cache: tuple[int, bytes] | None = None
        self._metadata_prealloc: bool | None = None
        self._gmap = None  # guestmap.GuestMap once made; False: not mappable
        # self.writer is made on first use (cache.OnFirstUse): start-up time
        if self.writable and self.header.dirty:
            # a lazy-refcounts image left dirty: rebuild refcounts before writing
            from .repair import repair_dirty

            repair_dirty(self)

    # -- open ---------------------------------------------------------------------
    def _load_header(self, _repair: bool = False) -> None:
        head = self.hf.pread(min(self.file_size, 1 << spec.MAX_CLUSTER_BITS), 0)
        if len(head) >= 24:
            cb = int.from_bytes(head[20:24], "big")
            if spec.MIN_CLUSTER_BITS <= cb <= spec.MAX_CLUSTER_BITS:
                head = head[: max(1 << cb, 0)]
        if self.file_size == 0:
            raise FormatError(self.path, "empty file, not a qcow2 image")
        self.header: Header = parse_header(self.path, head, self.file_size)
        h = self.header
        if h.corrupt:
            if self.writable and not _repair:
                raise CorruptImageError(
                    self.path,
                    "image is marked corrupt; cannot be opened read/write (run 'pyqcow check -r all')",
                )
            if not self.writable:
                warnings.warn(f"{self.path}: image is marked corrupt; reading anyway", stacklevel=3)
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.virtual_size = h.size
        self.l2_bits = h.cluster_bits - (4 if h.extended_l2 else 3)
        self.l2_entries = 1 << self.l2_bits
        self.extended_l2 = h.extended_l2
        self.subcluster_bits = h.cluster_bits - (5 if h.extended_l2 else 0)
        self._l2_shift = h.cluster_bits + self.l2_bits
        # L2 entry bits that make a cluster anything but plain data (read fast path),
        # and the reserved / unaligned-offset bits that make a data entry malformed.
        self._l2_error_mask, self._l2_special_mask = entries.read_masks(h.cluster_size)
        self._l1_raw = self.hf.pread(h.l1_size * 8, h.l1_table_offset) if h.l1_size else b""

    def _open_data_file(self, data_file: str | None, force_share: bool) -> None:
        h = self.header
        self.has_data_file = h.has_data_file
        if h.has_data_file:
            self.data_hf, self.data_file_path = open_data_file(
                self.path, data_file or h.data_file, self._data_root, self.writable, force_share
            )

    # -- metadata ------------------------------------------------------------------
    @property
    def chain(self) -> list:
        out, img = [], self
        while img is not None:
            out.append(img)
            img = img.backing
        return out

    @property
    def backing_file(self) -> str | None:
        return self.header.backing_file

    def l2_table(self, l2_offset: int) -> array:
        """The L2 table at ``l2_offset`` (cached, native-order u64 array)."""
        t = self._l2_tables.get(l2_offset)
        if t is not None:
            self._l2_tables.move_to_end(l2_offset)
            return t
        t = entries.decode_u64_table(self.l2_table_bytes(l2_offset))
        self.l2_cache.put(l2_offset, t)
        return t

    def l2_table_bytes(self, l2_offset: int) -> bytes:
        """The L2 table at ``l2_offset`` as stored (big-endian), read past the cache."""
        cs = self.cluster_size
        if l2_offset % cs or l2_offset + cs > self.file_size:
            why = "unaligned" if l2_offset % cs else "beyond the end of the file"
            raise CorruptImageError(self.path, f"L2 table offset {l2_offset:#x} is {why}")
        if l2_offset == 0:
            raise CorruptImageError(self.path, "L2 table at offset 0 (overlaps the header)")
        return self.hf.pread(cs, l2_offset)

    def forget_cached_metadata(self) -> None:
        """Drop every cached table and derived fact (the file changed under them)."""
        self.l2_cache.clear()
        self._decomp_cache = None
        self._metadata_prealloc = None

    # -- refcounts (read-only view; allocation lives in refcount.py) -----------------
    @property
    def refcount_block_bits(self) -> int:
        """log2 of the number of entries in one refcount block."""
        return self.cluster_bits + 3 - self.header.refcount_order

    def refcount_block(self, table_index: int) -> entries.RefcountBlock | None:
        """Refcount block ``table_index`` as stored on disk (None: not allocated, all 0)."""
        from .refcount import read_refcount_block

        return read_refcount_block(self, table_index)

    def refcount(self, cluster_index: int) -> int:
        """Refcount of host cluster ``cluster_index`` as stored on disk (0 if none)."""
        bits = self.refcount_block_bits
        block = self.refcount_block(cluster_index >> bits)
        return block.get(cluster_index & ((1 << bits) - 1)) if block is not None else 0

    @property
    def metadata_preallocation(self) -> bool:
        """qemu's heuristic: does this look like a preallocation=metadata image? (cached)"""
        if self._metadata_prealloc is None:
            from .mapping import detect_metadata_preallocation

            self._metadata_prealloc = detect_metadata_preallocation(self)
        return self._metadata_prealloc

    # -- mapping -------------------------------------------------------------------
    def runs(self, guest_offset: int, length: int, l1=None) -> list[Run]:
        """Runs of this layer only over [guest_offset, guest_offset+length)."""
        from .mapping import layer_runs

        limit = self.data_hf.size() if self.has_data_file else self.file_size
        return layer_runs(self, self.l1 if l1 is None else l1, self.l2_table,
                          lambda host, e: self._check_host(host, limit, e), guest_offset, length)

    def _check_host(self, host: int, limit: int, entry: int) -> None:
        if entries.l2_malformed(entry, self.cluster_size):
            raise CorruptImageError(self.path, f"L2 entry {entry:#018x} is malformed (unaligned offset)")
        if not self.has_data_file and host + self.cluster_size > limit:
            if host >= limit:
                raise CorruptImageError(
                    self.path,
                    f"data cluster at host offset {host:#x} lies beyond the end of the file",
                )
        if not self.has_data_file and host == 0:
            raise CorruptImageError(self.path, "data cluster at host offset 0 (overlaps the header)")

    # -- reads -----------------------------------------------------------------------
    # The read path walks the live L1 and the cached L2 arrays on every call (the
    # writer edits those in place), so nothing decoded outlives one call.  Adjacent
    # clusters of one kind (data at consecutive host offsets, zeros, backing) are
    # coalesced so that a large read is a few preadv calls and zero fills.
    def read(self, offset: int | None = None, length: int | None = None) -> bytes:
        if length is None:  # libyal's read(size=None): at the libyal offset (pyqcow.libyal)
            return self.read_buffer(offset)
        check_range(self.path, offset, length, self.virtual_size)
        host = self._single_cluster_host(offset, length, self.l1)
        if host >= 0:
            data = os.pread(self.hf.fd, length, host)
            if len(data) == length:
                return data
            buf = bytearray(length)
            buf[: len(data)] = data
            self._short_read(memoryview(buf), len(data), host)
            return bytes(buf)
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def _single_cluster_host(self, offset: int, length: int, l1) -> int:
        """Host offset when [offset, offset+length) is inside one plain data cluster;
        _UNALLOCATED when it is inside one unallocated cluster; else -1."""
        cmask = self.cluster_size - 1
        if (offset & cmask) + length > cmask + 1 or self.extended_l2 or self.has_data_file:
            return -1
        l1_index = offset >> self._l2_shift
        if l1_index >= len(l1):
            return _UNALLOCATED
        l2_offset = l1[l1_index] & _L1_TABLE_MASK
        if not l2_offset:
            return _UNALLOCATED
        e = self.l2_table(l2_offset)[(offset >> self.cluster_bits) & (self.l2_entries - 1)]
        if not e:
            return _UNALLOCATED
        host = e & _L2E_OFFSET_MASK
        if e & self._l2_special_mask or not 0 < host < self.file_size:
            return -1
        return host + (offset & cmask)

    def readinto(self, buf, offset: int, l1=None) -> None:
        """Fill ``buf`` with guest data from ``offset`` (must lie inside the disk).

        ``l1`` reads through another L1 table (an internal snapshot's) instead.
        """
        mv = memoryview(buf).cast("B")
        length = len(mv)
        if not length:
            return
        if l1 is None:
            l1 = self.l1
        host = self._single_cluster_host(offset, length, l1)
        if host >= 0:
            got = os.preadv(self.hf.fd, [mv], host)
            if got < length:
                self._short_read(mv, got, host)
            return
        if host == _UNALLOCATED:
            self._read_backing(mv, offset)
            return
        if self.extended_l2:
            self._readinto_runs(mv, offset, l1)
        else:
            self._readinto_standard(mv, offset, l1)

    def _readinto_standard(self, mv: memoryview, offset: int, l1) -> None:
        """readinto for standard (64-bit) L2 entries, coalescing runs of one kind."""
        cb = self.cluster_bits
        cmask = self.cluster_size - 1
        l2_shift = self._l2_shift
        l2_mask = self.l2_entries - 1
        l1_len = len(l1)
        data_file = self.has_data_file
        limit = self.data_hf.size() if data_file else self.file_size
        v2 = self.header.version == 2
        error_mask = self._l2_error_mask
        l2_table = self.l2_table
        flush = self._flush_pending
        end = offset + len(mv)
        # pending run: kind (0 none), destination index, host offset, length
        pk = pd = ph = pl = 0
        pos = offset
        while pos < end:
            l1_index = pos >> l2_shift
            span_end = min((l1_index + 1) << l2_shift, end)
            l2_offset = l1[l1_index] & _L1_TABLE_MASK if l1_index < l1_len else 0
            if not l2_offset:
                d = pos - offset
                if pk == _BACKING and d == pd + pl:
                    pl += span_end - pos
                else:
                    if pk:
                        flush(mv, offset, pk, pd, ph, pl)
                    pk, pd, ph, pl = _BACKING, d, 0, span_end - pos
                pos = span_end
                continue
            table = l2_table(l2_offset)
            while pos < span_end:
                cl_end = min((pos | cmask) + 1, span_end)
                e = table[(pos >> cb) & l2_mask]
                host = e & _L2E_OFFSET_MASK
                h = 0
                if e & _COMPRESSED:
                    if pk:
                        flush(mv, offset, pk, pd, ph, pl)
                        pk = 0
                    data = self.decompress(e)
                    s = pos & cmask
                    mv[pos - offset : cl_end - offset] = memoryview(data)[s : s + cl_end - pos]
                    pos = cl_end
                    continue
                if e & _ZERO:
                    if host:
                        self._check_host(host, limit, e)
                        k = _ZEROS_KIND
                    else:
                        k = _BACKING if v2 else _ZEROS_KIND
                elif host or (data_file and e & _COPIED):
                    if e & error_mask or (not data_file and not 0 < host < limit):
                        self._check_host(host, limit, e)
                    k = _DATA
                    h = host + (pos & cmask)
                else:
                    k = _BACKING
                d = pos - offset
                if k == pk and d == pd + pl and (k != _DATA or h == ph + pl):
                    pl += cl_end - pos
                else:
                    if pk:
                        flush(mv, offset, pk, pd, ph, pl)
                    pk, pd, ph, pl = k, d, h, cl_end - pos
                pos = cl_end
        if pk:
            flush(mv, offset, pk, pd, ph, pl)

    def _flush_pending(self, mv: memoryview, offset: int, kind: int, d: int, h: int, n: int) -> None:
        dst = mv[d : d + n]
        if kind == _DATA:
            got = os.preadv(self.data_hf.fd, [dst], h)
            if got < n:
                self._short_read(dst, got, h)
        elif kind == _ZEROS_KIND:
            zero_fill(dst)
        else:
            self._read_backing(dst, offset + d)

    def _short_read(self, dst: memoryview, got: int, host: int) -> None:
        """Finish a data read that came back short: zeros past the end of the
        file, unless a read-only image's file was longer when it was opened (it
        shrank under us: QcowError, as the mmap-backed reader says).  A
        writable image's file_size runs ahead of the file until a flush."""
        self.data_hf.preadinto(dst[got:], host + got)
        if not self.writable and self.data_hf is self.hf and host + got < self.file_size:
            self.check_not_shrunk()

    def check_not_shrunk(self) -> None:
        """QcowError if the image file is now shorter than when it was opened."""
        size = self.hf.size()
        if size < self.file_size:
            raise QcowError(
                self.path,
                f"the file shrank to {size} bytes while being read "
                f"(it had {self.file_size} bytes when opened)",
            )

    def _readinto_runs(self, mv: memoryview, offset: int, l1) -> None:
        """readinto through runs() (extended L2 entries: subclusters)."""
        for run in self.runs(offset, len(mv), l1=l1):
            a = run.guest_offset - offset
            dst = mv[a : a + run.length]
            t = run.type
            if t == ClusterType.NORMAL:
                self.data_hf.preadinto(dst, run.host_offset)
            elif t in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
                zero_fill(dst)
            elif t == ClusterType.COMPRESSED:
                cluster_start = (run.guest_offset >> self.cluster_bits) << self.cluster_bits
                data = self.decompress(run.entry)
                s = run.guest_offset - cluster_start
                dst[:] = memoryview(data)[s : s + run.length]
            else:
                self._read_backing(dst, run.guest_offset)

    def _read_backing(self, dst: memoryview, guest_offset: int) -> None:
        b = self.backing
        n = len(dst)
        if b is None:
            zero_fill(dst)
            return
        inside = max(0, min(n, b.virtual_size - guest_offset))
        if inside:
            b.readinto(dst[:inside], guest_offset)
        if inside < n:
            zero_fill(dst[inside:])

    def guest_map(self):
        """The mmap-backed C reader of this image (pyqcow.guestmap.GuestMap),
        made on first use and kept until close; None when it cannot serve this
        image: the Python backend, a writable image, extended L2 entries, an
        external data file, a host that is not a plain file."""
        gm = self._gmap
        if gm is None:
            gm = self._gmap = self._make_guest_map() or False
        return gm if gm and gm.ctx is not None else None

    def _make_guest_map(self):
        from . import fastcopy, guestmap

        if (
            self._closed
            or self.writable
            or self.extended_l2
            or self.has_data_file
            or not isinstance(self.hf, HostFile)
            or fastcopy.current_backend() != "native"
        ):
            return None
        b = self.backing
        bmap = b.guest_map() if isinstance(b, QcowImage) else None
        return guestmap.map_image(self.hf.fd, self.file_size, self.cluster_bits,
                                  self.header.version, self.virtual_size, self.l1,
                                  backing=bmap, has_backing=b is not None, owner=self)

    def _map_fallback_into(self, buf, n: int, offset: int) -> None:
        """What the C reads leave to Python (GuestMap.fast): compressed, ..."""
        self.readinto(memoryview(buf).cast("B")[:n], offset)

    def _map_error(self, rc: int) -> None:
        """Raise for a C read's -errno; -EFAULT: SIGBUS, the file shrank."""
        if rc == -errno.EFAULT:
            self.check_not_shrunk()
        raise QcowError(self.path, f"read failed: {os.strerror(-rc)}")

    def map(self, start: int = 0, length: int | None = None) -> list:
        """qemu-img map's extents (pyqcow.mapping.Extent) through the backing chain."""
        from .mapping import chain_status

        return chain_status(self, start, length)

    # -- forensic views (pyqcow/reader.py, pyqcow/snapshot_view.py) --------------------
    def reader(self):
        """A read-only, seekable io.RawIOBase over the guest disk."""
        from .reader import GuestReader

        return GuestReader(self)

    @property
    def snapshots(self) -> list:
        """The internal snapshot table (list of SnapshotInfo)."""
        from .snapshot_table import read_snapshot_table

        return read_snapshot_table(self)

    def snapshot(self, name_or_id: str):
        """A read-only view of internal snapshot ``name_or_id`` (ID first, then name)."""
        from .snapshot_view import open_snapshot

        return open_snapshot(self, name_or_id)

    def decompress(self, entry: int) -> bytes:
        """Decompressed contents of the cluster that compressed L2 ``entry`` describes."""
        c = self._decomp_cache
        if c is not None and c[0] == entry:
            return c[1]
        from .compressed import read_compressed_cluster  # zlib: on first use

        data = read_compressed_cluster(self, entry)
        self._decomp_cache = (entry, data)
        return data

    # -- writes: delegated to the composed writer (pyqcow/writer.py; guest writes in
    # guestwrite.py, resize/shrink/make_empty/set_backing in reshape.py) ------------
    def write(self, offset: int, data) -> None:
        self.writer.write(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self.writer.write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        self.writer.discard(offset, length)

    def write_compressed(self, guest_offset: int, data) -> None:
        self.writer.write_compressed(guest_offset, data)

    def flush(self) -> None:
        self.writer.flush()

    def resize(self, new_size: int) -> None:
        self.writer.resize(new_size)

    def shrink(self, new_size: int) -> None:
        self.writer.shrink(new_size)

    def prepare_write(self, offset: int, length: int):
        """Private host clusters for a cluster-aligned range: a PreparedWrite
        (pyqcow.writer) of (guest_offset, host_offset, length) runs to fill."""
        return self.writer.prepare_write(offset, length)

    def make_empty(self) -> None:
        self.writer.make_empty()

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        self.writer.set_backing(name, fmt)

    def bitmaps(self) -> list:
        return self.writer.list_bitmaps()

    # the metadata door (pyqcow/writer.py): the only writers of the header, the
    # active L1 and the refcount table
    def switch_header(self, new=None, /, **fields):
        return self.writer.switch_header(new, **fields)

    def write_new_clusters(self, data) -> int:
        return self.writer.write_new_clusters(data)

    def replace_active_l1(self, table: array, **fields) -> tuple[int, int]:
        return self.writer.replace_active_l1(table, **fields)

    def write_l1_entry(self, l1_index: int, value: int) -> None:
        self.writer.write_l1_entry(l1_index, value)

    def update_l1_entries(self, changes) -> None:
        self.writer.update_l1_entries(changes)

    def write_refcount_table(self, table_offset: int, data) -> None:
        self.writer.write_refcount_table(table_offset, data)

    def reload(self) -> None:
        self.writer.reload()

    #: the writer's refcounts (pyqcow.refcount.Refcounts; None when read-only)
    refcounts = _to_writer("refcounts")

    @property
    def dirty_l2(self) -> set:
        """Host offsets of the L2 tables changed in memory (the cache's dirty set)."""
        return self.l2_cache.dirty


    # -- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gmap:
            self._gmap.close()
        try:
            writer = self.__dict__.get("writer")  # never made: nothing to write
            if writer is not None:
                writer.flush()
                writer.store_bitmaps()
        finally:
            if self.backing is not None:
                self.backing.close()
            if self.data_hf is not self.hf:
                self.data_hf.close()
            self.hf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<QcowImage {self.path!r} v{self.header.version} size={self.virtual_size}>"
