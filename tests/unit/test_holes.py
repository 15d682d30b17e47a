"""Holes in regular files: HostFile.punch_hole really deallocates, so a raw
image's write_zeroes and convert's zero ranges into an existing raw file leave
holes.  (punch_hole called ``os.fallocate``, which CPython does not have: it
returned False every time and the callers wrote zeros instead.)"""

from __future__ import annotations

import os

import pytest
from host_needs import require_native

import pyqcow
from pyqcow import fastcopy
from pyqcow.hostfile import HostFile

MiB = 1 << 20


def _data_file(path, size=4 * MiB):
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    return path


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def native():
    require_native()


def test_punch_hole_deallocates(tmp_path, native):
    p = _data_file(tmp_path / "f.bin")
    hf = HostFile(p, writable=True)
    try:
        assert hf.punch_hole(MiB, 2 * MiB)
    finally:
        hf.close()
    assert os.path.getsize(p) == 4 * MiB  # KEEP_SIZE
    assert _allocated(p) <= 2 * MiB + 64 * 1024
    with open(p, "rb") as f:
        f.seek(MiB)
        assert f.read(2 * MiB) == bytes(2 * MiB)


def test_raw_write_zeroes_leaves_a_hole(tmp_path, native):
    p = _data_file(tmp_path / "disk.raw")
    with pyqcow.open(str(p), "r+", format="raw") as img:
        img.write_zeroes(0, 3 * MiB)
        img.flush()
        assert img.read(0, 3 * MiB) == bytes(3 * MiB)
    assert _allocated(p) <= MiB + 64 * 1024


def test_punch_hole_without_the_helper_says_no(tmp_path):
    p = _data_file(tmp_path / "f.bin", MiB)
    hf = HostFile(p, writable=True)
    try:
        with fastcopy.backend("python"):
            assert not hf.punch_hole(0, MiB)
    finally:
        hf.close()
    assert _allocated(p) >= MiB
