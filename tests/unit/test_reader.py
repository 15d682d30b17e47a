"""reader.py (GuestReader), snapshot_view.py and QcowImage's read path.

Images are made with qemu-img / qemu-io; the content checks against
``qemu-img convert`` for every shape live in tests/interop/test_forensic_interop.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
from pathlib import Path

import pytest
import qemu

import pyqcow
from pyqcow.errors import OperationError
from pyqcow.image import zero_fill
from pyqcow.reader import GuestReader

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    qemu.require_tool("qemu-img")
    qemu.require_tool("qemu-io")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """8 MiB: data, a zero cluster, a compressed cluster, holes."""
    p = qemu.create(tmp_path / "img.qcow2", 8 * MiB)
    qemu.qemu_io(
        p,
        "write -P 0x11 0 64k",
        "write -P 0x22 100k 8k",
        "write -z 1M 64k",
        "write -c -P 0x33 2M 64k",
        "write -P 0x44 8188k 4k",
    )
    return p


def expected(path: Path, tmp_path: Path, snapshot: str | None = None) -> bytes:
    raw = qemu.convert_raw(path, tmp_path / f"expect-{snapshot}.raw", snapshot)
    return raw.read_bytes()


# -- io.RawIOBase behaviour ---------------------------------------------------------
def test_reader_is_a_readonly_seekable_raw_stream(image: Path) -> None:
    with pyqcow.open(image) as img:
        r = img.reader()
        assert isinstance(r, io.RawIOBase)
        assert r.readable() and r.seekable() and not r.writable()
        assert r.size == len(r) == 8 * MiB
        assert r.name == str(image)
        with pytest.raises(io.UnsupportedOperation):
            r.write(b"x")
        with pytest.raises(io.UnsupportedOperation):
            r.truncate(0)
        with pytest.raises(io.UnsupportedOperation):
            r.fileno()


def test_seek_every_whence_and_tell(image: Path) -> None:
    with pyqcow.open(image) as img, img.reader() as r:
        assert r.tell() == 0
        assert r.seek(100 * KiB) == 100 * KiB
        assert r.read(4) == b"\x22" * 4
        assert r.tell() == 100 * KiB + 4
        assert r.seek(-4, os.SEEK_CUR) == 100 * KiB
        assert r.seek(-4 * KiB, os.SEEK_END) == 8188 * KiB
        assert r.read() == b"\x44" * 4 * KiB
        assert r.read(10) == b""
        assert r.seek(10, os.SEEK_END) == 8 * MiB + 10  # past the end is allowed
        assert r.read(1) == b""
        assert r.readinto(bytearray(10)) == 0
        with pytest.raises(ValueError, match="negative seek"):
            r.seek(-1)
        with pytest.raises(ValueError, match="whence"):
            r.seek(0, 7)


def test_readinto_short_at_end_and_partial_buffers(image: Path) -> None:
    with pyqcow.open(image) as img, img.reader() as r:
        r.seek(8 * MiB - 100)
        buf = bytearray(4096)
        assert r.readinto(buf) == 100
        assert buf[:100] == b"\x44" * 100 and buf[100:] == bytes(3996)
        r.seek(0)
        mv = memoryview(bytearray(64 * KiB + 16))
        assert r.readinto(mv[8:]) == 64 * KiB + 8
        assert mv[8 : 8 + 64 * KiB] == b"\x11" * 64 * KiB
        arr = __import__("array").array("I", bytes(16))  # non-byte buffers work too
        r.seek(0)
        assert r.readinto(arr) == 16
        assert arr.tobytes() == b"\x11" * 16


def test_closed_reader_refuses_and_leaves_the_image_open(image: Path) -> None:
    with pyqcow.open(image) as img:
        r = img.reader()
        r.close()
        assert r.closed
        with pytest.raises(ValueError):
            r.read(1)
        with pytest.raises(ValueError):
            r.readinto(bytearray(1))
        with pytest.raises(ValueError):
            r.seek(0)
        assert img.read(0, 4) == b"\x11" * 4  # the image is still usable
        assert img.reader().read(4) == b"\x11" * 4


def test_full_content_read_readall_buffered_and_copyfileobj(image: Path, tmp_path: Path) -> None:
    want = expected(image, tmp_path)
    with pyqcow.open(image) as img:
        assert img.reader().read() == want
        assert img.reader().readall() == want
        assert io.BufferedReader(img.reader(), 1 << 20).read() == want
        out = io.BytesIO()
        shutil.copyfileobj(img.reader(), out, 3 * MiB + 17)
        assert out.getvalue() == want


def test_random_probes_match_qemu(image: Path, tmp_path: Path) -> None:
    want = expected(image, tmp_path)
    rng = random.Random(6)
    with pyqcow.open(image) as img, img.reader() as r:
        buf = bytearray(300 * KiB)
        for _ in range(300):
            off = rng.randrange(len(want))
            n = rng.choice([1, 511, 4096, 65536, rng.randrange(1, len(buf))])
            r.seek(off)
            got = r.readinto(memoryview(buf)[:n])
            assert got == min(n, len(want) - off)
            assert buf[:got] == want[off : off + got], (off, n)
            r.seek(off)
            assert r.read(n) == want[off : off + n]


def test_several_readers_keep_their_own_position(image: Path) -> None:
    with pyqcow.open(image) as img:
        a, b = img.reader(), img.reader()
        a.seek(100 * KiB)
        assert b.read(2) == b"\x11\x11"
        assert a.read(2) == b"\x22\x22"


def test_raw_image_reader(tmp_path: Path) -> None:
    p = tmp_path / "disk.raw"
    data = random.Random(1).randbytes(3 * MiB + 5)
    p.write_bytes(data)
    with pyqcow.open(p) as img:
        assert img.format == "raw"
        # like qemu, a raw disk is whole 512-byte sectors: the tail reads as zeros
        padded = data + bytes(-len(data) % 512)
        assert img.virtual_size == len(padded)
        r = img.reader()
        assert r.read() == padded
        r.seek(-512, os.SEEK_END)
        assert r.read(1000) == padded[-512:]


# -- read path details ------------------------------------------------------------
def test_zero_fill_any_length() -> None:
    for n in (0, 1, 4096, (2 << 20) - 1, 2 << 20, (5 << 20) + 3):
        buf = bytearray(b"\xff" * n)
        zero_fill(memoryview(buf))
        assert buf.count(0) == n


def test_reads_see_unflushed_writes(image: Path, tmp_path: Path) -> None:
    """The read path walks live tables: a writable image reads its dirty L2 state."""
    work = tmp_path / "rw.qcow2"
    shutil.copyfile(image, work)
    with pyqcow.open(work, "r+") as img:
        r = img.reader()
        before = r.read(128 * KiB)
        img.write(4 * KiB, b"\xaa" * 8 * KiB)
        img.write(3 * MiB, b"\xbb" * 70 * KiB)  # new clusters, unflushed L2
        img.write_zeroes(0, 4 * KiB)
        r.seek(0)
        after = r.read(128 * KiB)
        assert after[:4 * KiB] == bytes(4 * KiB)
        assert after[4 * KiB : 12 * KiB] == b"\xaa" * 8 * KiB
        assert after[12 * KiB :] == before[12 * KiB :]
        r.seek(3 * MiB - 1)
        assert r.read(70 * KiB + 2) == b"\0" + b"\xbb" * 70 * KiB + b"\0"
        assert img.read(3 * MiB + 5, 3) == b"\xbb" * 3
    qemu.qemu_io(work, "read -P 0xbb 3M 70k", "read -P 0xaa 4k 8k", read_only=True)


# -- snapshots --------------------------------------------------------------------
@pytest.fixture
def snapshotted(tmp_path: Path) -> Path:
    p = qemu.create(tmp_path / "snap.qcow2", 4 * MiB)
    qemu.qemu_io(p, "write -P 0x51 0 128k")
    qemu.snapshot_create(p, "first")
    qemu.qemu_io(p, "write -P 0x52 64k 64k", "write -P 0x53 1M 4k")
    qemu.snapshot_create(p, "second")
    qemu.qemu_io(p, "write -P 0x54 0 4k", "discard 1M 64k")
    return p


def test_snapshot_views(snapshotted: Path, tmp_path: Path) -> None:
    with pyqcow.open(snapshotted) as img:
        infos = img.snapshots
        assert [(s.id_str, s.name) for s in infos] == [("1", "first"), ("2", "second")]
        for key, qemu_name in (("first", "first"), ("2", "second"), ("1", "first")):
            view = img.snapshot(key)
            assert view.name == qemu_name
            assert view.virtual_size == 4 * MiB
            assert view.reader().read() == expected(snapshotted, tmp_path, qemu_name)
        assert img.reader().read() == expected(snapshotted, tmp_path)
        view = img.snapshot("first")
        assert view.read(64 * KiB, 4) == b"\x51" * 4
        with pytest.raises(OperationError, match="outside the disk"):
            view.read(4 * MiB - 1, 2)
        with pytest.raises(OperationError, match="no internal snapshot .*'nope'"):
            img.snapshot("nope")


def test_snapshot_view_has_the_snapshot_disk_size(tmp_path: Path) -> None:
    """After a resize the view keeps the snapshot's size; qemu-img convert -l pads with zeros."""
    p = qemu.create(tmp_path / "grow.qcow2", 4 * MiB)
    qemu.qemu_io(p, "write -P 0x61 4032k 64k")
    qemu.snapshot_create(p, "small")
    qemu.qemu_img("resize", "-q", p, "8M")
    qemu.qemu_io(p, "write -P 0x62 6M 64k")
    want = expected(p, tmp_path, "small")
    assert len(want) == 8 * MiB and want[4 * MiB :] == bytes(4 * MiB)
    with pyqcow.open(p) as img:
        view = img.snapshot("small")
        assert view.virtual_size == 4 * MiB
        assert view.reader().read() == want[: 4 * MiB]
        assert img.reader().read(8 * MiB)[6 * MiB : 6 * MiB + 4] == b"\x62" * 4


def test_snapshot_view_of_an_overlay_reads_the_backing_file(tmp_path: Path) -> None:
    base = qemu.create(tmp_path / "base.qcow2", 2 * MiB)
    qemu.qemu_io(base, "write -P 0x71 0 2M")
    top = qemu.create(tmp_path / "top.qcow2", None, backing=base, backing_fmt="qcow2")
    qemu.qemu_io(top, "write -P 0x72 64k 64k")
    qemu.snapshot_create(top, "s")
    qemu.qemu_io(top, "write -P 0x73 0 1M")
    with pyqcow.open(top) as img:
        view = img.snapshot("s")
        assert view.backing is img.backing
        data = view.reader().read()
        assert data == expected(top, tmp_path, "s")
        assert data[:4] == b"\x71" * 4 and data[64 * KiB : 64 * KiB + 4] == b"\x72" * 4


def test_guest_reader_over_any_object_with_readinto() -> None:
    class Fake:
        virtual_size = 10

        def readinto(self, buf, offset):
            mv = memoryview(buf).cast("B")
            for i in range(len(mv)):
                mv[i] = offset + i

        def read(self, offset, length):
            buf = bytearray(length)
            self.readinto(buf, offset)
            return bytes(buf)

    r = GuestReader(Fake())
    r.seek(3)
    assert r.read(4) == bytes([3, 4, 5, 6])
    assert r.read() == bytes([7, 8, 9])
    assert hashlib.sha256(GuestReader(Fake()).read()).digest() == hashlib.sha256(bytes(range(10))).digest()
