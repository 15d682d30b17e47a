"""``pyqcow info [--output human|json] [--backing-chain] [-U] IMAGE``

Like ``qemu-img info`` (7.2): each image is opened on its own, without its
backing file, so a broken chain can still be inspected; ``--backing-chain``
then walks the chain by the names the headers give (resolved as qemu does),
refusing loops and missing files.  JSON is byte-for-byte qemu-img's.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import spec
from ..chain import open_image, resolve_backing
from ..errors import BackingChainError, QcowError
from .output import format_size, qdict_order, qemu_json, snapshot_row


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info",
        help="show information about an image (like qemu-img info)",
        description="Show the format, sizes, features, snapshots and backing file of an image.",
    )
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="output format (json: exactly what qemu-img info prints)")
    p.add_argument("--backing-chain", action="store_true",
                   help="also show every image of the backing chain")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the image even if another process (a VM) has it open")
    p.add_argument("-f", "--format", choices=("qcow2", "raw"), help="image format (default: probe)")
    p.add_argument("image", metavar="IMAGE")
    return p


def run(args: argparse.Namespace) -> int:
    infos = collect_image_info(
        args.image, fmt=args.format, chain=args.backing_chain, force_share=args.force_share
    )
    if args.output == "json":
        sys.stdout.write(qemu_json(infos if args.backing_chain else infos[0]) + "\n")
    else:
        sys.stdout.write("\n".join(human_info(i) for i in infos))
    return 0


# -- collecting ---------------------------------------------------------------------
def collect_image_info(
    filename: str, *, fmt: str | None = None, chain: bool = False, force_share: bool = False
) -> list[dict]:
    """qemu-img's ImageInfo dicts for ``filename`` (and, with ``chain``, its backing files)."""
    infos: list[dict] = []
    seen: dict[tuple[int, int], str] = {}
    names: list[str] = []
    referrer: str | None = None
    while True:
        if referrer is not None:
            if len(names) > spec.MAX_CHAIN_DEPTH:
                raise BackingChainError(
                    names[0], f"backing chain deeper than {spec.MAX_CHAIN_DEPTH} images"
                )
            if not os.path.lexists(filename):
                raise BackingChainError(
                    referrer,
                    f"backing file {infos[-1]['backing-filename']!r} not found "
                    f"(chain: {' -> '.join(names + [filename])})",
                )
        try:
            st = os.stat(filename)
            ident = (st.st_dev, st.st_ino)
        except OSError:
            ident = None
        if ident is not None and ident in seen:
            raise BackingChainError(
                referrer or filename,
                "backing chain loops back on itself: " + " -> ".join(names + [filename]),
            )
        img = open_image(filename, "r", format=fmt, force_share=force_share, backing=False)
        with img:
            infos.append(image_info(img, filename))
        if ident is not None:
            seen[ident] = filename
        names.append(filename)
        info = infos[-1]
        if not chain or "backing-filename" not in info:
            return infos
        referrer = filename
        filename = info["full-backing-filename"]
        fmt = info.get("backing-filename-format")
        if fmt is not None and fmt not in ("qcow2", "raw"):
            raise BackingChainError(referrer, f"backing file format {fmt!r} is not supported")


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def full_backing_filename(image_path: str, backing: str) -> str:
    try:
        return resolve_backing(image_path, backing)
    except QcowError:
        return backing


def image_info(img, filename: str) -> dict:
    """One qemu ImageInfo object; keys inserted in QAPI order (the renderer reorders)."""
    qcow2 = img.format == "qcow2"
    d: dict = {"filename": filename, "format": img.format}
    d["dirty-flag"] = bool(qcow2 and img.header.dirty)
    # qemu 7.2: the image file's own allocation (an external data file is not counted)
    d["actual-size"] = _allocated(img.path)
    d["virtual-size"] = img.virtual_size
    if not qcow2:
        return d
    h = img.header
    d["cluster-size"] = img.cluster_size
    if h.backing_file:
        d["backing-filename"] = h.backing_file
        d["full-backing-filename"] = full_backing_filename(img.path, h.backing_file)
        if h.backing_format:
            d["backing-filename-format"] = h.backing_format
    snapshots = []
    if h.nb_snapshots:  # the snapshot code loads only for an image that has some
        from ..snapshot_table import read_snapshot_table

        snapshots = read_snapshot_table(img)
    if snapshots:
        d["snapshots"] = [s.as_qemu_json() for s in snapshots]
    d["format-specific"] = {"type": "qcow2", "data": qcow2_specific(img)}
    return d


def qcow2_specific(img) -> dict:
    """ImageInfoSpecificQCow2 (block/qcow2.c qcow2_get_specific_info)."""
    h = img.header
    compression = "zstd" if h.compression_type == spec.CompressionType.ZSTD else "zlib"
    if h.version == 2:
        return {"compat": "0.10", "refcount-bits": h.refcount_bits,
                "compression-type": compression}
    data: dict = {"compat": "1.1"}
    if h.data_file is not None:
        data["data-file"] = h.data_file
    if h.has_data_file:
        data["data-file-raw"] = h.data_file_raw
    data["extended-l2"] = h.extended_l2
    data["lazy-refcounts"] = h.lazy_refcounts
    data["corrupt"] = h.corrupt
    data["refcount-bits"] = h.refcount_bits
    bitmaps = None
    if h.extension(spec.ExtType.BITMAPS) is not None:  # the bitmap code loads only if needed
        from ..bitmaps import read_bitmap_directory

        bitmaps = read_bitmap_directory(img)
    if bitmaps is not None:
        data["bitmaps"] = [b.as_qemu_json() for b in bitmaps]
    data["compression-type"] = compression
    return data


# -- human output (block/qapi.c bdrv_image_info_dump) --------------------------------
def human_info(info: dict) -> str:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {format_size(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}")
        for sn in info["snapshots"]:
            lines.append(_snapshot_line(sn))
    if "format-specific" in info:
        lines.append("Format specific information:")
        _dump(info["format-specific"]["data"], 1, lines)
    return "\n".join(lines) + "\n"


def _snapshot_line(sn: dict) -> str:
    return snapshot_row(
        sn["id"], sn["name"], sn["vm-state-size"], sn["date-sec"],
        sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"], sn.get("icount"),
    )


def _scalar(v) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    return str(v)


def _dump(obj, indent: int, lines: list[str]) -> None:
    pad = "    " * indent
    if isinstance(obj, dict):
        for k in qdict_order(obj):
            v = obj[k]
            key = k.replace("-", " ")
            if isinstance(v, dict | list):
                lines.append(f"{pad}{key}:")
                _dump(v, indent + 1, lines)
            else:
                lines.append(f"{pad}{key}: {_scalar(v)}")
    else:
        for i, v in enumerate(obj):
            if isinstance(v, dict | list):
                lines.append(f"{pad}[{i}]:")
                _dump(v, indent + 1, lines)
            else:
                lines.append(f"{pad}[{i}]: {_scalar(v)}")
