"""QcowImage: open a qcow2 file, read guest data through the backing chain.

Writes live in writer.py (a mixin) so this module stays the read engine.
"""

from __future__ import annotations

import os
import warnings
import zlib
from array import array
from collections import OrderedDict

from . import entries, spec
from .entries import ClusterType
from .errors import (
    BackingChainError,
    CorruptImageError,
    FormatError,
    QcowError,
    UnsupportedFeatureError,
)
from .header import Header, parse_header
from .hostfile import LOCK_READ, LOCK_WRITE, HostFile, check_range
from .libyal_methods import LibyalMethods
from .mapping import Run, detect_metadata_preallocation, merge_runs
from .writer import WriterMixin

L2_CACHE_TABLES = 64

_L2E_OFFSET_MASK = spec.L2E_OFFSET_MASK
_COMPRESSED = spec.QCOW_OFLAG_COMPRESSED
_COPIED = spec.QCOW_OFLAG_COPIED
_ZERO = spec.QCOW_OFLAG_ZERO
# kinds of a coalesced run in readinto
_DATA, _ZEROS_KIND, _BACKING = 1, 2, 3
_UNALLOCATED = -2  # _single_cluster_host: the range reads from the backing file (or zeros)
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


class QcowImage(WriterMixin, LibyalMethods):
    format = "qcow2"

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
        self._l2_cache: OrderedDict[int, array] = OrderedDict()
        self._decomp_cache: tuple[int, bytes] | None = None
        self._metadata_prealloc: bool | None = None
        self._gmap = None  # fastcopy.GuestMap once made; False: not mappable
        self._init_writer()

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
        self._l2_error_mask = (spec.L2E_RESERVED_MASK & ~1) | (
            spec.L2E_OFFSET_MASK & (h.cluster_size - 1)
        )
        self._l2_special_mask = self._l2_error_mask | spec.QCOW_OFLAG_COMPRESSED | spec.QCOW_OFLAG_ZERO
        raw = self.hf.pread(h.l1_size * 8, h.l1_table_offset) if h.l1_size else b""
        self.l1 = entries.decode_u64_table(raw)

    def _open_data_file(self, data_file: str | None, force_share: bool) -> None:
        h = self.header
        self.has_data_file = h.has_data_file
        if not h.has_data_file:
            return
        name = data_file or h.data_file
        if not name:
            raise FormatError(self.path, "image needs an external data file but names none")
        full = name if os.path.isabs(name) else os.path.join(os.path.dirname(self.path), name)
        root = getattr(self, "_data_root", None)
        if root is not None:
            from .chain import _inside

            if not _inside(full, root):
                raise BackingChainError(
                    self.path, f"external data file {name!r} lies outside the allowed directory {root}"
                )
        try:
            self.data_hf = HostFile(full, writable=self.writable)
        except QcowError as e:
            raise QcowError(self.path, f"external data file {name!r}: {e.message}") from None
        if not force_share:
            try:
                self.data_hf.lock(LOCK_WRITE if self.writable else LOCK_READ)
            except BaseException:
                self.data_hf.close()
                raise
        self.data_file_path = full

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
        t = self._l2_cache.get(l2_offset)
        if t is not None:
            self._l2_cache.move_to_end(l2_offset)
            return t
        if l2_offset % self.cluster_size or l2_offset + self.cluster_size > self.file_size:
            raise CorruptImageError(
                self.path,
                f"L2 table offset {l2_offset:#x} is "
                + ("unaligned" if l2_offset % self.cluster_size else "beyond the end of the file"),
            )
        if l2_offset == 0:
            raise CorruptImageError(self.path, "L2 table at offset 0 (overlaps the header)")
        t = entries.decode_u64_table(self.hf.pread(self.cluster_size, l2_offset))
        self._l2_cache[l2_offset] = t
        if len(self._l2_cache) > L2_CACHE_TABLES:
            self._evict_l2()
        return t

    # -- refcounts (read-only view; allocation lives in refcount.py) -----------------
    @property
    def refcount_block_bits(self) -> int:
        """log2 of the number of entries in one refcount block."""
        return self.cluster_bits + 3 - self.header.refcount_order

    def refcount_block(self, table_index: int) -> entries.RefcountBlock | None:
        """Refcount block ``table_index`` as stored on disk (None: not allocated, all 0)."""
        h = self.header
        if table_index < 0 or table_index >= h.refcount_table_clusters * self.cluster_size // 8:
            return None
        raw = self.hf.pread(8, h.refcount_table_offset + table_index * 8)
        block_offset = int.from_bytes(raw, "big") & spec.REFT_OFFSET_MASK
        if not block_offset:
            return None
        if block_offset % self.cluster_size or block_offset + self.cluster_size > self.file_size:
            raise CorruptImageError(
                self.path,
                f"refcount block offset {block_offset:#x} (refcount table index {table_index}) is "
                + ("unaligned" if block_offset % self.cluster_size else "beyond the end of the file"),
            )
        data = self.hf.pread(self.cluster_size, block_offset)
        return entries.RefcountBlock(data, h.refcount_order)

    def refcount(self, cluster_index: int) -> int:
        """Refcount of host cluster ``cluster_index`` as stored on disk (0 if none)."""
        bits = self.refcount_block_bits
        block = self.refcount_block(cluster_index >> bits)
        return block.get(cluster_index & ((1 << bits) - 1)) if block is not None else 0

    @property
    def metadata_preallocation(self) -> bool:
        """qemu's heuristic: does this look like a preallocation=metadata image? (cached)"""
        if self._metadata_prealloc is None:
            self._metadata_prealloc = detect_metadata_preallocation(self)
        return self._metadata_prealloc

    # -- mapping -------------------------------------------------------------------
    def runs(self, guest_offset: int, length: int, l1=None) -> list[Run]:
        """Runs of this layer only over [guest_offset, guest_offset+length)."""
        if l1 is None:
            l1 = self.l1
        out: list[Run] = []
        cb = self.cluster_bits
        cs = self.cluster_size
        end = guest_offset + length
        pos = guest_offset
        data_file = self.has_data_file
        limit = self.data_hf.size() if data_file else self.file_size
        while pos < end:
            cluster = pos >> cb
            l1_index = cluster >> self.l2_bits
            l2_span_end = min(end, (l1_index + 1) << (self.l2_bits + cb))
            l1e = l1[l1_index] if l1_index < len(l1) else 0
            l2_offset = l1e & spec.L1E_OFFSET_MASK
            if not l2_offset:
                # one run for all the all-zero L1 entries that follow (sparse disks)
                last = min(len(l1), ((end - 1) >> (self.l2_bits + cb)) + 1)
                if l1_index + 1 < last:
                    tail = l1[l1_index + 1 : last].tobytes()
                    l1_index += (len(tail) - len(tail.lstrip(b"\0"))) // 8
                    l2_span_end = min(end, (l1_index + 1) << (self.l2_bits + cb))
                out.append(Run(pos, l2_span_end - pos, ClusterType.UNALLOCATED))
                pos = l2_span_end
                continue
            table = self.l2_table(l2_offset)
            entry_words = 2 if self.extended_l2 else 1
            while pos < l2_span_end:
                cluster = pos >> cb
                l2_index = cluster & (self.l2_entries - 1)
                in_cluster = pos & (cs - 1)
                cl_end = min(l2_span_end, (cluster + 1) << cb)
                first = entry_words * l2_index
                if not table[first] and not table[first + entry_words - 1]:
                    # skip a run of all-zero (unallocated) entries in one step
                    stop = (((l2_span_end - 1) >> cb) & (self.l2_entries - 1)) + 1
                    seg = table[entry_words * l2_index : entry_words * stop].tobytes()
                    count = (len(seg) - len(seg.lstrip(b"\0"))) // (8 * entry_words)
                    run_end = min(l2_span_end, (cluster + count) << cb)
                    out.append(Run(pos, run_end - pos, ClusterType.UNALLOCATED))
                    pos = run_end
                    continue
                if self.extended_l2:
                    e = table[2 * l2_index]
                    bm = table[2 * l2_index + 1]
                    self._decode_extended(out, pos, cl_end, cluster, e, bm, limit)
                else:
                    e = table[l2_index]
                    t = entries.l2_type(e, data_file)
                    if t == ClusterType.COMPRESSED:
                        out.append(Run(pos, cl_end - pos, t, None, e))
                    elif t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                        host = e & spec.L2E_OFFSET_MASK
                        self._check_host(host, limit, e)
                        # a stretch of entries whose host clusters follow each other
                        # (equal flags, offsets one cluster apart) is one run: compare
                        # raw entries, check only the last host (the largest)
                        last_index = ((l2_span_end - 1) >> cb) & (self.l2_entries - 1)
                        j = l2_index + 1
                        expect = e + cs
                        while j <= last_index and table[j] == expect:
                            j += 1
                            expect += cs
                        if j > l2_index + 1:
                            self._check_host((expect - cs) & spec.L2E_OFFSET_MASK, limit,
                                             expect - cs)
                            cl_end = min(l2_span_end, (cluster + j - l2_index) << cb)
                        out.append(Run(pos, cl_end - pos, t, host + in_cluster))
                    else:
                        if self.header.version == 2 and t == ClusterType.ZERO_PLAIN:
                            t = ClusterType.UNALLOCATED
                        out.append(Run(pos, cl_end - pos, t))
                pos = cl_end
        return merge_runs(out)

    def _check_host(self, host: int, limit: int, entry: int) -> None:
        if host & (self.cluster_size - 1) or entry & spec.L2E_RESERVED_MASK & ~1:
            raise CorruptImageError(self.path, f"L2 entry {entry:#018x} is malformed (unaligned offset)")
        if not self.has_data_file and host + self.cluster_size > limit:
            if host >= limit:
                raise CorruptImageError(
                    self.path,
                    f"data cluster at host offset {host:#x} lies beyond the end of the file",
                )
        if not self.has_data_file and host == 0:
            raise CorruptImageError(self.path, "data cluster at host offset 0 (overlaps the header)")

    def _decode_extended(self, out, pos, cl_end, cluster, e, bm, limit) -> None:
        cb = self.cluster_bits
        if e & spec.QCOW_OFLAG_COMPRESSED:
            out.append(Run(pos, cl_end - pos, ClusterType.COMPRESSED, None, e))
            return
        if not entries.extended_bitmap_valid(e, bm, self.has_data_file):
            raise CorruptImageError(
                self.path, f"invalid extended L2 entry for guest cluster {cluster} ({e:#x}/{bm:#x})"
            )
        host = e & spec.L2E_OFFSET_MASK
        if host:
            self._check_host(host, limit, e)
        scb = self.subcluster_bits
        base = cluster << cb
        while pos < cl_end:
            sc = (pos - base) >> scb
            sc_end = min(cl_end, base + ((sc + 1) << scb))
            t = entries.subcluster_type(e, bm, sc, self.has_data_file)
            if t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC, ClusterType.UNALLOCATED_ALLOC):
                # UNALLOCATED_ALLOC keeps its host offset too: qemu reports it
                # ("offset" of a present: false subcluster) when nothing is below.
                h = host + (pos - base) if (host or self.has_data_file) else None
                out.append(Run(pos, sc_end - pos, t, h))
            else:
                out.append(Run(pos, sc_end - pos, t))
            pos = sc_end

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
        l2_offset = l1[l1_index] & spec.L1E_OFFSET_MASK
        if not l2_offset:
            return _UNALLOCATED
        e = self.l2_table(l2_offset)[(offset >> self.cluster_bits) & (self.l2_entries - 1)]
        if not e:
            return _UNALLOCATED
        host = e & spec.L2E_OFFSET_MASK
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
            l2_offset = l1[l1_index] & spec.L1E_OFFSET_MASK if l1_index < l1_len else 0
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
        """The mmap-backed C reader of this image (pyqcow.fastcopy.GuestMap),
        made on first use and kept until close; None when it cannot serve this
        image: the Python backend, a writable image, extended L2 entries, an
        external data file, a host that is not a plain file."""
        gm = self._gmap
        if gm is None:
            gm = self._gmap = self._make_guest_map() or False
        return gm if gm and gm.ctx is not None else None

    def _make_guest_map(self):
        from . import fastcopy

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
        return fastcopy.map_image(
            self.hf.fd,
            self.file_size,
            self.cluster_bits,
            self.header.version,
            self.virtual_size,
            self.l1,
            backing=bmap,
            has_backing=b is not None,
        )

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
        host, nbytes = entries.decode_compressed(entry, self.cluster_bits)
        if host >= self.file_size or host == 0:
            raise CorruptImageError(
                self.path, f"compressed cluster at host offset {host:#x} lies beyond the end of the file"
            )
        raw = self.hf.pread(nbytes, host)
        cs = self.cluster_size
        try:
            if self.header.compression_type == spec.CompressionType.ZSTD:
                data = _zstd_decompress(raw, cs)
            else:
                d = zlib.decompressobj(-15)
                data = d.decompress(raw, cs)
        except Exception as e:
            raise CorruptImageError(
                self.path, f"compressed cluster at host offset {host:#x} cannot be decompressed: {e}"
            ) from e
        if len(data) < cs:
            raise CorruptImageError(
                self.path, f"compressed cluster at host offset {host:#x} is truncated"
            )
        if len(data) > cs:  # only zstd reads one byte past the cluster to tell
            raise CorruptImageError(
                self.path,
                f"compressed cluster at host offset {host:#x} decompresses to more than "
                f"one cluster ({cs} bytes)",
            )
        self._decomp_cache = (entry, data)
        return data

    # -- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gmap:
            self._gmap.close()
        try:
            self.flush()
            self._store_bitmaps()
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


#: Largest zstd window accepted (a frame header may ask for up to 2 GiB; qemu's
#: clusters are at most 2 MiB and its default level uses a window of 2 MiB at most).
ZSTD_MAX_WINDOW = 32 << 20


def _zstd_decompress(raw: bytes, cluster_size: int) -> bytes:
    """At most ``cluster_size + 1`` bytes of the first zstd frame in ``raw``.

    The output is bounded whatever the frame claims (a 16 KiB frame can expand to
    gigabytes); one byte more than a cluster tells the caller the frame is too long.
    """
    try:
        import zstandard
    except ImportError as e:  # pragma: no cover - zstandard is a dependency
        raise UnsupportedFeatureError(None, "zstd compression needs the zstandard package") from e
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    want = cluster_size + 1
    parts = []
    got = 0
    # read_to_iter yields the output in pieces of at most ``want`` bytes, lazily, and
    # stops at the end of the frame (the sector padding after it is never decoded)
    for chunk in dctx.read_to_iter(raw, write_size=want):
        parts.append(chunk)
        got += len(chunk)
        if got >= want:
            break
    return b"".join(parts)[:want]
