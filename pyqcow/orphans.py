"""Orphans: clusters of a qcow2 file that nothing references (``pyqcow orphans``).

``find_orphans(img)`` counts the references into each host cluster (the
records of ``pyqcow.walk``) and compares them with the stored refcounts:
clusters inside the file that nothing references and that hold bytes (left
behind by discards, snapshot deletion, crashes) are orphans (refcount 0) or
leaks (refcount non-zero), each with a hint of what it looks like.
``extract_regions`` writes them to files.  Everything here only reads the image.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass

from .errors import OperationError, QcowError
from .walk import ReferenceWalk, walk_references

__all__ = [
    "ClusterRegion",
    "OrphanReport",
    "cluster_count",
    "describe_bytes",
    "extract_regions",
    "find_orphans",
    "reference_counts",
    "stored_refcounts",
]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PRINTABLE = bytes(range(0x20, 0x7F)) + b"\t\n\r\f\v"


def cluster_count(img) -> int:
    """Number of host clusters the image file spans (the last may be partial)."""
    return (img.file_size + img.cluster_size - 1) >> img.cluster_bits


def reference_counts(img, walk: ReferenceWalk) -> array:
    """How many references point into each host cluster of the image file."""
    n = cluster_count(img)
    counts = array("L", bytes(array("L").itemsize * n))
    cb = img.cluster_bits
    for r in walk.references:
        if r.in_data_file or r.length <= 0:
            continue
        first = r.host_offset >> cb
        last = (r.host_offset + r.length - 1) >> cb
        if last >= n:
            walk.errors.append(
                f"{r.owner}: {r.kind} at {r.host_offset:#x} (+{r.length}) reaches past the end "
                "of the file"
            )
            last = n - 1
        for c in range(first, last + 1):
            counts[c] += 1
    return counts


def stored_refcounts(img) -> array:
    """Refcount of each host cluster of the image file, as the refcount blocks say."""
    n = cluster_count(img)
    out = array("Q", bytes(8 * n))
    bits = img.refcount_block_bits
    per_block = 1 << bits
    for table_index in range((n + per_block - 1) >> bits):
        try:
            block = img.refcount_block(table_index)
        except QcowError:
            continue
        if block is None:
            continue
        base = table_index << bits
        values = block.values()[: n - base]
        out[base : base + len(values)] = array("Q", values)
    return out



@dataclass
class ClusterRegion:
    """Contiguous host clusters nothing references (orphan: refcount 0, leak: > 0)."""

    host_offset: int
    length: int
    category: str  # "orphan" or "leak"
    hint: str
    entropy: float  # bits per byte (Shannon, estimated on a sample)
    refcount: int = 0
    detail: str | None = None
    file_name: str | None = None  # set by extract_regions

    def as_json(self) -> dict:
        d = {
            "host_offset": self.host_offset,
            "length": self.length,
            "hint": self.hint,
            "entropy": round(self.entropy, 3),
            "refcount": self.refcount,
        }
        if self.detail:
            d["detail"] = self.detail
        if self.file_name:
            d["file"] = self.file_name
        return d


@dataclass
class OrphanReport:
    path: str
    cluster_size: int
    file_size: int
    orphans: list[ClusterRegion]
    leaks: list[ClusterRegion]
    errors: list[str]
    dirty: bool = False

    def as_json(self) -> dict:
        return {
            "filename": self.path,
            "cluster_size": self.cluster_size,
            "file_size": self.file_size,
            "dirty": self.dirty,
            "orphans": [r.as_json() for r in self.orphans],
            "orphan_bytes": sum(r.length for r in self.orphans),
            "leaks": [r.as_json() for r in self.leaks],
            "leaked_clusters": sum(
                (r.length + self.cluster_size - 1) // self.cluster_size for r in self.leaks
            ),
            "errors": self.errors,
        }


def _entropy(sample: bytes) -> float:
    if not sample:
        return 0.0
    n = len(sample)
    return max(0.0, -sum(c / n * math.log2(c / n) for c in Counter(sample).values()))


def _deflate_size(data: bytes) -> int | None:
    """Bytes a raw deflate stream at the start of ``data`` decompresses to, or None."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data[: 1 << 16], 1 << 22)
    except zlib.error:
        return None
    # A real stream ends inside the data (qcow2 pads it with zeros or packs the
    # next cluster's stream behind it); a fill pattern can "decode" to the end.
    consumed = min(len(data), 1 << 16) - len(d.unused_data)
    if d.eof and len(out) >= 512 and len(out) > consumed and consumed + 16 <= len(data):
        return len(out)
    return None


def describe_bytes(data: bytes) -> tuple[str, float, str | None]:
    """(hint, entropy in bits/byte, detail) for a block of host bytes.

    hint: "all-zero", "fill pattern" (one byte repeated), "zstd frame", "zlib raw
    deflate stream" (qcow2's two compressed cluster formats), "text", "high
    entropy" (random, encrypted or compressed data) or "binary".
    """
    stripped = data.rstrip(b"\x00")
    if not stripped:
        return "all-zero", 0.0, None
    if stripped.count(stripped[:1]) == len(stripped):
        return "fill pattern", 0.0, f"byte {stripped[0]:#04x} x {len(stripped)}"
    sample = stripped[: 1 << 14]
    entropy = _entropy(sample)
    zpos = data.find(_ZSTD_MAGIC)
    if zpos == 0 or (zpos > 0 and not data[:zpos].strip(b"\x00")):
        return "zstd frame", entropy, f"zstd magic at +{zpos}"
    size = _deflate_size(data)
    if size is not None:
        return "zlib raw deflate stream", entropy, f"decompresses to {size} bytes"
    if len(stripped.translate(None, _PRINTABLE)) <= len(stripped) // 50:
        text = stripped[:60].decode("ascii", "replace")
        return "text", entropy, "starts " + repr(text)
    if entropy >= 7.2:
        return "high entropy", entropy, "random, encrypted or compressed data"
    return "binary", entropy, None


def find_orphans(img) -> OrphanReport:
    """Unreferenced clusters of ``img`` (a QcowImage): orphans (refcount 0 holding
    non-zero bytes) and leaks (refcount > 0), each with a hint of its content."""
    if getattr(img, "format", None) != "qcow2":
        raise OperationError(img.path, "not a qcow2 image: it has no host clusters to examine")
    walk = walk_references(img)
    counts = reference_counts(img, walk)
    stored = stored_refcounts(img)
    cs = img.cluster_size
    cb = img.cluster_bits
    file_size = img.file_size
    n = len(counts)
    # candidate runs: unreferenced clusters
    classified: list[tuple[int, str, int, str, float, str | None]] = []
    data_runs = img.hf.data_extents(0, file_size)
    holes = [(off, off + ln) for off, ln, is_data in data_runs if not is_data]
    hole_index = 0
    for c in range(n):
        if counts[c]:
            continue
        off = c << cb
        length = min(cs, file_size - off)
        rc = stored[c]
        # a cluster entirely inside a hole of the host file reads as zeros
        while hole_index < len(holes) and holes[hole_index][1] <= off:
            hole_index += 1
        in_hole = hole_index < len(holes) and holes[hole_index][0] <= off and \
            holes[hole_index][1] >= off + length
        if in_hole:
            if rc:
                classified.append((c, "leak", rc, "all-zero", 0.0, "hole in the host file"))
            continue
        data = img.hf.pread(length, off)
        hint, entropy, detail = describe_bytes(data)
        if hint == "all-zero" and not rc:
            continue
        classified.append((c, "leak" if rc else "orphan", rc, hint, entropy, detail))
    orphans: list[ClusterRegion] = []
    leaks: list[ClusterRegion] = []
    prev = None
    for c, category, rc, hint, entropy, detail in classified:
        off = c << cb
        length = min(cs, file_size - off)
        target = leaks if category == "leak" else orphans
        if (
            prev is not None
            and prev[0] == c - 1
            and prev[1] == category
            and target
            and target[-1].hint == hint
            and target[-1].refcount == rc
            and hint not in ("zstd frame", "zlib raw deflate stream")
            and (hint != "fill pattern" or (target[-1].detail or "")[:9] == (detail or "")[:9])
        ):
            region = target[-1]
            k = region.length // cs
            region.entropy = (region.entropy * k + entropy) / (k + 1)
            region.length += length
            if hint == "fill pattern":
                region.detail = f"{region.detail[:9]} x {region.length}"
        else:
            target.append(ClusterRegion(off, length, category, hint, entropy, rc, detail))
        prev = (c, category)
    return OrphanReport(img.path, cs, file_size, orphans, leaks, walk.errors, img.header.dirty)


def extract_regions(img, report: OrphanReport, directory: str | os.PathLike) -> list[str]:
    """Write every orphan and every non-zero leak to ``directory``; return the paths.

    File names carry the host offset: ``orphan-0x000000050000.bin``.
    """
    os.makedirs(directory, exist_ok=True)
    written = []
    for region in report.orphans + report.leaks:
        if region.hint == "all-zero":
            continue
        name = f"{region.category}-0x{region.host_offset:012x}.bin"
        path = os.path.join(os.fspath(directory), name)
        data = img.hf.pread(region.length, region.host_offset)
        _write_extract(path, data)
        region.file_name = name
        written.append(path)
    return written


def _write_extract(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (a new or regular file), never through a symlink."""
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644
        )
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OperationError(
                path, "is a symbolic link; refusing to write an extracted region through it"
            ) from None
        raise OSError(e.errno, e.strerror, path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OperationError(path, "exists and is not a regular file; refusing to write it")
        os.ftruncate(fd, 0)
        mv = memoryview(data)
        while mv:
            n = os.write(fd, mv)
            if n <= 0:
                raise OSError(errno.ENOSPC, "write wrote nothing (device full?)", path)
            mv = mv[n:]
    finally:
        os.close(fd)
