"""Every on-disk structure of qcow2 as a ``construct`` declaration.

This module is the one parse/build boundary: nothing else imports construct.
Bulk tables (L1, L2, refcount blocks) are *not* declared through construct in the
hot path (see entries.py), but their single-entry declarations live here so that
tests can prove the fast decoders agree with them.

Start-up: importing construct costs more than everything a small command does
(~17 ms), so the declarations below are built on first use only.  ``parse`` and
``build`` handle the fixed-layout ones (integer fields, padded strings, tables of
those) with a ``struct`` format derived from the declaration itself: that
derivation is cached in pyqcow/_layout_compiled.py (``python -m pyqcow.layout``
rewrites it), keyed by a CRC of the declaration block, so a stale cache is never
used -- it only costs the construct import again.  Anything else, and any input
the fast path is not certain to treat exactly as construct does (short data, bad
values, undecodable names), goes through construct itself.

Spec references are to docs/interop/qcow2.rst in qemu/qemu.
"""

from __future__ import annotations

import struct as _struct


# >>> declarations: everything between these markers is the CRC'd block
def _declare(cs) -> dict:
    """Build every declaration with the construct module ``cs``."""
    return {
        **_declare_header(cs),
        **_declare_snapshots(cs),
        **_declare_bitmaps(cs),
        **_declare_entries(cs),
    }


def _public(names: dict) -> dict:
    """The declarations among a builder's locals (not ``cs``, not the SIZE constants)."""
    return {k: v for k, v in names.items() if k != "cs" and not k.isupper()}


def _declare_header(cs) -> dict:
    """The header and its extensions."""
    # ---------------------------------------------------------------------------
    # qcow2.rst "Header": fields common to version 2 and 3 (bytes 0..71)
    # ---------------------------------------------------------------------------
    HeaderV2 = cs.Struct(
        "magic" / cs.Int32ub,
        "version" / cs.Int32ub,
        "backing_file_offset" / cs.Int64ub,
        "backing_file_size" / cs.Int32ub,
        "cluster_bits" / cs.Int32ub,
        "size" / cs.Int64ub,
        "crypt_method" / cs.Int32ub,
        "l1_size" / cs.Int32ub,
        "l1_table_offset" / cs.Int64ub,
        "refcount_table_offset" / cs.Int64ub,
        "refcount_table_clusters" / cs.Int32ub,
        "nb_snapshots" / cs.Int32ub,
        "snapshots_offset" / cs.Int64ub,
    )
    HEADER_V2_SIZE = HeaderV2.sizeof()  # 72

    # ---------------------------------------------------------------------------
    # qcow2.rst "Header", version 3 additional fields (bytes 72..103)
    # ---------------------------------------------------------------------------
    HeaderV3Tail = cs.Struct(
        "incompatible_features" / cs.Int64ub,
        "compatible_features" / cs.Int64ub,
        "autoclear_features" / cs.Int64ub,
        "refcount_order" / cs.Int32ub,
        "header_length" / cs.Int32ub,
    )
    HEADER_V3_TAIL_SIZE = HeaderV3Tail.sizeof()  # 32

    # Optional field at byte 104 ("compression_type"), then padding to 112.
    CompressionTypeField = cs.Struct("compression_type" / cs.Int8ub)

    # ---------------------------------------------------------------------------
    # qcow2.rst "Header extensions"
    # ---------------------------------------------------------------------------
    ExtensionHeader = cs.Struct(
        "type" / cs.Int32ub,
        "length" / cs.Int32ub,
    )

    # Feature name table entry (type 0x6803f857): 48 bytes each
    FeatureNameEntry = cs.Struct(
        "type" / cs.Int8ub,  # 0 incompatible, 1 compatible, 2 autoclear
        "bit" / cs.Int8ub,
        "name" / cs.PaddedString(46, "ascii"),
    )
    FeatureNameTable = cs.GreedyRange(FeatureNameEntry)

    # Bitmaps extension (type 0x23852875)
    BitmapsExtension = cs.Struct(
        "nb_bitmaps" / cs.Int32ub,
        "reserved32" / cs.Int32ub,
        "bitmap_directory_size" / cs.Int64ub,
        "bitmap_directory_offset" / cs.Int64ub,
    )

    # Full disk encryption header pointer (type 0x0537be77)
    CryptoExtension = cs.Struct(
        "offset" / cs.Int64ub,
        "length" / cs.Int64ub,
    )

    return _public(locals())


def _declare_snapshots(cs) -> dict:
    """The snapshot table entry and its extra data."""
    # ---------------------------------------------------------------------------
    # qcow2.rst "Snapshots": one snapshot table entry (padded to 8 bytes)
    # ---------------------------------------------------------------------------
    SnapshotEntryFixed = cs.Struct(
        "l1_table_offset" / cs.Int64ub,
        "l1_size" / cs.Int32ub,
        "id_str_size" / cs.Int16ub,
        "name_size" / cs.Int16ub,
        "date_sec" / cs.Int32ub,
        "date_nsec" / cs.Int32ub,
        "vm_clock_nsec" / cs.Int64ub,
        "vm_state_size" / cs.Int32ub,
        "extra_data_size" / cs.Int32ub,
    )
    SNAPSHOT_FIXED_SIZE = SnapshotEntryFixed.sizeof()  # 40

    SnapshotEntry = cs.Struct(
        "fixed" / SnapshotEntryFixed,
        "extra_data" / cs.Bytes(cs.this.fixed.extra_data_size),
        "id_str" / cs.Bytes(cs.this.fixed.id_str_size),
        "name" / cs.Bytes(cs.this.fixed.name_size),
        "padding" / cs.Padding(
            lambda ctx: -(
                SNAPSHOT_FIXED_SIZE
                + ctx.fixed.extra_data_size
                + ctx.fixed.id_str_size
                + ctx.fixed.name_size
            )
            % 8
        ),
    )

    # Snapshot extra data (qcow2.rst): known prefix fields, each present only if
    # extra_data_size covers it.
    SnapshotExtraVmState = cs.Struct("vm_state_size_large" / cs.Int64ub)
    SnapshotExtraDiskSize = cs.Struct("disk_size" / cs.Int64ub)
    SnapshotExtraIcount = cs.Struct("icount" / cs.Int64sb)

    return _public(locals())


def _declare_bitmaps(cs) -> dict:
    """The bitmap directory entry."""
    # ---------------------------------------------------------------------------
    # qcow2.rst "Bitmaps": bitmap directory entry (padded to 8 bytes)
    # ---------------------------------------------------------------------------
    BitmapDirectoryEntryFixed = cs.Struct(
        "bitmap_table_offset" / cs.Int64ub,
        "bitmap_table_size" / cs.Int32ub,
        "flags" / cs.Int32ub,
        "type" / cs.Int8ub,
        "granularity_bits" / cs.Int8ub,
        "name_size" / cs.Int16ub,
        "extra_data_size" / cs.Int32ub,
    )
    BITMAP_DIR_FIXED_SIZE = BitmapDirectoryEntryFixed.sizeof()  # 24

    BitmapDirectoryEntry = cs.Struct(
        "fixed" / BitmapDirectoryEntryFixed,
        "extra_data" / cs.Bytes(cs.this.fixed.extra_data_size),
        "name" / cs.Bytes(cs.this.fixed.name_size),
        "padding" / cs.Padding(
            lambda ctx: -(BITMAP_DIR_FIXED_SIZE + ctx.fixed.extra_data_size + ctx.fixed.name_size)
            % 8
        ),
    )

    return _public(locals())


def _declare_entries(cs) -> dict:
    """Single L1/L2 entries."""
    # ---------------------------------------------------------------------------
    # qcow2.rst "Cluster mapping": single-entry declarations (reference for entries.py)
    # ---------------------------------------------------------------------------
    L1Entry = cs.Int64ub
    L2Entry = cs.Int64ub
    ExtendedL2Entry = cs.Struct("entry" / cs.Int64ub, "bitmap" / cs.Int64ub)
    return _public(locals())
# <<< declarations


#: Names of the declarations, in order (the module exports each as a ``_Decl``).
DECLARATIONS = (
    "HeaderV2",
    "HeaderV3Tail",
    "CompressionTypeField",
    "ExtensionHeader",
    "FeatureNameEntry",
    "FeatureNameTable",
    "BitmapsExtension",
    "CryptoExtension",
    "SnapshotEntryFixed",
    "SnapshotEntry",
    "SnapshotExtraVmState",
    "SnapshotExtraDiskSize",
    "SnapshotExtraIcount",
    "BitmapDirectoryEntryFixed",
    "BitmapDirectoryEntry",
    "L1Entry",
    "L2Entry",
    "ExtendedL2Entry",
)

_built: dict | None = None


def _construct():
    """The construct module (imported on first use)."""
    import construct

    return construct


def declarations() -> dict:
    """Every declaration as a construct object (imports construct on first call)."""
    global _built
    if _built is None:
        _built = _declare(_construct())
    return _built


# ---------------------------------------------------------------------------
# The compiled form: derived from the construct objects, cached on disk.
# A spec is (format, fields, strings, repeat): ``struct`` format (big-endian),
# field names (None: a bare integer), {field index: encoding} for padded strings,
# and whether the declaration is a GreedyRange of such entries.
# ---------------------------------------------------------------------------
def _declaration_source() -> bytes:
    with open(__file__, "rb") as f:
        src = f.read()
    a = src.index(b"# >>> declarations")
    b = src.index(b"# <<< declarations")
    return src[a:b]


def source_crc() -> int:
    """CRC-32 of the declaration block (written in the cache, for people to read)."""
    import zlib

    return zlib.crc32(_declaration_source())


def _compile_one(c, cs):
    """The spec of construct object ``c``, or None if it has no fixed struct form."""
    if isinstance(c, cs.GreedyRange):
        inner = _compile_one(c.subcon, cs)
        if inner is None or inner[3] or c.discard:
            return None
        return (inner[0], inner[1], inner[2], True)
    if isinstance(c, cs.FormatField):
        if not c.fmtstr.startswith(">") or c.fmtstr[1:] not in tuple("bBhHiIlLqQ"):
            return None
        return (c.fmtstr, None, {}, False)
    if not isinstance(c, cs.Struct):
        return None
    fmt, fields, strings = ">", [], {}
    for sc in c.subcons:
        if not isinstance(sc, cs.Renamed) or not sc.name or sc.name.startswith("_"):
            return None
        inner = sc.subcon
        if isinstance(inner, cs.FormatField):
            if not inner.fmtstr.startswith(">") or inner.fmtstr[1:] not in tuple("bBhHiIlLqQ"):
                return None
            fmt += inner.fmtstr[1:]
        elif (
            isinstance(inner, cs.StringEncoded)
            and isinstance(inner.subcon, cs.FixedSized)
            and isinstance(inner.subcon.length, int)
            and isinstance(inner.subcon.subcon, cs.NullStripped)
            and inner.subcon.subcon.pad == b"\x00"
            and isinstance(inner.subcon.subcon.subcon, cs.GreedyBytes.__class__)
            and inner.encoding in ("ascii", "utf8", "utf-8")
        ):
            strings[len(fields)] = (inner.encoding, inner.subcon.length)
            fmt += f"{inner.subcon.length}s"
        else:
            return None
        fields.append(sc.name)
    return (fmt, tuple(fields), strings, False)


def compile_all() -> dict:
    """{name: spec} for every declaration that has a fixed struct form."""
    cs = _construct()
    out = {}
    for name, c in declarations().items():
        if name in DECLARATIONS:
            spec = _compile_one(c, cs)
            if spec is not None:
                out[name] = spec
    return out


def _load_compiled() -> dict:
    try:
        from . import _layout_compiled as cache

        # the key is the declaration block itself: comparing it costs less than a
        # CRC, whose zlib (a shared library to load) nothing else at start-up needs
        if cache.SOURCE == _declaration_source():
            return cache.COMPILED
    except (ImportError, AttributeError, OSError, ValueError):
        pass
    return compile_all()  # stale or missing cache: correct, only slower


def write_cache(path: str | None = None) -> str:
    """Rewrite pyqcow/_layout_compiled.py from the declarations."""
    import os
    import pprint

    path = path or os.path.join(os.path.dirname(__file__), "_layout_compiled.py")
    text = (
        '"""Generated by ``python -m pyqcow.layout`` from the construct declarations in\n'
        'layout.py: do not edit.  layout.py ignores it when SOURCE (the declaration block it\n'
        'was made from) differs from layout.py\'s."""\n\n'
        f"SOURCE_CRC = {source_crc():#010x}\n\n"
        f"COMPILED = {pprint.pformat(compile_all(), width=88, sort_dicts=True)}\n\n"
        f"SOURCE = {pprint.pformat(_declaration_source(), width=88)}\n"
    )
    with open(path, "w") as f:
        f.write(text)
    return path


class _Decl:
    """One declaration: the construct object is built on first use (``.construct``);
    ``layout.parse``/``layout.build`` use the compiled struct form when there is one.
    Any other attribute (``parse``, ``build``, ``sizeof``, ``subcons``...) is the
    construct object's."""

    __slots__ = ("name", "_struct", "_fields", "_strings", "_repeat")

    def __init__(self, name: str, spec) -> None:
        self.name = name
        if spec is None:
            self._struct = None
        else:
            fmt, self._fields, self._strings, self._repeat = spec
            self._struct = _struct.Struct(fmt)

    @property
    def construct(self):
        return declarations()[self.name]

    def sizeof(self, *args, **kwargs) -> int:
        if self._struct is not None and not self._repeat and not args and not kwargs:
            return self._struct.size
        return self.construct.sizeof(*args, **kwargs)

    def __getattr__(self, attr: str):
        return getattr(self.construct, attr)

    # construct's own combinators (``cs.Array(n, layout.L1Entry)``) check
    # ``isinstance(subcon, Construct)``: answer as the construct object would.
    @property  # type: ignore[misc]
    def __class__(self):
        return type(self.construct)

    def __rtruediv__(self, other):
        return other / self.construct

    def __repr__(self) -> str:
        return f"<layout.{self.name}>"

    # -- the fast path: returns None when construct must decide ---------------------
    def _fast_parse_one(self, data, pos: int):
        vals = self._struct.unpack_from(data, pos)
        if self._fields is None:
            return vals[0]
        if self._strings:
            vals = list(vals)
            for i, enc in self._strings.items():
                vals[i] = vals[i].rstrip(b"\x00").decode(enc[0])  # may raise: construct decides
        return dict(zip(self._fields, vals, strict=True))

    def _fast_parse(self, data):
        size = self._struct.size
        n = len(data)
        if not self._repeat:
            return None if n < size else self._fast_parse_one(data, 0)
        if n % size:
            return None
        return [self._fast_parse_one(data, pos) for pos in range(0, n, size)]

    def _fast_build_one(self, value) -> bytes:
        if self._fields is None:
            return self._struct.pack(value)
        vals = [value[k] for k in self._fields]
        for i, (enc, length) in self._strings.items():
            b = vals[i].encode(enc)
            if len(b) > length:  # struct would truncate; construct refuses
                raise ValueError("too long")
            vals[i] = b
        return self._struct.pack(*vals)

    def _fast_build(self, value) -> bytes:
        if not self._repeat:
            return self._fast_build_one(value)
        return b"".join(self._fast_build_one(v) for v in value)


_COMPILED = _load_compiled()

HeaderV2 = _Decl("HeaderV2", _COMPILED.get("HeaderV2"))
HeaderV3Tail = _Decl("HeaderV3Tail", _COMPILED.get("HeaderV3Tail"))
CompressionTypeField = _Decl("CompressionTypeField", _COMPILED.get("CompressionTypeField"))
ExtensionHeader = _Decl("ExtensionHeader", _COMPILED.get("ExtensionHeader"))
FeatureNameEntry = _Decl("FeatureNameEntry", _COMPILED.get("FeatureNameEntry"))
FeatureNameTable = _Decl("FeatureNameTable", _COMPILED.get("FeatureNameTable"))
BitmapsExtension = _Decl("BitmapsExtension", _COMPILED.get("BitmapsExtension"))
CryptoExtension = _Decl("CryptoExtension", _COMPILED.get("CryptoExtension"))
SnapshotEntryFixed = _Decl("SnapshotEntryFixed", _COMPILED.get("SnapshotEntryFixed"))
SnapshotEntry = _Decl("SnapshotEntry", _COMPILED.get("SnapshotEntry"))
SnapshotExtraVmState = _Decl("SnapshotExtraVmState", _COMPILED.get("SnapshotExtraVmState"))
SnapshotExtraDiskSize = _Decl("SnapshotExtraDiskSize", _COMPILED.get("SnapshotExtraDiskSize"))
SnapshotExtraIcount = _Decl("SnapshotExtraIcount", _COMPILED.get("SnapshotExtraIcount"))
BitmapDirectoryEntryFixed = _Decl("BitmapDirectoryEntryFixed", _COMPILED.get("BitmapDirectoryEntryFixed"))
BitmapDirectoryEntry = _Decl("BitmapDirectoryEntry", _COMPILED.get("BitmapDirectoryEntry"))
L1Entry = _Decl("L1Entry", _COMPILED.get("L1Entry"))
L2Entry = _Decl("L2Entry", _COMPILED.get("L2Entry"))
ExtendedL2Entry = _Decl("ExtendedL2Entry", _COMPILED.get("ExtendedL2Entry"))

HEADER_V2_SIZE = HeaderV2.sizeof()  # 72
HEADER_V3_TAIL_SIZE = HeaderV3Tail.sizeof()  # 32
SNAPSHOT_FIXED_SIZE = SnapshotEntryFixed.sizeof()  # 40
BITMAP_DIR_FIXED_SIZE = BitmapDirectoryEntryFixed.sizeof()  # 24


def RefcountBlock(refcount_order: int, count: int):
    """A refcount block of ``count`` entries of ``1 << refcount_order`` bits (construct)."""
    cs = _construct()
    bits = 1 << refcount_order
    if bits >= 8:
        return cs.Array(count, cs.BytesInteger(bits // 8, signed=False, swapped=False))
    # Sub-byte widths are packed least-significant bits first within each byte.
    per_byte = 8 // bits
    return cs.Array(
        count // per_byte,
        cs.ExprAdapter(
            cs.Int8ub,
            lambda b, ctx: [(b >> (i * bits)) & ((1 << bits) - 1) for i in range(per_byte)],
            lambda vals, ctx: sum(v << (i * bits) for i, v in enumerate(vals)),
        ),
    )


# ---------------------------------------------------------------------------
# The parse/build boundary: plain dicts in and out, never construct Containers.
# ---------------------------------------------------------------------------
def _plain(container) -> dict:
    return {k: v for k, v in container.items() if not k.startswith("_")}


def parse(struct, data: bytes):
    """Parse ``data`` with a declaration (or any construct object): plain dicts out."""
    if isinstance(struct, _Decl):
        if struct._struct is not None:
            try:
                result = struct._fast_parse(data)
            except Exception:  # noqa: BLE001 - construct decides (and raises its own error)
                result = None
            if result is not None:
                return result
        struct = struct.construct
    cs = _construct()
    result = struct.parse(data)
    if isinstance(result, cs.Container):
        return {
            k: (_plain(v) if isinstance(v, cs.Container) else v)
            for k, v in result.items()
            if not k.startswith("_")
        }
    return result


def build(struct, value) -> bytes:
    """Build bytes from a plain value with a declaration (or any construct object)."""
    if isinstance(struct, _Decl):
        if struct._struct is not None:
            try:
                return struct._fast_build(value)
            except Exception:  # noqa: BLE001 - construct decides (and raises its own error)
                pass
        struct = struct.construct
    return struct.build(value)


if __name__ == "__main__":  # pragma: no cover
    print(write_cache())
