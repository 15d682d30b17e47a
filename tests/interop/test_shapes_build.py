"""The shape registry builds valid images: qemu-img itself accepts every shape.

This is the oracle's self-test.  If it fails, pyqcow comparisons on the shapes
mean nothing.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
from interop.shapes import SHAPES, Shape
from qemu import check_json, incompatible_features, info_json, map_json, qemu_io, require_tool


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")


@pytest.fixture(params=sorted(SHAPES), ids=sorted(SHAPES))
def shape(request: pytest.FixtureRequest, tmp_path: Path) -> Shape:
    return SHAPES[request.param](tmp_path)


def test_registry_is_not_empty() -> None:
    assert len(SHAPES) >= 20


def test_shape_builds_valid_image(shape: Shape) -> None:
    assert shape.path.exists()
    assert shape.path in shape.files
    for f in shape.files:
        assert f.exists(), f"{shape.name}: missing {f}"

    report, rc = check_json(shape.path)
    if shape.dirty:
        assert incompatible_features(shape.path) & 1, "dirty bit (byte 79, bit 0) not set"
        assert info_json(shape.path)["dirty-flag"] is True
        assert rc in (0, 2, 3)
    else:
        assert rc == 0, f"{shape.name}: qemu-img check exit {rc}: {report}"
        assert report.get("corruptions", 0) == 0
        assert report.get("leaks", 0) == 0
        assert report.get("check-errors", 0) == 0

    extents = map_json(shape.path)
    assert isinstance(extents, list) and extents
    info = info_json(shape.path)
    assert extents[0]["start"] == 0
    end = extents[-1]["start"] + extents[-1]["length"]
    assert end == info["virtual-size"]
    for a, b in itertools.pairwise(extents):
        assert a["start"] + a["length"] == b["start"], "map extents must be contiguous"

    chain = info_json(shape.path, backing_chain=True)
    assert isinstance(chain, list)
    if "chain" in shape.tags:
        assert len(chain) >= 2
        assert "backing-filename" in chain[0]
    else:
        assert len(chain) == 1


def test_shape_expected_contents(shape: Shape) -> None:
    """Every Shape.expect range reads back as its byte (qemu-io read -P)."""
    assert shape.expect, f"{shape.name}: no expected contents listed"
    cmds = [f"read -P {byte:#x} {off} {length}" for off, length, byte in shape.expect]
    qemu_io(shape.path, *cmds, read_only=True)


def test_dirty_lazy_shape_repairs(tmp_path: Path) -> None:
    """The dirty shape is really dirty-but-repairable, not corrupt."""
    shape = SHAPES["lazy_dirty"](tmp_path)
    copy = tmp_path / "repaired.qcow2"
    shutil.copyfile(shape.path, copy)
    check_json(copy, repair="all")
    report, rc = check_json(copy)
    assert rc == 0, report
    assert not incompatible_features(copy) & 1
    assert info_json(copy)["dirty-flag"] is False
    qemu_io(copy, *(f"read -P {b:#x} {o} {n}" for o, n, b in shape.expect), read_only=True)
