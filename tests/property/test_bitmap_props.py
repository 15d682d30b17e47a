"""Property: after random guest writes / write_zeroes / discards through pyqcow (in
one or more open-close sessions), every enabled persistent bitmap holds exactly
the granules the requests touched (plus what it held before), compared with a
set-of-granules model; a disabled bitmap is unchanged; the image checks clean.
A few examples are also read back by qemu itself (qemu-nbd -B + qemu-img map).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import qemu
from hypothesis import given, settings
from hypothesis import strategies as st
from nbd_bitmap import assert_clean, bitmap_flags, granule_ranges, granules_of, qemu_dirty
from qemu import create, qemu_img, qemu_io

import pyqcow
from pyqcow.bitmaps import read_bitmap
from pyqcow.image import QcowImage

KiB = 1024
SIZE = 1024 * KiB + 1536  # not a multiple of any granularity: a short last granule

_TEMPLATES: dict[tuple[int, int], str] = {}


def _template(cluster_size: int, gran: int) -> str:
    """An image per (cluster size, granularity), made once per process by qemu-img."""
    key = (cluster_size, gran)
    if key not in _TEMPLATES:
        d = tempfile.mkdtemp(prefix="pyqcow-bm-props-")
        p = os.path.join(d, "t.qcow2")
        create(p, SIZE, f"cluster_size={cluster_size}")
        qemu_img("bitmap", "--add", "-g", str(gran), p, "on")
        qemu_img("bitmap", "--add", "--disable", "-g", str(gran), p, "off")
        qemu_io(p, "write 0 512")  # a bit qemu set before
        _TEMPLATES[key] = p
    return _TEMPLATES[key]


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    qemu.require_tool("qemu-img")
    qemu.require_tool("qemu-io")
    yield
    for p in _TEMPLATES.values():
        shutil.rmtree(os.path.dirname(p), ignore_errors=True)
    _TEMPLATES.clear()


@st.composite
def _op(draw):
    kind = draw(st.sampled_from(["write", "zero", "discard"]))
    offset = draw(st.integers(0, SIZE - 1))
    length = draw(st.integers(1, min(SIZE - offset, 300 * KiB)))
    return kind, offset, length


_case = st.tuples(
    st.sampled_from([512, 4096, 65536]),
    st.sampled_from([512, 4096, 65536, 128 * KiB]),
    st.lists(st.lists(_op(), min_size=1, max_size=6), min_size=1, max_size=3),
)


def _run(cluster_size: int, gran: int, sessions, d: str) -> tuple[str, set[int]]:
    p = os.path.join(d, "a.qcow2")
    shutil.copyfile(_template(cluster_size, gran), p)
    model = granules_of(0, 512, gran)
    for ops in sessions:
        with pyqcow.open(p, "r+") as img:
            for kind, off, n in ops:
                if kind == "write":
                    img.write(off, bytes([off % 251 + 1]) * n)
                elif kind == "zero":
                    img.write_zeroes(off, n)
                else:
                    img.discard(off, n)
                model |= granules_of(off, n, gran)
    return p, model


@given(_case)
@settings(max_examples=25)
def test_bitmap_is_exactly_the_written_granules(case) -> None:
    cluster_size, gran, sessions = case
    with tempfile.TemporaryDirectory(prefix="pyqcow-bm-") as d:
        p, model = _run(cluster_size, gran, sessions, d)
        with QcowImage(p) as img:
            on, off = read_bitmap(img, "on"), read_bitmap(img, "off")
            assert not on.in_use and not off.in_use
            assert on.dirty_ranges() == granule_ranges(model, gran, SIZE) or (
                # dirty_ranges reports whole granules: the last one may pass SIZE
                _whole(on.dirty_ranges(), SIZE) == granule_ranges(model, gran, SIZE)
            )
            assert off.dirty_ranges() == []  # disabled before qemu's write


def _whole(ranges, size):
    return [(o, min(size, o + n) - o) for o, n in ranges]


@given(_case)
@settings(max_examples=4)
def test_bitmap_as_qemu_reads_it(case) -> None:
    qemu.require_tool("qemu-nbd")
    cluster_size, gran, sessions = case
    with tempfile.TemporaryDirectory(prefix="pyqcow-bm-") as d:
        p, model = _run(cluster_size, gran, sessions, d)
        assert_clean(p)
        assert all("in-use" not in f for f in bitmap_flags(p).values())
        assert qemu_dirty(p, "on") == granule_ranges(model, gran, SIZE)
        assert qemu_dirty(p, "off") == []
