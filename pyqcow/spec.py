"""Constants of the qcow2 format (names follow docs/interop/qcow2.rst)."""

from __future__ import annotations

from .intenum import IntEnum, IntFlag  # (not enum's: start-up time)

QCOW_MAGIC = 0x514649FB
QCOW_MAGIC_BYTES = b"QFI\xfb"

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112  # what QEMU >= 7.2 writes (includes compression_type + padding)

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
MAX_BACKING_FILE_NAME = 1023
MAX_L1_SIZE_BYTES = 32 * 1024 * 1024  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_SIZE_BYTES = 8 * 1024 * 1024  # QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOTS_TABLE_BYTES = 64 * 1024 * 1024
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_VIRTUAL_SIZE = 1 << 61
MAX_CHAIN_DEPTH = 64
MAX_EXTENSION_NAME = 1023
INT64_MAX = (1 << 63) - 1

# L1 / L2 / refcount table masks (qcow2.rst "Cluster mapping", block/qcow2.h)
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0

SUBCLUSTERS_PER_CLUSTER = 32


class Incompat(IntFlag):
    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    DATA_FILE = 1 << 2
    COMPRESSION = 1 << 3
    EXTL2 = 1 << 4


class Compat(IntFlag):
    LAZY_REFCOUNTS = 1 << 0


class Autoclear(IntFlag):
    BITMAPS = 1 << 0
    DATA_FILE_RAW = 1 << 1


INCOMPAT_MASK = 0x1F
COMPAT_MASK = 0x1
AUTOCLEAR_MASK = 0x3

FEATURE_NAMES = {
    ("incompatible", 0): "dirty bit",
    ("incompatible", 1): "corrupt bit",
    ("incompatible", 2): "external data file",
    ("incompatible", 3): "compression type",
    ("incompatible", 4): "extended L2 entries",
    ("compatible", 0): "lazy refcounts",
    ("autoclear", 0): "bitmaps",
    ("autoclear", 1): "raw external data",
}


class CryptMethod(IntEnum):
    NONE = 0
    AES = 1
    LUKS = 2


class CompressionType(IntEnum):
    ZLIB = 0
    ZSTD = 1


class ExtType(IntEnum):
    END = 0x00000000
    BACKING_FORMAT = 0xE2792ACA
    FEATURE_TABLE = 0x6803F857
    BITMAPS = 0x23852875
    CRYPTO = 0x0537BE77
    DATA_FILE = 0x44415441


# QEMU image-lock byte offsets (block/file-posix.c)
RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
