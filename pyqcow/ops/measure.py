"""How large an image would be (qemu-img measure): ``required`` and ``fully-allocated``.

For a qcow2 target the metadata is always counted for the whole virtual disk
(the size a ``preallocation=metadata`` image has): one header cluster, the L1
table, every L2 table, and the refcount blocks and table that cover all of
those clusters, themselves included.  ``fully-allocated`` adds a data cluster
for every guest cluster; ``required`` adds one for every guest cluster of the
source that holds data (through its whole backing chain; clusters that read as
zeros are not counted).  ``bitmaps`` is the space the persistent bitmaps of a
qcow2 source need in a v3 target: per bitmap its data and its bitmap table
(each rounded up to whole clusters), plus the bitmap directory.

A raw target needs the virtual size (rounded up to 512 bytes) either way.
The numbers equal qemu-img 7.2's on the test zoo (tests/interop/test_maintenance.py).
"""

from __future__ import annotations

from ..errors import OperationError

__all__ = ["measure", "qcow2_metadata_clusters"]

_SECTOR = 512


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def qcow2_metadata_clusters(
    virtual_size: int, cluster_size: int, *, refcount_bits: int = 16, extended_l2: bool = False,
    data_clusters: int | None = None,
) -> int:
    """Clusters of metadata of a qcow2 image mapping all of ``virtual_size``.

    ``data_clusters`` (default: every guest cluster) is what the refcounts must
    cover besides the metadata itself.
    """
    guest_clusters = _ceil_div(virtual_size, cluster_size)
    if data_clusters is None:
        data_clusters = guest_clusters
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    l2_tables = _ceil_div(guest_clusters, l2_entries)
    l1_clusters = _ceil_div(l2_tables * 8, cluster_size)
    base = 1 + l1_clusters + l2_tables  # header cluster, L1, L2 tables
    per_block = cluster_size * 8 // refcount_bits
    blocks = table = 0
    while True:  # the refcount structures count themselves: iterate to a fixed point
        nb = _ceil_div(base + data_clusters + blocks + table, per_block)
        nt = _ceil_div(nb * 8, cluster_size)
        if (nb, nt) == (blocks, table):
            break
        blocks, table = nb, nt
    return base + blocks + table


def _data_clusters(img, cluster_size: int) -> int:
    """Clusters (of ``cluster_size``) of the guest disk holding data, through the chain."""
    count = 0
    last = -1
    for ext in img.map():
        if not ext.data or ext.zero:
            continue
        first = max(ext.start // cluster_size, last + 1)
        end = (ext.start + ext.length - 1) // cluster_size
        if end >= first:
            count += end - first + 1
            last = end
    return count


def _bitmaps_size(img, cluster_size: int) -> int:
    from ..bitmaps import read_bitmap_directory

    bitmaps = read_bitmap_directory(img) or []
    if not bitmaps:
        return 0
    total = 0
    directory = 0
    for b in bitmaps:
        bits = _ceil_div(img.virtual_size, b.granularity)
        data_clusters = _ceil_div(_ceil_div(bits, 8), cluster_size)
        total += (data_clusters + _ceil_div(data_clusters * 8, cluster_size)) * cluster_size
        entry = 24 + len(b.name.encode("utf-8", "surrogateescape")) + len(b.extra_data)
        directory += entry + (-entry % 8)
    return total + _ceil_div(directory, cluster_size) * cluster_size


def measure(
    *,
    size: int | None = None,
    image=None,
    output_format: str = "raw",
    options: dict | None = None,
) -> dict:
    """qemu-img measure's result: ``{"bitmaps"?, "required", "fully-allocated"}`` (bytes).

    ``image`` is an open image (QcowImage or RawImage, with its backing chain);
    or ``size`` gives a new empty disk of that many bytes.  ``options`` are
    parsed qcow2 creation options (pyqcow.newimage.parse_options).
    """
    options = dict(options or {})
    where = image.path if image is not None else "measure"
    if (size is None) == (image is None):
        raise OperationError(where, "give either --size N or one image")
    if output_format == "raw":
        if options:
            raise OperationError(where, f"invalid option {next(iter(options))!r} for raw output")
        vsize = size if image is None else image.virtual_size
        vsize = _ceil_div(vsize, _SECTOR) * _SECTOR
        return {"required": vsize, "fully-allocated": vsize}
    if output_format != "qcow2":
        raise OperationError(where, f"output format {output_format!r} is not supported")
    cs = options.get("cluster_size", 65536)
    rb = options.get("refcount_bits", 16)
    ext = options.get("extended_l2", False)
    v3 = options.get("compat", "1.1") in ("1.1", "v3")
    vsize = size if image is None else image.virtual_size
    vsize = _ceil_div(vsize, _SECTOR) * _SECTOR
    guest = _ceil_div(vsize, cs)
    from .. import spec

    l2_entries = cs // (16 if ext else 8)
    # only for --size, as qemu-img (it checks the creation options, not a source image)
    if image is None and _ceil_div(guest, l2_entries) * 8 > spec.MAX_L1_SIZE_BYTES:
        raise OperationError(where, "the image size is too large (try using a larger cluster size)")
    meta = qcow2_metadata_clusters(vsize, cs, refcount_bits=rb, extended_l2=ext)
    full = meta + guest
    if options.get("preallocation", "off") in ("full", "falloc"):
        required = full
    else:
        required = meta + (_data_clusters(image, cs) if image is not None else 0)
    out: dict = {}
    if image is not None and v3 and image.format == "qcow2" and image.header.version >= 3:
        out["bitmaps"] = _bitmaps_size(image, cs)
    out["required"] = required * cs
    out["fully-allocated"] = full * cs
    return out
