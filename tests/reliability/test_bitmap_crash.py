"""Crash at every fault point of a write + close on an image with persistent
bitmaps (issue 11, item 4): after the crash (page cache kept) and after a power
cut (every un-fsynced write dropped), qemu-img check finds no corruption, and
every bitmap is either flagged in use (invalid: qemu will not use it) or valid:
an enabled one covers every granule whose guest content changed, the disabled
one is exactly as before.  Never a consistent-looking bitmap that misses a
change.
"""

from __future__ import annotations

import os
import shutil

import crashkit
import pytest
import qemu
from nbd_bitmap import bitmap_flags, granules_of, qemu_dirty
from qemu import create, qemu_img, qemu_io

import pyqcow

KiB = 1024
MiB = 1024 * KiB
G = 64 * KiB
SIZE = 4 * MiB


def _pristine(d: str) -> str:
    os.makedirs(d)
    p = os.path.join(d, "a.qcow2")
    create(p, SIZE)
    qemu_img("bitmap", "--add", p, "b0")
    qemu_img("bitmap", "--add", "--disable", p, "off")
    qemu_io(p, "write -P 1 0 4k")  # b0 has a data cluster of qemu's own
    qemu_img("bitmap", "--enable", p, "off")
    qemu_io(p, "write -P 1 1M 4k")
    qemu_img("bitmap", "--disable", p, "off")
    return p


def _op(work: str) -> None:
    with pyqcow.open(os.path.join(work, "a.qcow2"), "r+") as img:
        img.write(8 * KiB, b"\x22" * 4096)
        img.write(2 * MiB, b"\x33" * (128 * KiB))
        img.flush()
        img.write_zeroes(1 * MiB, 64 * KiB)


def _granules(ranges) -> set[int]:
    out: set[int] = set()
    for o, n in ranges:
        out |= granules_of(o, n, G)
    return out


def _verify(work: str, before: bytes, b0_before: set[int], off_before: list) -> None:
    p = os.path.join(work, "a.qcow2")
    rc, res = crashkit.qemu_check(p)
    assert rc in (0, 3) and not res.get("corruptions"), res
    data = crashkit.qemu_read(p)
    changed = {i // G for i in range(0, SIZE, 512) if data[i : i + 512] != before[i : i + 512]}
    flags = bitmap_flags(p)
    assert set(flags) == {"b0", "off"}
    if "in-use" not in flags["b0"]:
        got = _granules(qemu_dirty(p, "b0"))
        assert got >= changed | b0_before, (sorted(changed), sorted(got))
    if "in-use" not in flags["off"]:
        assert qemu_dirty(p, "off") == off_before


def _run(tmp_path, every: int) -> int:
    pristine = str(tmp_path / "pristine")
    p = _pristine(pristine)
    before = crashkit.qemu_read(p)
    b0_before = _granules(qemu_dirty(p, "b0"))
    off_before = qemu_dirty(p, "off")
    work = str(tmp_path / "work")
    points = crashkit.count_points(pristine, work, _op)
    assert "fsync" in points
    n = 0
    for i in range(0, len(points), every):
        for torn in (False, True):
            crashkit.copy_dir(pristine, work)
            inj = crashkit.Injector(mode="crash", at=i, journal=torn, stash=work + ".stash")
            with inj, pytest.raises(crashkit.SimulatedCrash):
                _op(work)
            if torn:
                inj.torn(work, None)
                shutil.rmtree(work + ".stash", ignore_errors=True)
            try:
                _verify(work, before, b0_before, off_before)
            except AssertionError as e:
                raise AssertionError(f"crash at point {i} ({points[i]}), torn={torn}: {e}") from e
            n += 1
    # and without a crash: both bitmaps valid, the enabled one updated
    crashkit.copy_dir(pristine, work)
    _op(work)
    p = os.path.join(work, "a.qcow2")
    assert all("in-use" not in f for f in bitmap_flags(p).values())
    assert crashkit.qemu_check(p)[0] == 0
    assert _granules(qemu_dirty(p, "b0")) == b0_before | {0, 16, 32, 33}
    return n


@pytest.fixture(autouse=True)
def _tools() -> None:
    for t in ("qemu-img", "qemu-io", "qemu-nbd"):
        qemu.require_tool(t)


def test_bitmaps_crash_points_sampled(tmp_path) -> None:
    assert _run(tmp_path, every=4) > 4


@pytest.mark.slow
def test_bitmaps_crash_points_all(tmp_path) -> None:
    assert _run(tmp_path, every=1) > 10
