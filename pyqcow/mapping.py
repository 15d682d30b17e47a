"""Guest-to-host mapping as data: runs of one layer, and chain-wide status.

``Run`` describes a guest byte range of one image layer.  ``chain_status`` walks a
backing chain the way ``qemu-img map`` does and yields ``Extent``s with the same
fields and merging as its JSON output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .entries import ClusterType
from .errors import QcowError

ALLOCATED_TYPES = (
    ClusterType.NORMAL,
    ClusterType.ZERO_PLAIN,
    ClusterType.ZERO_ALLOC,
    ClusterType.COMPRESSED,
)
UNALLOCATED_TYPES = (ClusterType.UNALLOCATED, ClusterType.UNALLOCATED_ALLOC)
ZERO_TYPES = (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC)


@dataclass(slots=True)
class Run:
    guest_offset: int
    length: int
    type: ClusterType
    host_offset: int | None = None  # NORMAL / ZERO_ALLOC: byte offset in the data file
    entry: int = 0  # COMPRESSED: the raw L2 entry
    file_zero: bool = False  # NORMAL in a hole of the host file (metadata preallocation)

    @property
    def allocated(self) -> bool:
        return self.type in ALLOCATED_TYPES

    @property
    def end(self) -> int:
        return self.guest_offset + self.length


@dataclass(slots=True)
class Extent:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    filename: str | None = None

    def as_json(self) -> dict:
        d = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        return d

    def mergeable(self, nxt: Extent) -> bool:
        if (self.depth, self.present, self.zero, self.data) != (
            nxt.depth,
            nxt.present,
            nxt.zero,
            nxt.data,
        ):
            return False
        if (self.offset is None) != (nxt.offset is None) or self.filename != nxt.filename:
            return False
        if self.offset is not None and self.offset + self.length != nxt.offset:
            return False
        return self.start + self.length == nxt.start


def merge_runs(runs: list[Run]) -> list[Run]:
    out: list[Run] = []
    for r in runs:
        if out:
            p = out[-1]
            if (
                p.type == r.type
                and p.end == r.guest_offset
                and p.type != ClusterType.COMPRESSED
                and p.file_zero == r.file_zero
                and (
                    (p.host_offset is None and r.host_offset is None)
                    or (
                        p.host_offset is not None
                        and r.host_offset is not None
                        and p.host_offset + p.length == r.host_offset
                    )
                )
            ):
                p.length += r.length
                continue
        out.append(r)
    return out


def _data_filename(img) -> str:
    return getattr(img, "data_file_path", None) or img.path


def _layer_extents(img, start: int, length: int, depth: int) -> list[Extent]:
    out: list[Extent] = []
    size = img.virtual_size
    if start >= size:
        return [Extent(start, length, max(depth - 1, 0) if depth else 0, False, True, False)]
    fname = _data_filename(img)
    for run in img.runs(start, min(length, size - start)):
        t = run.type
        if t in UNALLOCATED_TYPES:
            # An unallocated subcluster of an allocated cluster keeps its host
            # offset (qemu: OFFSET_VALID without DATA/ZERO).
            host = run.host_offset
            backing = img.backing
            if backing is None:
                out.append(
                    Extent(run.guest_offset, run.length, depth, False, True, False, host,
                           fname if host is not None else None)
                )
                continue
            bsize = backing.virtual_size
            inside = max(0, min(run.end, bsize) - run.guest_offset)
            if inside:
                out.extend(_layer_extents(backing, run.guest_offset, inside, depth + 1))
            if inside < run.length:
                out.append(
                    Extent(run.guest_offset + inside, run.length - inside, depth, False, True, False,
                           host + inside if host is not None else None,
                           fname if host is not None else None)
                )
        elif t == ClusterType.NORMAL:
            if getattr(img, "format", None) == "qcow2" and img.metadata_preallocation:
                # qemu (BDRV_BLOCK_RECURSE): data clusters of a metadata-preallocated
                # image ask the host file, whose holes read as zeros.
                out.extend(_file_extents(img, run, depth, fname))
            else:
                out.append(
                    Extent(run.guest_offset, run.length, depth, True, run.file_zero, True,
                           run.host_offset, fname)
                )
        elif t == ClusterType.COMPRESSED:
            out.append(Extent(run.guest_offset, run.length, depth, True, False, True))
        else:  # zero
            out.append(
                Extent(run.guest_offset, run.length, depth, True, True, False, run.host_offset,
                       fname if run.host_offset is not None else None)
            )
    if start + length > size:
        out.append(Extent(size, start + length - size, depth, False, True, False))
    return out


def _file_extents(img, run: Run, depth: int, fname: str) -> list[Extent]:
    host = run.host_offset
    out = []
    for off, ln, is_data in img.data_hf.data_extents(host, host + run.length):
        out.append(
            Extent(run.guest_offset + (off - host), ln, depth, True, not is_data, True, off, fname)
        )
    return out


def detect_metadata_preallocation(img) -> bool:
    """qemu's qcow2_detect_metadata_preallocation (block/qcow2-refcount.c).

    Count host clusters with a non-zero refcount over the file's length; the
    image counts as metadata-preallocated once that count reaches
    max(real_clusters * 10 / 9, real_clusters + 2), where real_clusters are the
    clusters the host file really occupies.  Errors mean "no", as in qemu.
    """
    cs = img.cluster_size
    try:
        file_length = img.hf.size()
        real_clusters = os.fstat(img.hf.fd).st_blocks * 512 // cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = (file_length + cs - 1) // cs
        bits = img.refcount_block_bits
        per_block = 1 << bits
        count = 0
        for table_index in range((end_cluster + per_block - 1) // per_block):
            block = img.refcount_block(table_index)
            if block is None:
                continue
            count += block.count_nonzero(end_cluster - (table_index << bits))
            if count >= threshold:
                return True
        return False
    except (QcowError, OSError):
        return False


def chain_status(img, start: int = 0, length: int | None = None) -> list[Extent]:
    """qemu-img map's view: merged extents over [start, start+length)."""
    if length is None:
        length = img.virtual_size - start
    length = max(0, min(length, img.virtual_size - start))
    merged: list[Extent] = []
    for e in _layer_extents(img, start, length, 0):
        if e.length == 0:
            continue
        if merged and merged[-1].mergeable(e):
            merged[-1].length += e.length
        else:
            merged.append(e)
    return merged


def allocated_bytes(img, start: int = 0, length: int | None = None) -> int:
    """Bytes that this layer alone allocates (data, zero or compressed)."""
    if length is None:
        length = img.virtual_size - start
    return sum(r.length for r in img.runs(start, length) if r.allocated)
