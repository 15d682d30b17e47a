"""Every on-disk structure of qcow2 as a ``construct`` declaration.

This module is the one parse/build boundary: nothing else imports construct.
Bulk tables (L1, L2, refcount blocks) are *not* declared through construct in the
hot path (see entries.py), but their single-entry declarations live here so that
tests can prove the fast decoders agree with them.

Spec references are to docs/interop/qcow2.rst in qemu/qemu.
"""

from __future__ import annotations

import construct as cs

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

# ---------------------------------------------------------------------------
# qcow2.rst "Cluster mapping": single-entry declarations (reference for entries.py)
# ---------------------------------------------------------------------------
L1Entry = cs.Int64ub
L2Entry = cs.Int64ub
ExtendedL2Entry = cs.Struct("entry" / cs.Int64ub, "bitmap" / cs.Int64ub)


def RefcountBlock(refcount_order: int, count: int) -> cs.Construct:
    """A refcount block of ``count`` entries of ``1 << refcount_order`` bits."""
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


def parse(struct: cs.Construct, data: bytes) -> dict:
    result = struct.parse(data)
    if isinstance(result, cs.Container):
        return {
            k: (_plain(v) if isinstance(v, cs.Container) else v)
            for k, v in result.items()
            if not k.startswith("_")
        }
    return result


def build(struct: cs.Construct, value) -> bytes:
    return struct.build(value)
