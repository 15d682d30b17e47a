"""header.py: parse, validate and rebuild the header (cluster 0)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from interop.shapes import SHAPES

from pyqcow import layout, spec
from pyqcow.errors import FormatError, UnsupportedFeatureError
from pyqcow.header import build_cluster0, parse_header, size_to_l1, with_extension

CS = 65536


def v3_header(**over) -> dict:
    h = {
        "magic": spec.QCOW_MAGIC, "version": 3, "backing_file_offset": 0,
        "backing_file_size": 0, "cluster_bits": 16, "size": 1 << 20, "crypt_method": 0,
        "l1_size": 1, "l1_table_offset": 3 * CS, "refcount_table_offset": CS,
        "refcount_table_clusters": 1, "nb_snapshots": 0, "snapshots_offset": 0,
        "incompatible_features": 0, "compatible_features": 0, "autoclear_features": 0,
        "refcount_order": 4, "header_length": 112,
    }
    h.update(over)
    return h


def cluster0(h: dict, tail: bytes = bytes(8), exts: bytes = b"", name: bytes = b"") -> bytes:
    out = layout.build(layout.HeaderV2, {k: h[k] for k in _V2})
    if h["version"] == 3:
        out += layout.build(layout.HeaderV3Tail, {k: h[k] for k in _V3})
        out += tail
    out += exts + bytes(8) + name
    return out.ljust(CS, b"\0")


_V2 = ["magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
       "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
       "refcount_table_clusters", "nb_snapshots", "snapshots_offset"]
_V3 = ["incompatible_features", "compatible_features", "autoclear_features", "refcount_order",
       "header_length"]


def ext(t: int, data: bytes) -> bytes:
    return layout.build(layout.ExtensionHeader, {"type": t, "length": len(data)}) + data + bytes(
        -len(data) % 8
    )


FILE_SIZE = 4 * CS


def test_minimal_v3_header() -> None:
    hdr = parse_header("x", cluster0(v3_header()), FILE_SIZE)
    assert hdr.version == 3 and hdr.cluster_size == CS and hdr.refcount_bits == 16
    assert hdr.header_length == 112 and hdr.compression_type == 0
    assert hdr.extensions == () and hdr.backing_file is None


def test_v2_header_has_implicit_fields() -> None:
    hdr = parse_header("x", cluster0(v3_header(version=2)), FILE_SIZE)
    assert hdr.version == 2 and hdr.refcount_order == 4 and hdr.header_length == 72


def test_unknown_header_fields_and_extensions_survive_rebuild() -> None:
    tail = bytes([0]) + bytes(7) + b"UNKNOWN!"  # header_length 120: 8 unknown bytes
    exts = ext(0x12345678, b"opaque data") + ext(spec.ExtType.BACKING_FORMAT, b"qcow2")
    name = b"base.qcow2"
    off = 104 + len(tail) + len(exts) + 8
    raw = cluster0(v3_header(header_length=120, backing_file_offset=off,
                             backing_file_size=len(name)), tail, exts, name)
    hdr = parse_header("x", raw, FILE_SIZE)
    assert hdr.extra_fields[8:] == b"UNKNOWN!"
    assert hdr.extension(0x12345678).data == b"opaque data"
    assert hdr.backing_file == "base.qcow2" and hdr.backing_format == "qcow2"
    built = build_cluster0(hdr)
    assert raw[: len(built)] == built


def test_with_extension_puts_backing_format_first() -> None:
    hdr = parse_header("x", cluster0(v3_header(), exts=ext(0x1234, b"z")), FILE_SIZE)
    hdr = with_extension(hdr, spec.ExtType.BACKING_FORMAT, b"raw")
    assert [e.type for e in hdr.extensions] == [spec.ExtType.BACKING_FORMAT, 0x1234]
    assert with_extension(hdr, 0x1234, None).extensions[-1].type == spec.ExtType.BACKING_FORMAT


def test_feature_names_from_table() -> None:
    entry = layout.build(layout.FeatureNameEntry, {"type": 0, "bit": 7, "name": "teleport"})
    raw = cluster0(v3_header(incompatible_features=1 << 7),
                   exts=ext(spec.ExtType.FEATURE_TABLE, entry))
    with pytest.raises(UnsupportedFeatureError, match="teleport"):
        parse_header("x", raw, FILE_SIZE)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"cluster_bits": 8}, "cluster_bits 8"),
        ({"cluster_bits": 22}, "cluster_bits 22"),
        ({"version": 4}, "version 4"),
        ({"refcount_order": 7}, "refcount_order 7"),
        ({"header_length": 100}, "header_length 100"),
        ({"l1_size": 1 << 23}, "L1 table too large"),
        ({"size": 1 << 40}, "L1 table too small"),
        ({"size": (1 << 61) + 1}, "virtual size"),
        ({"l1_table_offset": 3 * CS + 8}, "not cluster-aligned"),
        ({"l1_table_offset": 40 * CS}, "beyond the end of the file"),
        ({"refcount_table_clusters": 0}, "refcount table is empty"),
        ({"refcount_table_clusters": 129}, "refcount table too large"),
        ({"nb_snapshots": 65537}, "too many snapshots"),
        ({"crypt_method": 1}, "AES"),
        ({"crypt_method": 2}, "LUKS"),
        ({"incompatible_features": 1 << 3}, "compression type"),
        ({"incompatible_features": 1 << 4, "cluster_bits": 13, "l1_size": 16,
          "l1_table_offset": 3 * 8192, "refcount_table_offset": 8192}, "extended L2"),
    ],
)
def test_header_limits(over: dict, match: str) -> None:
    with pytest.raises((FormatError, UnsupportedFeatureError), match=match):
        parse_header("img.qcow2", cluster0(v3_header(**over)), FILE_SIZE)


def test_size_to_l1() -> None:
    assert size_to_l1(1 << 30, 16, 8) == 2  # one L2 table maps 512 MiB
    assert size_to_l1(1 << 30, 16, 16) == 4  # extended L2: 256 MiB
    assert size_to_l1(0, 16, 8) == 0
    assert size_to_l1(1, 9, 8) == 1


@pytest.mark.parametrize("name", ["default", "v2", "bitmap", "data_file", "chain_qcow2",
                                  "compressed_zstd", "extended_l2"])
def test_qemu_headers_parse_and_rebuild_exactly(name: str, tmp_path: Path) -> None:
    shape = SHAPES[name](tmp_path)
    raw = shape.path.read_bytes()[: 1 << 21]
    cb = int.from_bytes(raw[20:24], "big")
    c0 = raw[: 1 << cb]
    hdr = parse_header(str(shape.path), c0, os.path.getsize(shape.path))
    built = build_cluster0(hdr)
    assert c0[: len(built)] == built
    assert not c0[len(built):].strip(b"\0")
