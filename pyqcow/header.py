"""The qcow2 header: parse, validate against QEMU's sanity limits, rebuild.

Containers from layout.py become the frozen records here and go no further.
"""

from __future__ import annotations

from . import layout, spec
from .errors import FormatError, UnsupportedFeatureError
from .record import FrozenRecord as _Record


class Extension(_Record):
    __slots__ = _fields = ("type", "data")
    type: int
    data: bytes

    @property
    def name(self) -> str:
        try:
            return spec.ExtType(self.type).name.lower()
        except ValueError:
            return f"unknown ({self.type:#010x})"


class FeatureName(_Record):
    __slots__ = _fields = ("type", "bit", "name")
    type: int  # 0 incompatible, 1 compatible, 2 autoclear
    bit: int
    name: str


class BitmapsExt(_Record):
    __slots__ = _fields = ("nb_bitmaps", "bitmap_directory_size", "bitmap_directory_offset")
    nb_bitmaps: int
    bitmap_directory_size: int
    bitmap_directory_offset: int


class Header(_Record):
    """The header fields (a frozen record: ``replace`` makes a changed copy)."""

    __slots__ = _fields = (
        "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
        "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
        "refcount_table_clusters", "nb_snapshots", "snapshots_offset",
        "incompatible_features", "compatible_features", "autoclear_features",
        "refcount_order", "header_length", "compression_type", "extra_fields",
        "extensions", "backing_file",
    )
    _defaults = {
        "incompatible_features": 0, "compatible_features": 0, "autoclear_features": 0,
        "refcount_order": 4, "header_length": spec.V2_HEADER_LENGTH, "compression_type": 0,
        "extra_fields": b"", "extensions": (), "backing_file": None,
    }
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    # bytes from offset 104 to header_length (compression_type + padding + unknown fields)
    extra_fields: bytes
    extensions: tuple[Extension, ...]
    backing_file: str | None

    # -- derived ---------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & spec.Incompat.EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // (32 if self.extended_l2 else 1)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & spec.Incompat.DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & spec.Autoclear.DATA_FILE_RAW)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & spec.Incompat.DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & spec.Incompat.CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & spec.Compat.LAZY_REFCOUNTS)

    def extension(self, ext_type: int) -> Extension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    @property
    def backing_format(self) -> str | None:
        ext = self.extension(spec.ExtType.BACKING_FORMAT)
        return ext.data.decode("utf-8", "replace") if ext else None

    @property
    def data_file(self) -> str | None:
        ext = self.extension(spec.ExtType.DATA_FILE)
        return ext.data.decode("utf-8", "replace") if ext else None

    @property
    def feature_names(self) -> tuple[FeatureName, ...]:
        ext = self.extension(spec.ExtType.FEATURE_TABLE)
        if not ext:
            return ()
        n = len(ext.data) // 48
        entries = layout.parse(layout.FeatureNameTable, ext.data[: n * 48])
        return tuple(
            FeatureName(e["type"], e["bit"], e["name"].rstrip("\x00")) for e in entries
        )

    @property
    def bitmaps(self) -> BitmapsExt | None:
        ext = self.extension(spec.ExtType.BITMAPS)
        if not ext or len(ext.data) < 24:
            return None
        d = layout.parse(layout.BitmapsExtension, ext.data[:24])
        return BitmapsExt(d["nb_bitmaps"], d["bitmap_directory_size"], d["bitmap_directory_offset"])


def _feature_name(header_exts: tuple[Extension, ...], group: int, bit: int) -> str:
    ext = next((e for e in header_exts if e.type == spec.ExtType.FEATURE_TABLE), None)
    if ext:
        n = len(ext.data) // 48
        try:
            for e in layout.parse(layout.FeatureNameTable, ext.data[: n * 48]):
                if e["type"] == group and e["bit"] == bit:
                    return e["name"].rstrip("\x00")
        except Exception:  # noqa: BLE001 - a broken table only loses the name
            pass
    gname = ("incompatible", "compatible", "autoclear")[group]
    return spec.FEATURE_NAMES.get((gname, bit), f"unknown {gname} feature bit {bit}")


def size_to_l1(size: int, cluster_bits: int, l2_entry_size: int) -> int:
    """Number of L1 entries needed to map ``size`` guest bytes."""
    shift = cluster_bits + (cluster_bits - (3 if l2_entry_size == 8 else 4))
    return (size + (1 << shift) - 1) >> shift


def parse_header(path: str, cluster0: bytes, file_size: int) -> Header:
    """Parse and validate the header in ``cluster0`` (the first bytes of the file)."""
    if len(cluster0) < 4 or cluster0[:4] != spec.QCOW_MAGIC_BYTES:
        raise FormatError(path, "not a qcow2 image (bad magic)")
    if len(cluster0) < layout.HEADER_V2_SIZE:
        raise FormatError(path, "file too short for a qcow2 header (truncated?)")
    h = layout.parse(layout.HeaderV2, cluster0[: layout.HEADER_V2_SIZE])
    version = h["version"]
    if version not in (2, 3):
        raise UnsupportedFeatureError(path, f"unsupported qcow2 version {version}")
    cb = h["cluster_bits"]
    if not spec.MIN_CLUSTER_BITS <= cb <= spec.MAX_CLUSTER_BITS:
        raise FormatError(
            path,
            f"cluster_bits {cb} out of range (cluster size must be 512 bytes to 2 MiB)",
        )
    cluster_size = 1 << cb
    fields = dict(h)
    del fields["magic"]
    if version == 3:
        fields.update(_v3_fields(path, cluster0, cluster_size))
    else:
        fields["header_length"] = spec.V2_HEADER_LENGTH
        fields["refcount_order"] = 4
    ro = fields["refcount_order"]
    if ro > spec.MAX_REFCOUNT_ORDER:
        raise FormatError(path, f"refcount_order {ro} too large (maximum 6, 64-bit refcounts)")

    if h["crypt_method"]:
        kind = {1: "AES", 2: "LUKS"}.get(h["crypt_method"], f"method {h['crypt_method']}")
        raise UnsupportedFeatureError(path, f"encrypted images ({kind}) are not supported")

    # Header extensions (v3 and v2 alike)
    bfo, bfs = h["backing_file_offset"], h["backing_file_size"]
    if bfo > cluster_size:
        raise FormatError(path, f"backing file name offset {bfo} lies outside the first cluster")
    if bfo:
        if bfs > spec.MAX_BACKING_FILE_NAME:
            raise FormatError(path, f"backing file name too long ({bfs} bytes, maximum 1023)")
        if bfo + bfs > cluster_size:
            raise FormatError(path, "backing file name extends beyond the first cluster")
    ext_end = bfo if bfo else cluster_size
    ext_end = min(ext_end, len(cluster0))
    fields["extensions"] = _parse_extensions(path, cluster0, fields["header_length"], ext_end)
    fields["backing_file"] = _backing_name(path, cluster0, bfo, bfs) if bfo else None

    hdr = Header(**fields)
    validate_header(path, hdr, file_size)
    return hdr


def _v3_fields(path: str, cluster0: bytes, cluster_size: int) -> dict:
    """The v3 header fields after the v2 ones (header_length checked)."""
    if len(cluster0) < spec.V3_MIN_HEADER_LENGTH:
        raise FormatError(path, "file too short for a qcow2 v3 header (truncated?)")
    fields = dict(layout.parse(
        layout.HeaderV3Tail, cluster0[layout.HEADER_V2_SIZE : spec.V3_MIN_HEADER_LENGTH]
    ))
    hl = fields["header_length"]
    if hl < spec.V3_MIN_HEADER_LENGTH:
        raise FormatError(path, f"header_length {hl} too small (v3 needs at least 104)")
    if hl > cluster_size:
        raise FormatError(path, f"header_length {hl} larger than the cluster size")
    if len(cluster0) < hl:
        raise FormatError(path, "file too short for its header_length (truncated?)")
    extra = bytes(cluster0[spec.V3_MIN_HEADER_LENGTH : hl])
    fields["extra_fields"] = extra
    fields["compression_type"] = extra[0] if extra else 0
    return fields


def _parse_extensions(path: str, cluster0: bytes, pos: int, ext_end: int) -> tuple:
    """The header extensions stored in cluster0[pos:ext_end] (up to the end marker)."""
    exts: list[Extension] = []
    seen: set[int] = set()
    while pos + 8 <= ext_end:
        e = layout.parse(layout.ExtensionHeader, cluster0[pos : pos + 8])
        if e["type"] == spec.ExtType.END:
            break
        pos += 8
        if e["length"] > ext_end - pos:
            raise FormatError(path, f"header extension {e['type']:#x} is longer than the header area")
        data = bytes(cluster0[pos : pos + e["length"]])
        if e["type"] in seen:
            raise FormatError(path, f"header extension {e['type']:#x} appears twice")
        seen.add(e["type"])
        exts.append(Extension(e["type"], data))
        pos += (e["length"] + 7) & ~7
    return tuple(exts)


def _backing_name(path: str, cluster0: bytes, bfo: int, bfs: int) -> str | None:
    """The backing file name stored at ``bfo`` (``bfs`` bytes; None when empty)."""
    if bfs == 0:
        return None
    raw = bytes(cluster0[bfo : bfo + bfs])
    if len(raw) < bfs:
        raise FormatError(path, "backing file name lies beyond the end of the file")
    try:
        backing = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(path, "backing file name is not valid UTF-8") from None
    if "\x00" in backing:
        raise FormatError(path, "backing file name contains a NUL byte")
    return backing


def validate_header(path: str, hdr: Header, file_size: int) -> None:
    """QEMU's sanity checks (qcow2_do_open and qcow2_validate_table)."""
    cs = hdr.cluster_size
    unknown = hdr.incompatible_features & ~spec.INCOMPAT_MASK
    if unknown:
        names = [
            _feature_name(hdr.extensions, 0, b) for b in range(64) if unknown & (1 << b)
        ]
        raise UnsupportedFeatureError(
            path, "unsupported incompatible feature(s): " + ", ".join(names)
        )
    if hdr.version == 2 and hdr.incompatible_features:
        raise FormatError(path, "version 2 image with incompatible feature bits")
    if hdr.extended_l2 and hdr.cluster_bits < 14:
        raise FormatError(path, "extended L2 entries need clusters of at least 16 KiB")
    if hdr.incompatible_features & spec.Incompat.COMPRESSION:
        if hdr.compression_type == 0:
            raise FormatError(path, "compression type bit set but compression_type is zlib")
    elif hdr.compression_type != 0:
        raise FormatError(path, "compression_type is set but its incompatible bit is not")
    if hdr.compression_type not in (0, 1):
        raise UnsupportedFeatureError(path, f"unknown compression type {hdr.compression_type}")
    if hdr.data_file_raw and not hdr.has_data_file:
        raise FormatError(path, "raw external data bit set without an external data file")
    if hdr.extension(spec.ExtType.CRYPTO) is not None:
        raise UnsupportedFeatureError(path, "encrypted images (LUKS) are not supported")

    if hdr.size > spec.MAX_VIRTUAL_SIZE:
        raise FormatError(path, f"virtual size {hdr.size} too large (maximum 2^61 bytes)")

    def table(name: str, offset: int, size: int) -> None:
        if offset % cs:
            raise FormatError(path, f"{name} offset {offset:#x} is not cluster-aligned")
        if offset + size > spec.INT64_MAX:
            raise FormatError(path, f"{name} offset {offset:#x} is absurd")
        if size and offset + size > file_size:
            raise FormatError(
                path,
                f"{name} at offset {offset:#x} (+{size} bytes) lies beyond the end of the file "
                f"({file_size} bytes; truncated?)",
            )

    # refcount table
    if hdr.refcount_table_clusters == 0:
        raise FormatError(path, "refcount table is empty (refcount_table_clusters is 0)")
    rt_size = hdr.refcount_table_clusters * cs
    if rt_size > spec.MAX_REFTABLE_SIZE_BYTES:
        raise FormatError(path, f"refcount table too large ({rt_size} bytes, maximum 8 MiB)")
    table("refcount table", hdr.refcount_table_offset, rt_size)

    # L1 table
    if hdr.l1_size * 8 > spec.MAX_L1_SIZE_BYTES:
        raise FormatError(path, f"active L1 table too large ({hdr.l1_size} entries, maximum 4 Mi)")
    need = size_to_l1(hdr.size, hdr.cluster_bits, hdr.l2_entry_size)
    if hdr.l1_size < need:
        raise FormatError(
            path, f"L1 table too small for the virtual size ({hdr.l1_size} < {need} entries)"
        )
    table("L1 table", hdr.l1_table_offset, hdr.l1_size * 8)

    # snapshot table
    if hdr.nb_snapshots > spec.MAX_SNAPSHOTS:
        raise FormatError(path, f"too many snapshots ({hdr.nb_snapshots}, maximum 65536)")
    if hdr.nb_snapshots:
        table("snapshot table", hdr.snapshots_offset, hdr.nb_snapshots * layout.SNAPSHOT_FIXED_SIZE)
    elif hdr.snapshots_offset % cs:
        raise FormatError(path, "snapshot table offset is not cluster-aligned")

    bm = hdr.bitmaps
    ext = hdr.extension(spec.ExtType.BITMAPS)
    if ext is not None:
        if len(ext.data) != 24 or bm is None:
            raise FormatError(path, "bitmaps header extension has the wrong length")
        if hdr.autoclear_features & spec.Autoclear.BITMAPS:
            if not 1 <= bm.nb_bitmaps <= 65535:
                raise FormatError(path, f"bad number of bitmaps {bm.nb_bitmaps}")
            if bm.bitmap_directory_size > 1024 * 65535:
                raise FormatError(path, "bitmap directory too large")
            table("bitmap directory", bm.bitmap_directory_offset, bm.bitmap_directory_size)


def build_cluster0(hdr: Header) -> bytes:
    """Serialize header fields, extensions and backing file name (no padding to cluster)."""
    v2 = {k: getattr(hdr, k) for k in _V2_KEYS}
    v2["magic"] = spec.QCOW_MAGIC
    exts = b""
    for ext in hdr.extensions:
        exts += layout.build(layout.ExtensionHeader, {"type": ext.type, "length": len(ext.data)})
        exts += ext.data + bytes(-len(ext.data) % 8)
    if hdr.version == 3:
        extra = bytearray(hdr.extra_fields)
        hl = spec.V3_MIN_HEADER_LENGTH + len(extra)
        if extra:
            extra[0] = hdr.compression_type
        tail = layout.build(
            layout.HeaderV3Tail,
            {
                "incompatible_features": hdr.incompatible_features,
                "compatible_features": hdr.compatible_features,
                "autoclear_features": hdr.autoclear_features,
                "refcount_order": hdr.refcount_order,
                "header_length": hl,
            },
        )
        head_len = hl
    else:
        tail = b""
        extra = bytearray()
        head_len = spec.V2_HEADER_LENGTH
    end_marker = bytes(8)
    name = hdr.backing_file.encode("utf-8") if hdr.backing_file else b""
    ext_area = exts + end_marker
    bfo = head_len + len(ext_area) if name else 0
    v2["backing_file_offset"] = bfo
    v2["backing_file_size"] = len(name)
    out = layout.build(layout.HeaderV2, v2) + tail + bytes(extra) + ext_area + name
    if len(out) > hdr.cluster_size:
        if hdr.extension(spec.ExtType.FEATURE_TABLE) is not None:
            # the feature name table is only informational: drop it to make room,
            # as qemu-img does with small clusters
            return build_cluster0(with_extension(hdr, spec.ExtType.FEATURE_TABLE, None))
        raise FormatError(
            None,
            "header, extensions and backing file name do not fit in the first cluster "
            f"({len(out)} > {hdr.cluster_size} bytes)",
        )
    return out


_V2_KEYS = [
    "version",
    "backing_file_offset",
    "backing_file_size",
    "cluster_bits",
    "size",
    "crypt_method",
    "l1_size",
    "l1_table_offset",
    "refcount_table_offset",
    "refcount_table_clusters",
    "nb_snapshots",
    "snapshots_offset",
]


def with_extension(hdr: Header, ext_type: int, data: bytes | None) -> Header:
    """Return ``hdr`` with extension ``ext_type`` set to ``data`` (None removes it)."""
    exts = [e for e in hdr.extensions if e.type != ext_type]
    if data is not None:
        # keep QEMU's order: backing format first, then the rest as they were
        new = Extension(ext_type, data)
        if ext_type == spec.ExtType.BACKING_FORMAT:
            exts.insert(0, new)
        else:
            exts.append(new)
    return hdr.replace(extensions=tuple(exts))



def check_fits(hdr: Header) -> None:
    """Raise FormatError if ``hdr`` (with its extensions and backing name) would not
    fit in cluster 0: the probe before a header change, which only the metadata
    door writes."""
    build_cluster0(hdr)


__all__ = [
    "Extension",
    "FeatureName",
    "Header",
    "build_cluster0",
    "check_fits",
    "parse_header",
    "size_to_l1",
    "validate_header",
    "with_extension",
]
