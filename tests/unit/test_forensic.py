"""forensic.py: content hints, table ranges, hashing helpers (no qemu needed)."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import zlib
from array import array

import pytest
import zstandard

from pyqcow import forensic
from pyqcow.cli.hash import split_snapshot
from pyqcow.errors import OperationError

CS = 65536


def qcow2_deflate(data: bytes) -> bytes:
    """A cluster as qemu compresses it: raw deflate, then the next bytes of the file."""
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("data", "hint"),
    [
        (bytes(CS), "all-zero"),
        (b"\x5a" * CS, "fill pattern"),
        (b"\x5a" * 1000 + bytes(CS - 1000), "fill pattern"),
        ((b"log line: user logged in\n" * 3000)[:CS], "text"),
        (qcow2_deflate(b"".join(struct.pack(">Q", i) for i in range(CS // 8))).ljust(CS, b"\0"),
         "zlib raw deflate stream"),
        (zstandard.ZstdCompressor().compress(bytes(range(256)) * 256).ljust(CS, b"\0"),
         "zstd frame"),
        (random.Random(1).randbytes(CS), "high entropy"),
        (b"".join(struct.pack("<IH", i, 7) for i in range(CS // 6)).ljust(CS, b"\0"), "binary"),
    ],
    ids=["zero", "fill", "fill-then-zero", "text", "deflate", "zstd", "random", "binary"],
)
def test_describe_bytes(data: bytes, hint: str) -> None:
    got, entropy, detail = forensic.describe_bytes(data)
    assert got == hint, (got, detail)
    assert 0.0 <= entropy <= 8.0


def test_describe_bytes_details() -> None:
    hint, _, detail = forensic.describe_bytes(b"\x5a" * 100)
    assert (hint, detail) == ("fill pattern", "byte 0x5a x 100")
    payload = os.urandom(100) * 300
    hint, _, detail = forensic.describe_bytes(qcow2_deflate(payload).ljust(CS, b"\0"))
    assert hint == "zlib raw deflate stream"
    assert detail == f"decompresses to {len(payload)} bytes"


def test_random_data_is_not_taken_for_a_compressed_stream() -> None:
    rng = random.Random(7)
    hints = {forensic.describe_bytes(rng.randbytes(CS))[0] for _ in range(500)}
    assert hints == {"high entropy"}


def test_table_ranges_compress_identical_and_consecutive_entries() -> None:
    cs = CS
    values = array("Q", [0, 0, 0, 5 * cs, 6 * cs, 7 * cs, 9 * cs, 9 * cs, 0])
    ranges = forensic._table_ranges(values, cs, lambda e: {})
    assert [(r["index"], r["count"], r.get("step")) for r in ranges] == [
        (0, 3, 0), (3, 3, cs), (6, 2, 0), (8, 1, None)
    ]
    assert ranges[1]["entry"] == f"{5 * cs:#018x}"
    assert forensic._refcount_ranges([1, 1, 0, 0, 0, 2], 10) == [
        {"first_cluster": 10, "count": 2, "refcount": 1},
        {"first_cluster": 12, "count": 3, "refcount": 0},
        {"first_cluster": 15, "count": 1, "refcount": 2},
    ]


class _Guest:
    """A 5 MiB + 3 guest disk with a recognisable pattern."""

    virtual_size = 5 * (1 << 20) + 3

    def readinto(self, buf, offset: int) -> None:
        mv = memoryview(buf).cast("B")
        pattern = bytes((i * 7) & 0xFF for i in range(256))
        start = offset % 256
        data = (pattern[start:] + pattern * (len(mv) // 256 + 2))[: len(mv)]
        mv[:] = data


def _guest_bytes() -> bytes:
    buf = bytearray(_Guest.virtual_size)
    _Guest().readinto(buf, 0)
    return bytes(buf)


@pytest.mark.parametrize("algorithm", ["sha256", "md5", "blake2s", "sha3_512"])
def test_hash_image_streams_in_blocks(algorithm: str) -> None:
    want = hashlib.new(algorithm, _guest_bytes()).hexdigest()
    assert forensic.hash_image(_Guest(), algorithm, block_size=1 << 20) == want
    assert forensic.hash_image(_Guest(), algorithm) == want


def test_hash_image_shake_and_progress() -> None:
    seen = []
    digest = forensic.hash_image(_Guest(), "shake_128", block_size=1 << 21,
                                 progress=lambda done, total: seen.append((done, total)))
    assert digest == hashlib.shake_128(_guest_bytes()).hexdigest(32)
    assert seen[-1] == (_Guest.virtual_size, _Guest.virtual_size) and len(seen) == 3


def test_unknown_hash_algorithm() -> None:
    with pytest.raises(OperationError, match="unknown hash algorithm 'sha-4'"):
        forensic.new_hash("sha-4")


def test_split_snapshot(tmp_path) -> None:
    img = tmp_path / "disk.qcow2"
    img.write_bytes(b"")
    assert split_snapshot(str(img)) == (str(img), None)
    assert split_snapshot(f"{img}@snap1") == (str(img), "snap1")
    assert split_snapshot(f"{tmp_path}/a@b.qcow2@2") == (f"{tmp_path}/a@b.qcow2", "2")
    odd = tmp_path / "x@y"
    odd.write_bytes(b"")
    assert split_snapshot(str(odd)) == (str(odd), None)
    assert split_snapshot("plain") == ("plain", None)
    assert split_snapshot("trailing@") == ("trailing@", None)
