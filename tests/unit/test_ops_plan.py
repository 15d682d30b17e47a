"""The chain-operation planner: pieces above a base, unallocated ranges, byte counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import qemu

import pyqcow
from pyqcow.ops.commit import plan_commit
from pyqcow.ops.merge import plan_merge
from pyqcow.ops.plan import Piece, _add, data_bytes, pieces_above, unallocated_ranges
from pyqcow.ops.stream import plan_stream

KiB = 1024
C = 64 * KiB

pytestmark = pytest.mark.usefixtures("qemu_img_path", "qemu_io_path")


def _chain(d: Path, *, top_size: int | None = None) -> Path:
    """base (1 MiB): data 0-4C, zero 6C, data 8C-10C; mid: data 2C, zero 9C; top: data 3C, 12C."""
    base = qemu.create(d / "base.qcow2", 16 * C)
    qemu.qemu_io(base, f"write -P 1 0 {4 * C}", f"write -z {6 * C} {C}", f"write -P 2 {8 * C} {2 * C}")
    mid = qemu.create(d / "mid.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qemu.qemu_io(mid, f"write -P 3 {2 * C} {C}", f"write -z {9 * C} {C}")
    top = qemu.create(d / "top.qcow2", top_size, backing="mid.qcow2", backing_fmt="qcow2", cwd=d)
    qemu.qemu_io(top, f"write -P 4 {3 * C} {C}", f"write -P 5 {12 * C} {C}")
    return top


def _kinds(pieces: list[Piece]) -> list[tuple[int, int, str, str | None]]:
    return [(p.guest_offset // C, p.length // C, p.kind,
             None if p.layer is None else Path(p.layer.path).stem) for p in pieces]


def test_pieces_above_base(tmp_path):
    top_path = _chain(tmp_path)
    with pyqcow.open(str(top_path)) as top:
        mid = top.backing
        base = mid.backing
        pieces = pieces_above(top, base, 0, top.virtual_size)
        assert _kinds(pieces) == [
            (0, 2, "below", None),
            (2, 1, "data", "mid"),
            (3, 1, "data", "top"),
            (4, 5, "below", None),
            (9, 1, "zero", "mid"),
            (10, 2, "below", None),
            (12, 1, "data", "top"),
            (13, 3, "below", None),
        ]
        assert sum(p.length for p in pieces) == top.virtual_size
        assert data_bytes(pieces) == 3 * C
        # above the mid only: the top's two clusters
        assert data_bytes(pieces_above(top, mid, 0, top.virtual_size)) == 2 * C
        # with no base (the whole chain): the base's data and zeros show up too
        whole = pieces_above(top, None, 0, top.virtual_size)
        assert data_bytes(whole) == (4 + 2) * C
        # adjacent zero pieces merge whatever their origin (zero cluster or no data at all)
        assert [(p.guest_offset // C, p.length // C) for p in whole if p.kind == "zero"] == [
            (4, 4), (9, 3), (13, 3)]
        assert not [p for p in whole if p.kind == "below"]


def test_pieces_above_sub_range_and_past_backing_end(tmp_path):
    top_path = _chain(tmp_path, top_size=20 * C)
    with pyqcow.open(str(top_path)) as top:
        base = top.backing.backing
        pieces = pieces_above(top, base, 2 * C + 100, 2 * C)
        assert [(p.guest_offset, p.length, p.kind) for p in pieces] == [
            (2 * C + 100, C - 100, "data"), (3 * C, C, "data"), (4 * C, 100, "below")]
        # the top is bigger than its backing: past the backing's end reads zeros
        tail = pieces_above(top, base, 14 * C, 6 * C)
        assert [(p.guest_offset // C, p.length // C, p.kind) for p in tail] == [(14, 2, "below"), (16, 4, "zero")]


def test_unallocated_ranges_and_plans(tmp_path):
    top_path = _chain(tmp_path)
    with pyqcow.open(str(top_path)) as top:
        assert unallocated_ranges(top) == [(0, 3 * C), (4 * C, 8 * C), (13 * C, 3 * C)]
        assert unallocated_ranges(top, 3 * C, 2 * C) == [(4 * C, C)]
        mid = top.backing
        assert data_bytes(plan_commit(top, mid)) == 2 * C
        # stream into the top from everything below: base data 0-4C minus the top's 3C,
        # the mid's 2C (already counted), base 8C-10C minus the mid's zero at 9C
        assert data_bytes(plan_stream(top, None)) == (3 + 1) * C
        assert data_bytes(plan_stream(top, mid.backing)) == 1 * C  # the mid's cluster 2


def test_plan_merge_counts_and_steps(tmp_path):
    top_path = _chain(tmp_path)
    plan = plan_merge(top_path, keep="base", via="auto")
    assert plan.commit_bytes == 2 * C
    # streaming the mid into the top: what the mid (above the base) shows, minus the top
    assert plan.stream_bytes == C
    assert plan.via == "stream"
    assert plan.new_backing == "base.qcow2" and plan.new_backing_format == "qcow2"
    assert plan.kept_path.endswith("mid.qcow2") and plan.removed_path.endswith("top.qcow2")
    assert any("rename" in s for s in plan.steps)
    plan = plan_merge(top_path, keep="top", via="commit")
    assert plan.via == "commit" and any("rename" in s for s in plan.steps)
    plan = plan_merge(top_path, keep="top", via="stream")
    assert not any("rename" in s for s in plan.steps)
    with pytest.raises(pyqcow.QcowError, match="--keep"):
        plan_merge(top_path, keep="middle")
    with pytest.raises(pyqcow.QcowError, match="--via"):
        plan_merge(top_path, via="teleport")


def test_add_merges_adjacent_holes_only():
    out: list[Piece] = []
    _add(out, Piece(0, 10, "below"))
    _add(out, Piece(10, 5, "below"))
    _add(out, Piece(15, 5, "zero"))
    _add(out, Piece(20, 5, "zero"))
    _add(out, Piece(25, 0, "zero"))
    _add(out, Piece(25, 5, "data"))
    _add(out, Piece(30, 5, "data"))
    assert [(p.guest_offset, p.length, p.kind) for p in out] == [
        (0, 15, "below"), (15, 10, "zero"), (25, 5, "data"), (30, 5, "data")]


# --------------------------------------------------------------------------- prepare_write


@pytest.mark.parametrize("opts", [(), ("extended_l2=on",), ("cluster_size=512",)])
def test_prepare_write_contiguous_and_in_place(tmp_path, opts):
    import os

    from pyqcow.image import QcowImage

    img_path = qemu.create(tmp_path / "d.qcow2", 4 * 1024 * KiB, *opts)
    with pyqcow.open(str(img_path)) as probe:
        cs = probe.cluster_size
    # clusters 2-3 private already, cluster 5 compressed (must be replaced)
    qemu.qemu_io(img_path, f"write -P 0x11 {2 * cs} {2 * cs}", f"write -c -P 0x22 {5 * cs} {cs}")
    length = 300 * cs if cs == 512 else 10 * cs  # 512-byte clusters: across several L2 tables
    with QcowImage(str(img_path), "r+") as img:
        def per_cluster(runs):
            return {(g + k) // cs: h + k for g, h, n in runs for k in range(0, n, cs)}

        old = per_cluster(img.prepare_write(2 * cs, 2 * cs))
        runs = img.prepare_write(0, length)
        assert sum(n for _, _, n in runs) == length
        hosts = per_cluster(runs)
        assert hosts[2] == old[2] and hosts[3] == old[3]
        # fresh clusters come in contiguous runs, broken only where a new L2 table
        # (512-byte clusters: every 64 clusters) takes a cluster of its own
        per_l2 = cs // (16 if "extended_l2=on" in opts else 8)
        breaks = sum(1 for c in range(7, length // cs) if hosts[c] != hosts[c - 1] + cs)
        assert breaks <= length // cs // per_l2 + 1, breaks
        for c, h in hosts.items():
            os.pwrite(img.data_hf.fd, bytes([0x40 + c % 64]) * cs, h)
        img.flush()
    res, rc = qemu.check_json(img_path)
    assert rc == 0 and not res.get("leaks"), res
    for c in (0, 2, 5, length // cs - 1):
        qemu.qemu_io(img_path, f"read -P {0x40 + c % 64:#x} {c * cs} {cs}", read_only=True)


@pytest.mark.parametrize(("keep", "expected"), [("base", "commit"), ("top", "stream")])
def test_plan_merge_tie_goes_to_the_direction_without_a_rename(tmp_path, keep, expected):
    """Equal byte counts: auto takes the direction that needs no rename (commit when
    keeping base, stream when keeping top).  Flipping the tie-break must fail here."""
    base = qemu.create(tmp_path / "base.qcow2", 8 * C)
    qemu.qemu_io(base, f"write -P 0x11 0 {C}")
    top = qemu.create(tmp_path / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2",
                      cwd=tmp_path)
    qemu.qemu_io(top, f"write -P 0x22 {4 * C} {C}")
    plan = plan_merge(top, keep=keep, via="auto")
    assert plan.commit_bytes == plan.stream_bytes == C
    assert plan.via == expected
    assert not any("rename" in s for s in plan.steps)


def _per_cluster(pieces: list[Piece]) -> dict[int, tuple]:
    out = {}
    for p in pieces:
        for g in range(p.guest_offset, p.end, C):
            host = None
            if p.run is not None and p.run.host_offset is not None:
                host = p.run.host_offset + (g - p.run.guest_offset)
            # (the layer of a zero piece is not kept when _add merges zeros)
            layer = p.layer.path if p.kind == "data" else None
            out[g] = (p.kind, layer, host)
    return out


@pytest.mark.parametrize("base_layer", [None, "base"])
def test_plan_stream_is_the_backing_seen_through_top_holes(tmp_path, base_layer):
    """plan_stream walks the backing chain once and clips it to top's holes: the
    same pieces (kind, layer, host offset per cluster) as a walk per hole."""
    top_path = _chain(tmp_path)
    with pyqcow.open(str(top_path)) as top:
        base = top.backing.backing if base_layer else None
        expected = []
        for start, length in unallocated_ranges(top):
            expected.extend(pieces_above(top.backing, base, start, length))
        got = plan_stream(top, base)
        assert len(unallocated_ranges(top)) > 1  # the clipping is exercised
        assert _per_cluster(got) == _per_cluster(expected)
        assert sum(p.length for p in got) == sum(n for _, n in unallocated_ranges(top))


@pytest.mark.parametrize("opts", [(), ("extended_l2=on",), ("cluster_size=512",)])
def test_prepare_writes_many_ranges_one_run(tmp_path, opts):
    """prepare_writes: scattered ranges at once; private clusters kept in place, a
    compressed one replaced, every other new cluster in one contiguous run
    (512-byte clusters: broken only where a new L2 table took a cluster, which
    happens before the data clusters are allocated, so not at all)."""
    import os

    from pyqcow.image import QcowImage

    img_path = qemu.create(tmp_path / "d.qcow2", 4 * 1024 * KiB, *opts)
    with pyqcow.open(str(img_path)) as probe:
        cs = probe.cluster_size
    qemu.qemu_io(img_path, f"write -P 0x11 {2 * cs} {2 * cs}", f"write -c -P 0x22 {5 * cs} {cs}")
    n = 200 if cs == 512 else 12
    # over the private 2-3 and the compressed 5, then ranges with gaps between them
    ranges = [(0, 6 * cs)] + [(c * cs, cs * (1 + c % 3)) for c in range(10, 5 * n, 5)]
    with QcowImage(str(img_path), "r+") as img:
        with pytest.raises(ValueError, match="sorted"):
            img.writer.prepare_writes([(cs, cs), (0, cs)])
        old = {2: None, 3: None}
        for c in old:
            old[c] = img.runs(c * cs, cs)[0].host_offset
        handle = img.writer.prepare_writes(ranges)
        hosts = {(g + k) // cs: h + k for g, h, ln in handle for k in range(0, ln, cs)}
        assert sorted(hosts) == sorted(c for g, ln in ranges for c in range(g // cs, (g + ln) // cs))
        assert hosts[2] == old[2] and hosts[3] == old[3]
        fresh = sorted(h for c, h in hosts.items() if c not in (2, 3))
        if "extended_l2=on" not in opts:  # (the per-range path there)
            assert fresh == list(range(fresh[0], fresh[0] + len(fresh) * cs, cs))
        for c, h in hosts.items():
            os.pwrite(img.data_hf.fd, bytes([0x40 + c % 64]) * cs, h)
        handle.filled()
        img.flush()
    res, rc = qemu.check_json(img_path)
    assert rc == 0 and not res.get("leaks"), res
    for c in (0, 2, 5, 10, 5 * n - 5):
        qemu.qemu_io(img_path, f"read -P {0x40 + c % 64:#x} {c * cs} {cs}", read_only=True)
    qemu.qemu_io(img_path, f"read -P 0 {6 * cs} {4 * cs}", read_only=True)  # a gap: untouched
