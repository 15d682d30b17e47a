"""The public API of DESIGN.md section 6, end to end on small images."""

from __future__ import annotations

import json
from pathlib import Path

import qemu

import pyqcow


def test_create_write_map_commit(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    pyqcow.create(base, 4 << 20)
    with pyqcow.open(base, "r+") as img:
        img.write(0, b"\x11" * 200_000)
    assert pyqcow.create(top, backing="base.qcow2") == "qcow2"  # probed format returned
    with pyqcow.open(top, "r+") as img:
        assert img.virtual_size == 4 << 20
        assert [i.format for i in img.chain] == ["qcow2", "qcow2"]
        img.write(65536, b"\x22" * 65536)
        img.write_zeroes(3 << 20, 65536)
    with pyqcow.open(top) as img:
        ours = [e.as_json() for e in img.map()]
        expected = img.read(0, img.virtual_size)
    assert ours == json.loads(qemu.qemu_img("map", "--output=json", str(top)))
    res = pyqcow.commit(top)
    assert res.emptied
    with pyqcow.open(base) as img:
        assert img.read(0, img.virtual_size) == expected
    assert pyqcow.check(base).clean


def test_merge_and_rebase_api(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    pyqcow.create(base, 1 << 20)
    with pyqcow.open(base, "r+") as img:
        img.write(0, b"\x33" * (1 << 20))
    pyqcow.create(top, backing="base.qcow2", backing_format="qcow2")
    with pyqcow.open(top, "r+") as img:
        img.write(4096, b"\x44" * 100)
        expected = img.read(0, 1 << 20)
    plan = pyqcow.merge(top, keep="top", dry_run=True)
    assert plan.via == "commit" and plan.commit_bytes < plan.stream_bytes and not plan.done
    pyqcow.rebase(top, "", unsafe=False)  # full stream: standalone image
    with pyqcow.open(top) as img:
        assert img.backing is None
        assert img.read(0, 1 << 20) == expected


def test_create_small_cluster_with_backing_drops_feature_table(tmp_path: Path) -> None:
    """512-byte clusters leave no room for the feature name table next to a backing name."""
    base = tmp_path / "base.qcow2"
    pyqcow.create(base, 1 << 20, cluster_size=512)
    top = tmp_path / ("t" * 200 + ".qcow2")
    pyqcow.create(top, backing=base.name, backing_format="qcow2", cluster_size=512)
    info = json.loads(qemu.qemu_img("info", "--output=json", str(top)))
    assert info["backing-filename"] == base.name and info["cluster-size"] == 512
    assert json.loads(qemu.qemu_img("check", "--output=json", str(top)))["check-errors"] == 0
