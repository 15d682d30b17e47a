"""Create qcow2 images (qemu-img create equivalent)."""

from __future__ import annotations

import os

from . import layout, spec
from ._callmod import make_callable
from .chain import probe_format, resolve_backing
from .errors import OperationError, QcowError
from .header import Extension, Header, build_cluster0
from .hostfile import fsync_dir

# QEMU's feature name table (written into every v3 image)
FEATURE_TABLE = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]


def _feature_table() -> bytes:
    return layout.build(
        layout.FeatureNameTable,
        [{"type": t, "bit": b, "name": n} for t, b, n in FEATURE_TABLE],
    )


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def create(
    path: str | os.PathLike,
    size: int | None = None,
    *,
    backing: str | None = None,
    backing_format: str | None = None,
    cluster_size: int = 65536,
    compat: str = "1.1",
    lazy_refcounts: bool = False,
    extended_l2: bool = False,
    compression_type: str = "zlib",
    refcount_bits: int = 16,
    preallocation: str = "off",
    unsafe: bool = False,
    overwrite: bool = True,
) -> str | None:
    """Create a qcow2 image.  Returns the probed backing format if it had to probe.

    ``size`` defaults to the backing file's virtual size.  The backing name is
    stored as given (relative names stay relative to the new image's directory).
    """
    path = os.fspath(path)
    probed = None
    version = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}.get(str(compat))
    if version is None:
        raise OperationError(path, f"invalid compat value {compat!r} (use 0.10 or 1.1)")
    if not _is_pow2(cluster_size) or not 512 <= cluster_size <= 2 * 1024 * 1024:
        raise OperationError(
            path, "cluster size must be a power of two between 512 bytes and 2 MiB"
        )
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise OperationError(path, "refcount_bits must be a power of two between 1 and 64")
    if compression_type not in ("zlib", "zstd"):
        raise OperationError(path, f"unknown compression type {compression_type!r}")
    if preallocation not in ("off", "metadata"):
        raise OperationError(path, f"unsupported preallocation mode {preallocation!r}")
    if version == 2:
        for bad, name in (
            (lazy_refcounts, "lazy_refcounts"),
            (extended_l2, "extended_l2"),
            (compression_type != "zlib", "compression_type=zstd"),
            (refcount_bits != 16, "refcount_bits other than 16"),
        ):
            if bad:
                raise OperationError(path, f"{name} requires compat=1.1")
    cluster_bits = cluster_size.bit_length() - 1
    if extended_l2 and cluster_bits < 14:
        raise OperationError(path, "extended_l2 requires a cluster size of at least 16 KiB")
    if backing is not None and backing == "":
        backing = None
    if backing is not None:
        if len(backing.encode()) > spec.MAX_BACKING_FILE_NAME:
            raise OperationError(path, "backing file name too long (maximum 1023 bytes)")
        bpath = resolve_backing(path, backing)
        if os.path.exists(path) and os.path.exists(bpath) and os.path.samefile(path, bpath):
            raise OperationError(path, "an image cannot be its own backing file")
        if backing_format not in (None, "qcow2", "raw"):
            raise OperationError(path, f"unsupported backing format {backing_format!r}")
        if not unsafe or size is None:
            if not os.path.exists(bpath):
                raise QcowError(path, f"backing file {backing!r} not found ({bpath})")
            actual = probe_format(bpath)
            if backing_format is None:
                backing_format = probed = actual
            elif backing_format != actual and not unsafe:
                raise OperationError(
                    path, f"backing file {backing!r} is {actual}, not {backing_format}"
                )
        if size is None:
            from .chain import open_image

            with open_image(bpath, format=backing_format, force_share=True) as b:
                size = b.virtual_size
    if size is None:
        raise OperationError(path, "image size required (no backing file to take it from)")
    if size < 0 or size > spec.MAX_VIRTUAL_SIZE:
        raise OperationError(path, f"invalid size {size}")
    if not overwrite and os.path.exists(path):
        raise OperationError(path, "file exists")
    if os.path.isdir(path):
        raise QcowError(path, "is a directory")

    incompat = 0
    if extended_l2:
        incompat |= spec.Incompat.EXTL2
    ctype = 1 if compression_type == "zstd" else 0
    if ctype:
        incompat |= spec.Incompat.COMPRESSION
    exts = []
    if backing_format is not None and backing is not None:
        exts.append(Extension(spec.ExtType.BACKING_FORMAT, backing_format.encode()))
    if version == 3:
        exts.append(Extension(spec.ExtType.FEATURE_TABLE, _feature_table()))
    hdr = Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=0,
        crypt_method=0,
        l1_size=0,
        l1_table_offset=0,
        refcount_table_offset=cluster_size,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        incompatible_features=incompat,
        compatible_features=spec.Compat.LAZY_REFCOUNTS if lazy_refcounts else 0,
        autoclear_features=0,
        refcount_order=refcount_bits.bit_length() - 1,
        header_length=spec.V3_HEADER_LENGTH if version == 3 else spec.V2_HEADER_LENGTH,
        compression_type=ctype,
        extra_fields=bytes([ctype]) + bytes(7) if version == 3 else b"",
        extensions=tuple(exts),
        backing_file=backing,
    )
    cluster0 = build_cluster0(hdr)
    # cluster 0: header; 1: refcount table; 2: refcount block describing 0..2
    from .entries import RefcountBlock

    reftable = (2 * cluster_size).to_bytes(8, "big") + bytes(cluster_size - 8)
    blk = RefcountBlock(bytes(cluster_size), hdr.refcount_order)
    for c in range(3):
        blk.set(c, 1)
    tmp_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(tmp_fd, cluster0 + bytes(cluster_size - len(cluster0)), 0)
        os.pwrite(tmp_fd, reftable, cluster_size)
        os.pwrite(tmp_fd, blk.tobytes(), 2 * cluster_size)
        os.fsync(tmp_fd)
    finally:
        os.close(tmp_fd)
    fsync_dir(path)

    from .image import QcowImage

    img = QcowImage(path, "r+")
    try:
        img.resize(size)
        if preallocation == "metadata":
            _preallocate_metadata(img)
        img.flush()
    finally:
        img.close()
    return probed


def _preallocate_metadata(img) -> None:
    """Allocate L2 tables and data clusters for the whole disk (contents stay zero)."""
    cb = img.cluster_bits
    nb = (img.virtual_size + img.cluster_size - 1) >> cb
    from .writer import COPIED

    for cluster in range(nb):
        table, l2_off = img._l2_for_write(cluster)
        i = cluster & (img.l2_entries - 1)
        host = img.refcounts.alloc(1)
        if img.extended_l2:
            table[2 * i] = host | COPIED
            table[2 * i + 1] = 0xFFFFFFFF  # all subclusters allocated
        else:
            table[i] = host | COPIED
        img.dirty_l2.add(l2_off)
    img._note_alloc()
    end = img.refcounts.end_cluster << cb
    if img.hf.size() < end:
        img.hf.truncate(end)


def parse_options(path: str, opts: str) -> dict:
    """-o key=val,key=val -> keyword arguments of create()."""
    out: dict = {}
    if not opts:
        return out
    from .units import parse_size

    for item in opts.split(","):
        if not item:
            continue
        key, _, val = item.partition("=")
        key = key.strip()
        if key == "cluster_size":
            out["cluster_size"] = parse_size(val)
        elif key == "compat":
            out["compat"] = val
        elif key in ("lazy_refcounts", "extended_l2"):
            if val not in ("on", "off", "true", "false", ""):
                raise OperationError(path, f"invalid value {val!r} for {key} (on/off)")
            out[key] = val in ("on", "true", "")
        elif key == "compression_type":
            out["compression_type"] = val
        elif key == "refcount_bits":
            out["refcount_bits"] = int(val)
        elif key == "preallocation":
            out["preallocation"] = val
        elif key == "backing_file":
            out["backing"] = val
        elif key == "backing_fmt":
            out["backing_format"] = val
        else:
            raise OperationError(path, f"unknown or unsupported option {key!r}")
    return out


make_callable(__name__, create)
