"""A registry of qcow2 image "shapes" built with qemu-img and qemu-io.

Each entry of ``SHAPES`` is ``build(tmpdir: Path) -> Shape``.  A builder makes
its files in ``tmpdir / <shape name>`` (so many shapes can share one tmpdir)
and returns the top image plus every file it made.  ``Shape.expect`` lists
guest ranges whose content is known (``(guest_offset, length, byte)``: every
byte in the range equals ``byte``); tests read them back with qemu-io and,
later, with pyqcow.  ``Shape.tags`` lets a test pick or skip shapes ("huge" has
a virtual size no raw file on ext4 can hold, "dirty" fails ``qemu-img check``
on purpose, "chain" has backing files, ...).

Import: tests/conftest.py puts tests/ at the front of sys.path, so
``from interop.shapes import SHAPES, Shape`` (and ``import qemu``) work from any
test module.

What qemu-img / qemu-io 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18) did when these
were written (things a reimplementation has to match or avoid):

- compat accepts ``0.10``/``1.1`` and also ``v2``/``v3``; 1.1 is the default.
  v2 refuses refcount_bits != 16, lazy_refcounts=on and compression_type=zstd
  at create time, and ``qemu-img bitmap --add`` fails on a v2 image ("Cannot
  store dirty bitmaps in qcow2 v2 files").
- extended_l2=on needs cluster_size >= 16k ("Extended L2 entries are only
  supported with cluster sizes of at least 16384 bytes").
- A compressed write (``qemu-io -c "write -c ..."``) must cover whole clusters;
  a partial-cluster compressed write fails with "write failed: Invalid argument"
  (only the image's last, short cluster may be partial).
- ``qemu-io`` exits 1 if any ``-c`` command failed but still runs the rest;
  ``qemu-io -U`` needs ``-r`` ("force-share=on can only be used with read-only
  images").  The ``abort`` command kills qemu-io with SIGABRT (exit 134), so the
  wrappers run qemu with RLIMIT_CORE=0 to avoid core files.
- Writes with lazy_refcounts=on followed by ``abort`` leave the dirty bit
  (incompatible bit 0, byte 79) set and the refcounts stale: read-only
  ``qemu-img check`` then reports them as *corruptions* (exit 2, "refcount=0
  reference=1" and OFLAG_COPIED errors), ``info`` shows "dirty-flag": true, and
  read-only opens (info/map/check) do not repair it; ``check -r all`` does.
- ``map --output=json`` on an extended-L2 image prints an "offset" even for
  unallocated (present: false) subclusters inside an allocated cluster.
- ``discard`` of whole clusters in a v3 image (no backing file) leaves them as
  zero clusters without a host offset (map: present true, zero true, no
  "offset"), not as unallocated; a discard smaller than a cluster is ignored.
  ``write -z`` on an allocated cluster keeps the host cluster (map shows zero
  true *with* an "offset"), ``write -z -u`` drops it; ``write -z`` on a
  never-written cluster makes a zero cluster (present true), where a plain
  unwritten cluster maps as present false.
- A v2 image has no zero flag: ``write -z`` there deallocates the clusters
  (no backing file), so the range maps as unallocated.
- ``data_file_raw=on`` makes qemu preallocate the L2 metadata: map shows the
  whole disk as data at offset = guest offset.  In map JSON of external-data
  images the "offset" is an offset into the data file.
- 16 TiB with 64k clusters is fine for qcow2, but 16 TiB with 512-byte clusters
  is refused ("The image size is too large for file format 'qcow2'"), and
  ``convert -O raw`` of a 16 TiB image to ext4 fails ("Could not resize file:
  File too large"): such shapes carry the "huge" tag.
- A relative ``data_file`` name is stored as given and opened relative to the
  *current working directory* of the qemu process, not the image's directory
  (unlike backing file names): an image made with ``cd d; qemu-img create -o
  data_file=df.data d.qcow2`` cannot be opened from elsewhere ("Could not open
  'df.data'").  The data_file shapes therefore store an absolute name.
- The size argument comes after the file name: ``qemu-img create -f qcow2 16T x``
  is rejected as an invalid size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from qemu import bitmap_add, create, header_bytes, qemu_io, snapshot_create

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


@dataclass
class Shape:
    """One built image (the top of its chain) and everything made for it."""

    name: str
    path: Path
    notes: str
    files: list[Path]
    fmt: str = "qcow2"
    tags: frozenset[str] = frozenset()
    # (guest_offset, length, byte): all bytes in the range equal `byte`.
    expect: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def dirty(self) -> bool:
        return "dirty" in self.tags


Builder = Callable[[Path], Shape]
SHAPES: dict[str, Builder] = {}
#: each shape's tags, known before it is built (tests filter parameter lists with it)
SHAPE_TAGS: dict[str, frozenset[str]] = {}


def shapes_without(*tags: str) -> list[str]:
    """Names of the shapes carrying none of ``tags``."""
    return [n for n, t in SHAPE_TAGS.items() if not t & set(tags)]


def _shape(name: str, *tags: str) -> Callable[[Callable[[Path], Shape]], Builder]:
    """Register a builder; it receives its own fresh directory tmpdir/name."""

    def register(fn: Callable[[Path], Shape]) -> Builder:
        def build(tmpdir: Path) -> Shape:
            d = Path(tmpdir) / name
            d.mkdir(parents=True, exist_ok=False)
            shape = fn(d)
            shape.name = name
            shape.tags = frozenset(tags) | shape.tags
            return shape

        build.__name__ = build.__qualname__ = f"build_{name}"
        build.__doc__ = fn.__doc__
        SHAPES[name] = build
        SHAPE_TAGS[name] = frozenset(tags)
        return build

    return register


def _w(pattern: int, offset: int, length: int, *flags: str) -> str:
    """A qemu-io write command with plain byte numbers."""
    opts = " ".join(flags)
    return f"write {opts} -P {pattern:#x} {offset} {length}".replace("  ", " ")


def _z(offset: int, length: int, unmap: bool = False) -> str:
    return f"write -z {'-u ' if unmap else ''}{offset} {length}"


def _discard(offset: int, length: int) -> str:
    return f"discard {offset} {length}"


def _mk(d: Path, path: Path, notes: str, files: Iterable[Path] = (), **kw: object) -> Shape:
    files = list(files) or [path]
    return Shape(name="", path=path, notes=notes, files=files, **kw)  # type: ignore[arg-type]


# --- single images ----------------------------------------------------------


@_shape("default")
def _default(d: Path) -> Shape:
    """v3, 64 KiB clusters, a few aligned and unaligned writes."""
    p = create(d / "default.qcow2", 8 * MiB)
    qemu_io(
        p,
        _w(0xAB, 0, 64 * KiB),
        _w(0xCD, 1 * MiB + 512, 100 * KiB),  # unaligned, spans 3 clusters
        _w(0xEF, 8 * MiB - 4 * KiB, 4 * KiB),  # last cluster of the disk
    )
    return _mk(
        d,
        p,
        "qemu-img defaults (compat 1.1, 64k clusters, zlib, refcount 16)",
        expect=[
            (0, 64 * KiB, 0xAB),
            (64 * KiB, 64 * KiB, 0),
            (1 * MiB + 512, 100 * KiB, 0xCD),
            (1 * MiB, 512, 0),
            (8 * MiB - 4 * KiB, 4 * KiB, 0xEF),
        ],
    )


@_shape("v2", "v2")
def _v2(d: Path) -> Shape:
    """compat=0.10: 72-byte header, no feature bits, no zero flag."""
    p = create(d / "v2.qcow2", 4 * MiB, "compat=0.10")
    qemu_io(
        p,
        _w(0x11, 0, 192 * KiB),
        _w(0x22, 1 * MiB + 4 * KiB, 8 * KiB),
        _z(64 * KiB, 64 * KiB),  # v2: deallocates the cluster
        _discard(128 * KiB, 64 * KiB),
    )
    return _mk(
        d,
        p,
        "version 2 image; zero write and discard on allocated clusters",
        expect=[(0, 64 * KiB, 0x11), (64 * KiB, 128 * KiB, 0), (1 * MiB + 4 * KiB, 8 * KiB, 0x22)],
    )


@_shape("cluster512", "boundaries")
def _cluster512(d: Path) -> Shape:
    """512-byte clusters: an L2 table holds 64 entries and covers 32 KiB."""
    p = create(d / "c512.qcow2", 2 * MiB, "cluster_size=512")
    l2_span = 32 * KiB
    qemu_io(
        p,
        _w(0x31, 100, 1000),  # inside clusters 0..2, unaligned both ends
        _w(0x32, l2_span - 700, 1400),  # crosses the first L2-table boundary
        _w(0x33, 3 * l2_span - 512, 2 * l2_span + 1024),  # spans three L2 tables
        _w(0x34, 2 * MiB - 512, 512),  # last cluster
    )
    return _mk(
        d,
        p,
        "cluster_bits=9; writes crossing cluster and L2-table boundaries",
        expect=[
            (0, 100, 0),
            (100, 1000, 0x31),
            (l2_span - 700, 1400, 0x32),
            (3 * l2_span - 512, 2 * l2_span + 1024, 0x33),
            (2 * MiB - 512, 512, 0x34),
        ],
    )


@_shape("cluster2m")
def _cluster2m(d: Path) -> Shape:
    """2 MiB clusters (cluster_bits=21, the maximum)."""
    p = create(d / "c2m.qcow2", 16 * MiB, "cluster_size=2M")
    qemu_io(p, _w(0x41, 4 * KiB, 4 * KiB), _w(0x42, 6 * MiB - 2 * KiB, 4 * KiB))
    return _mk(
        d,
        p,
        "cluster_bits=21; small writes allocate whole 2 MiB clusters",
        expect=[
            (0, 4 * KiB, 0),
            (4 * KiB, 4 * KiB, 0x41),
            (8 * KiB, 2 * MiB - 8 * KiB, 0),
            (6 * MiB - 2 * KiB, 4 * KiB, 0x42),
        ],
    )


@_shape("l2_boundary_64k", "boundaries")
def _l2_boundary_64k(d: Path) -> Shape:
    """64k clusters: one L2 table covers 512 MiB; write across that line."""
    p = create(d / "l2b.qcow2", 1 * GiB + 64 * KiB)
    qemu_io(p, _w(0x51, 512 * MiB - 6 * KiB, 12 * KiB), _w(0x52, 1 * GiB, 64 * KiB))
    return _mk(
        d,
        p,
        "write straddling the 512 MiB L2-table boundary; L1 has 3 entries",
        expect=[
            (512 * MiB - 6 * KiB, 12 * KiB, 0x51),
            (512 * MiB - 64 * KiB, 58 * KiB, 0),
            (1 * GiB, 64 * KiB, 0x52),
        ],
    )


@_shape("refcount1")
def _refcount1(d: Path) -> Shape:
    """refcount_bits=1 (refcount_order 0)."""
    p = create(d / "rc1.qcow2", 4 * MiB, "refcount_bits=1")
    qemu_io(p, _w(0x61, 0, 128 * KiB), _w(0x62, 3 * MiB, 64 * KiB), _discard(0, 64 * KiB))
    return _mk(
        d,
        p,
        "one-bit refcounts; a discard frees a cluster",
        expect=[(0, 64 * KiB, 0), (64 * KiB, 64 * KiB, 0x61), (3 * MiB, 64 * KiB, 0x62)],
    )


@_shape("refcount64")
def _refcount64(d: Path) -> Shape:
    """refcount_bits=64 (refcount_order 6)."""
    p = create(d / "rc64.qcow2", 4 * MiB, "refcount_bits=64")
    qemu_io(p, _w(0x63, 0, 128 * KiB), _w(0x64, 2 * MiB, 64 * KiB))
    snapshot_create(p, "s1")
    qemu_io(p, _w(0x65, 0, 64 * KiB))
    return _mk(
        d,
        p,
        "64-bit refcounts, with a snapshot so some refcounts are 2",
        expect=[(0, 64 * KiB, 0x65), (64 * KiB, 64 * KiB, 0x63), (2 * MiB, 64 * KiB, 0x64)],
        tags=frozenset({"snapshots"}),
    )


@_shape("extended_l2", "extended_l2")
def _extended_l2(d: Path) -> Shape:
    """extended_l2=on, 64k clusters -> 32 subclusters of 2 KiB."""
    p = create(d / "ext.qcow2", 2 * MiB, "extended_l2=on")
    qemu_io(
        p,
        _w(0x71, 0, 2 * KiB),  # subcluster 0
        _w(0x72, 6 * KiB, 2 * KiB),  # subcluster 3, leaving 1..2 unallocated
        _z(16 * KiB, 4 * KiB),  # zero subclusters 8..9 in an allocated cluster
        _z(24 * KiB, 2 * KiB, unmap=True),
        _w(0x73, 63 * KiB, 3 * KiB),  # crosses into cluster 1, unaligned to subclusters
        _z(128 * KiB, 64 * KiB),  # whole unallocated cluster -> zero cluster
        _z(256 * KiB, 8 * KiB, unmap=True),  # partial unallocated cluster
        _w(0x74, 512 * KiB, 64 * KiB),
        _z(512 * KiB + 10 * KiB, 6 * KiB),  # zero inside a fully allocated cluster
    )
    return _mk(
        d,
        p,
        "subcluster allocation and zero bits; writes and zeroes of 2-6 KiB",
        expect=[
            (0, 2 * KiB, 0x71),
            (2 * KiB, 4 * KiB, 0),
            (6 * KiB, 2 * KiB, 0x72),
            (8 * KiB, 55 * KiB, 0),
            (63 * KiB, 3 * KiB, 0x73),
            (66 * KiB, 62 * KiB, 0),
            (512 * KiB, 10 * KiB, 0x74),
            (522 * KiB, 6 * KiB, 0),
            (528 * KiB, 48 * KiB, 0x74),
        ],
    )


@_shape("compressed_zlib", "compressed")
def _compressed_zlib(d: Path) -> Shape:
    """Compressed clusters (deflate), one partly overwritten afterwards."""
    p = create(d / "zlib.qcow2", 2 * MiB + 32 * KiB)  # short last cluster
    qemu_io(
        p,
        _w(0x81, 0, 192 * KiB, "-c"),
        _w(0x82, 256 * KiB, 64 * KiB),  # normal cluster between compressed ones
        _w(0x83, 2 * MiB, 32 * KiB, "-c"),  # compressed short tail cluster
        _w(0x84, 64 * KiB + 4 * KiB, 4 * KiB),  # COW out of a compressed cluster
    )
    return _mk(
        d,
        p,
        "zlib compressed clusters, a compressed short tail, COW of one",
        expect=[
            (0, 68 * KiB, 0x81),
            (68 * KiB, 4 * KiB, 0x84),
            (72 * KiB, 120 * KiB, 0x81),
            (256 * KiB, 64 * KiB, 0x82),
            (2 * MiB, 32 * KiB, 0x83),
        ],
    )


@_shape("compressed_zstd", "compressed")
def _compressed_zstd(d: Path) -> Shape:
    """compression_type=zstd (incompatible bit 3, header byte 104 = 1)."""
    p = create(d / "zstd.qcow2", 2 * MiB, "compression_type=zstd")
    qemu_io(
        p,
        _w(0x91, 0, 128 * KiB, "-c"),
        _w(0x92, 1 * MiB, 64 * KiB, "-c"),
        _w(0x93, 1 * MiB + 512, 512),
    )
    return _mk(
        d,
        p,
        "zstd compressed clusters, one partly overwritten",
        expect=[
            (0, 128 * KiB, 0x91),
            (1 * MiB, 512, 0x92),
            (1 * MiB + 512, 512, 0x93),
            (1 * MiB + 1 * KiB, 63 * KiB, 0x92),
        ],
    )


@_shape("zero_writes")
def _zero_writes(d: Path) -> Shape:
    """write -z (keeps allocation: zero flag + offset) and write -z -u (unmaps)."""
    p = create(d / "zero.qcow2", 4 * MiB)
    qemu_io(
        p,
        _w(0xA1, 0, 512 * KiB),
        _z(64 * KiB, 64 * KiB),  # allocated -> "zero, allocated"
        _z(192 * KiB, 64 * KiB, unmap=True),  # allocated -> "zero, unallocated"
        _z(320 * KiB + 4 * KiB, 8 * KiB),  # partial cluster: written as zeros
        _z(1 * MiB, 128 * KiB),  # never allocated
        _z(2 * MiB, 64 * KiB, unmap=True),
    )
    return _mk(
        d,
        p,
        "zero flag with and without a host cluster; partial zero writes",
        expect=[
            (0, 64 * KiB, 0xA1),
            (64 * KiB, 64 * KiB, 0),
            (128 * KiB, 64 * KiB, 0xA1),
            (192 * KiB, 64 * KiB, 0),
            (256 * KiB, 68 * KiB, 0xA1),
            (324 * KiB, 8 * KiB, 0),
            (332 * KiB, 180 * KiB, 0xA1),
            (1 * MiB, 2 * MiB, 0),
        ],
    )


@_shape("discards")
def _discards(d: Path) -> Shape:
    """discard of whole clusters, a partial cluster, and a never-written range.

    In a v3 image qemu 7.2 turns discarded clusters into zero clusters
    (zero flag, no host offset), it does not make them unallocated.
    """
    p = create(d / "discard.qcow2", 4 * MiB)
    qemu_io(
        p,
        _w(0xB1, 0, 1 * MiB),
        _discard(128 * KiB, 128 * KiB),
        _discard(512 * KiB + 4 * KiB, 8 * KiB),  # partial: qemu ignores it
        _discard(2 * MiB, 1 * MiB),
        _w(0xB2, 192 * KiB, 4 * KiB),  # reallocate part of a discarded range
    )
    return _mk(
        d,
        p,
        "discarded clusters become zero clusters (v3); partial discard ignored",
        expect=[
            (0, 128 * KiB, 0xB1),
            (128 * KiB, 64 * KiB, 0),
            (192 * KiB, 4 * KiB, 0xB2),
            (196 * KiB, 60 * KiB, 0),
            (256 * KiB, 256 * KiB, 0xB1),
        ],
    )


@_shape("prealloc_metadata", "prealloc")
def _prealloc_metadata(d: Path) -> Shape:
    """preallocation=metadata: every L2 entry allocated, data reads as zero."""
    p = create(d / "pmeta.qcow2", 2 * MiB, "preallocation=metadata")
    qemu_io(p, _w(0xC1, 64 * KiB, 64 * KiB))
    return _mk(
        d,
        p,
        "preallocated metadata, one cluster written",
        expect=[(0, 64 * KiB, 0), (64 * KiB, 64 * KiB, 0xC1), (128 * KiB, 1920 * KiB, 0)],
    )


@_shape("prealloc_full", "prealloc")
def _prealloc_full(d: Path) -> Shape:
    """preallocation=full: metadata and zero-filled data clusters on disk."""
    p = create(d / "pfull.qcow2", 2 * MiB, "preallocation=full")
    qemu_io(p, _w(0xC2, 1 * MiB, 4 * KiB))
    return _mk(
        d,
        p,
        "fully preallocated, one partial write",
        expect=[(0, 1 * MiB, 0), (1 * MiB, 4 * KiB, 0xC2)],
    )


@_shape("snapshots", "snapshots")
def _snapshots(d: Path) -> Shape:
    """Internal snapshots s1 and s2 with writes before, between and after."""
    p = create(d / "snap.qcow2", 4 * MiB)
    qemu_io(p, _w(0xD1, 0, 256 * KiB))
    snapshot_create(p, "s1")
    qemu_io(p, _w(0xD2, 64 * KiB, 64 * KiB), _w(0xD3, 1 * MiB, 64 * KiB))
    snapshot_create(p, "s2")
    qemu_io(p, _w(0xD4, 64 * KiB, 4 * KiB), _discard(192 * KiB, 64 * KiB), _z(1 * MiB, 64 * KiB))
    return _mk(
        d,
        p,
        "two internal snapshots; active layer COWs shared clusters",
        expect=[
            (0, 64 * KiB, 0xD1),
            (64 * KiB, 4 * KiB, 0xD4),
            (68 * KiB, 60 * KiB, 0xD2),
            (128 * KiB, 64 * KiB, 0xD1),
            (192 * KiB, 64 * KiB, 0),
            (1 * MiB, 64 * KiB, 0),
        ],
    )


@_shape("bitmap", "bitmap")
def _bitmap(d: Path) -> Shape:
    """A persistent dirty bitmap (bitmaps header extension, autoclear bit 0)."""
    p = create(d / "bitmap.qcow2", 4 * MiB)
    qemu_io(p, _w(0xE1, 0, 64 * KiB))
    bitmap_add(p, "b0")
    bitmap_add(p, "b1", granularity=128 * KiB)
    qemu_io(p, _w(0xE2, 1 * MiB, 64 * KiB))  # marks b0 and b1 dirty
    return _mk(
        d,
        p,
        "two persistent bitmaps, written after they were added",
        expect=[(0, 64 * KiB, 0xE1), (1 * MiB, 64 * KiB, 0xE2)],
    )


def _data_file(d: Path, raw: bool) -> Shape:
    p = d / "df.qcow2"
    data = d / "df.data"
    # Absolute name on purpose: qemu 7.2 resolves a relative data_file name
    # against the process's cwd, not the image's directory (see top).
    create(
        p,
        2 * MiB,
        f"data_file={str(data).replace(',', ',,')}",
        f"data_file_raw={'on' if raw else 'off'}",
    )
    qemu_io(p, _w(0xF1, 0, 64 * KiB), _w(0xF2, 1 * MiB + 4 * KiB, 4 * KiB), _z(512 * KiB, 64 * KiB))
    return _mk(
        d,
        p,
        f"external data file (absolute name), data_file_raw={'on' if raw else 'off'}",
        files=[p, data],
        expect=[
            (0, 64 * KiB, 0xF1),
            (1 * MiB, 4 * KiB, 0),
            (1 * MiB + 4 * KiB, 4 * KiB, 0xF2),
            (512 * KiB, 64 * KiB, 0),
        ],
    )


@_shape("data_file", "data_file")
def _data_file_off(d: Path) -> Shape:
    """External data file, data_file_raw=off."""
    return _data_file(d, raw=False)


@_shape("data_file_raw", "data_file")
def _data_file_on(d: Path) -> Shape:
    """External data file, data_file_raw=on (metadata preallocated by qemu)."""
    return _data_file(d, raw=True)


@_shape("lazy_dirty", "dirty")
def _lazy_dirty(d: Path) -> Shape:
    """lazy_refcounts=on, writes, then qemu-io `abort`: dirty bit stays set."""
    p = create(d / "lazy.qcow2", 4 * MiB, "lazy_refcounts=on")
    qemu_io(p, _w(0x5A, 0, 128 * KiB), _w(0x5B, 1 * MiB, 64 * KiB), "abort", allow_failure=True)
    if not int.from_bytes(header_bytes(p, 72, 8), "big") & 1:
        raise RuntimeError(f"{p}: dirty bit not set after qemu-io abort")
    return _mk(
        d,
        p,
        "dirty bit set, refcounts stale: check reports errors until repaired",
        expect=[(0, 128 * KiB, 0x5A), (1 * MiB, 64 * KiB, 0x5B)],
    )


@_shape("huge_sparse", "huge")
def _huge_sparse(d: Path) -> Shape:
    """16 TiB virtual size, three clusters written (L1 of 32768 entries)."""
    p = create(d / "huge.qcow2", 16 * TiB)
    qemu_io(
        p,
        _w(0x01, 0, 64 * KiB),
        _w(0x02, 8 * TiB - 2 * KiB, 4 * KiB),
        _w(0x03, 16 * TiB - 64 * KiB, 64 * KiB),
    )
    return _mk(
        d,
        p,
        "16 TiB sparse; do not convert to a raw file (ext4 max file size)",
        expect=[
            (0, 64 * KiB, 0x01),
            (8 * TiB - 2 * KiB, 4 * KiB, 0x02),
            (16 * TiB - 64 * KiB, 64 * KiB, 0x03),
            (4 * TiB, 64 * KiB, 0),
        ],
    )


# --- backing chains ---------------------------------------------------------


@_shape("chain_qcow2", "chain")
def _chain_qcow2(d: Path) -> Shape:
    """base.qcow2 <- top.qcow2; top overrides, zeroes and discards base data."""
    base = create(d / "base.qcow2", 4 * MiB)
    qemu_io(base, _w(0x10, 0, 1 * MiB), _w(0x11, 3 * MiB, 64 * KiB))
    top = create(d / "top.qcow2", None, backing=base, backing_fmt="qcow2")
    qemu_io(
        top,
        _w(0x20, 64 * KiB, 64 * KiB),
        _w(0x21, 256 * KiB + 1 * KiB, 2 * KiB),  # partial: COW from base
        _z(512 * KiB, 64 * KiB),  # zero cluster hides base data
        _discard(640 * KiB, 64 * KiB),  # discard over a backing file
        _w(0x22, 2 * MiB, 64 * KiB),  # where base has nothing
    )
    return _mk(
        d,
        top,
        "absolute backing name, backing format qcow2",
        files=[top, base],
        expect=[
            (0, 64 * KiB, 0x10),
            (64 * KiB, 64 * KiB, 0x20),
            (256 * KiB, 1 * KiB, 0x10),
            (257 * KiB, 2 * KiB, 0x21),
            (259 * KiB, 1 * KiB, 0x10),
            (512 * KiB, 64 * KiB, 0),
            (2 * MiB, 64 * KiB, 0x22),
            (3 * MiB, 64 * KiB, 0x11),
        ],
    )


@_shape("chain_raw_base", "chain")
def _chain_raw_base(d: Path) -> Shape:
    """base.raw <- top.qcow2 (-F raw)."""
    base = create(d / "base.raw", 2 * MiB, fmt="raw")
    qemu_io(base, _w(0x30, 0, 512 * KiB), _w(0x31, 1 * MiB + 100, 1000), fmt="raw")
    top = create(d / "top.qcow2", None, backing=base, backing_fmt="raw")
    qemu_io(top, _w(0x32, 4 * KiB, 4 * KiB), _z(128 * KiB, 64 * KiB))
    return _mk(
        d,
        top,
        "raw backing file",
        files=[top, base],
        expect=[
            (0, 4 * KiB, 0x30),
            (4 * KiB, 4 * KiB, 0x32),
            (8 * KiB, 120 * KiB, 0x30),
            (128 * KiB, 64 * KiB, 0),
            (192 * KiB, 320 * KiB, 0x30),
            (1 * MiB + 100, 1000, 0x31),
        ],
    )


@_shape("chain_3deep_relative", "chain")
def _chain_3deep_relative(d: Path) -> Shape:
    """top.qcow2 -> "sub/mid.qcow2" -> "base.qcow2" (relative to sub/, not cwd)."""
    sub = d / "sub"
    sub.mkdir()
    create("base.qcow2", 4 * MiB, cwd=sub)
    qemu_io(sub / "base.qcow2", _w(0x40, 0, 1 * MiB))
    create("mid.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=sub)
    qemu_io(sub / "mid.qcow2", _w(0x41, 128 * KiB, 128 * KiB), _w(0x42, 2 * MiB, 64 * KiB))
    create("top.qcow2", None, backing="sub/mid.qcow2", backing_fmt="qcow2", cwd=d)
    qemu_io(d / "top.qcow2", _w(0x43, 192 * KiB, 64 * KiB), _z(0, 64 * KiB))
    return _mk(
        d,
        d / "top.qcow2",
        "relative backing names, each relative to its own image",
        files=[d / "top.qcow2", sub / "mid.qcow2", sub / "base.qcow2"],
        expect=[
            (0, 64 * KiB, 0),
            (64 * KiB, 64 * KiB, 0x40),
            (128 * KiB, 64 * KiB, 0x41),
            (192 * KiB, 64 * KiB, 0x43),
            (256 * KiB, 768 * KiB, 0x40),
            (2 * MiB, 64 * KiB, 0x42),
        ],
    )


@_shape("overlay_larger", "chain")
def _overlay_larger(d: Path) -> Shape:
    """A 4 MiB overlay over a 1 MiB - 512 base: the tail past the base reads as zeros."""
    base_size = 1 * MiB - 512  # not cluster aligned
    base = create(d / "base.qcow2", base_size)
    qemu_io(base, _w(0x60, base_size - 64 * KiB, 64 * KiB))
    top = create(d / "top.qcow2", 4 * MiB, backing=base, backing_fmt="qcow2")
    qemu_io(
        top,
        _w(0x61, base_size - 1 * KiB, 2 * KiB),  # straddles the base's end
        _w(0x62, 3 * MiB, 64 * KiB),
    )
    return _mk(
        d,
        top,
        "overlay larger than its backing file; base size not cluster aligned",
        files=[top, base],
        expect=[
            (base_size - 64 * KiB, 63 * KiB, 0x60),
            (base_size - 1 * KiB, 2 * KiB, 0x61),
            (base_size + 1 * KiB, 3 * MiB - base_size - 1 * KiB, 0),
            (3 * MiB, 64 * KiB, 0x62),
            (3 * MiB + 64 * KiB, 1 * MiB - 64 * KiB, 0),
        ],
    )


@_shape("extended_l2_overlay", "chain", "extended_l2")
def _extended_l2_overlay(d: Path) -> Shape:
    """extended_l2 overlay (32k clusters, 1 KiB subclusters) over a plain base."""
    base = create(d / "base.qcow2", 1 * MiB)
    qemu_io(base, _w(0x70, 0, 256 * KiB))
    top = create(
        d / "top.qcow2",
        None,
        "extended_l2=on",
        "cluster_size=32k",
        backing=base,
        backing_fmt="qcow2",
    )
    qemu_io(
        top, _w(0x71, 1 * KiB, 1 * KiB), _z(4 * KiB, 2 * KiB), _w(0x72, 33 * KiB + 512, 1 * KiB)
    )
    return _mk(
        d,
        top,
        "unallocated subclusters of an allocated cluster read from the backing file",
        files=[top, base],
        expect=[
            (0, 1 * KiB, 0x70),
            (1 * KiB, 1 * KiB, 0x71),
            (2 * KiB, 2 * KiB, 0x70),
            (4 * KiB, 2 * KiB, 0),
            (6 * KiB, 27 * KiB + 512, 0x70),
            (33 * KiB + 512, 1 * KiB, 0x72),
            (34 * KiB + 512, 200 * KiB, 0x70),
        ],
    )


def build_all(tmpdir: Path) -> dict[str, Shape]:
    """Build every shape under tmpdir (handy from a REPL or a tools/ script)."""
    return {name: build(Path(tmpdir)) for name, build in SHAPES.items()}


def image_files_size(shape: Shape) -> int:
    """Bytes actually allocated on the host for all of a shape's files."""
    return sum(os.stat(f).st_blocks * 512 for f in shape.files)


__all__ = ["SHAPES", "Shape", "build_all", "image_files_size"]
