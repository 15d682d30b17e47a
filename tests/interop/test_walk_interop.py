"""The one reference walker (pyqcow.walk) against qemu-img check.

On images qemu made (internal snapshots, compressed clusters, persistent
bitmaps, extended L2, refcount widths), qemu-img check says the stored
refcounts are exact.  The walker's records, counted per host cluster, must then
equal the stored refcounts and the in-memory refcount table of pyqcow's scan,
and its active data records must give qemu's allocated and compressed counts.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import qemu

from pyqcow.chain import open_image
from pyqcow.orphans import reference_counts, stored_refcounts
from pyqcow.scan import Scanner
from pyqcow.walk import walk_references

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    qemu.require_tool("qemu-img")
    qemu.require_tool("qemu-io")


def _writes(path: Path, seed: int, count: int, size: int, unit: int) -> None:
    rng = random.Random(seed)
    cmds = []
    for _ in range(count):
        off = rng.randrange(size // unit) * unit
        n = rng.choice((1, 2, 5)) * unit
        n = min(n, size - off)
        cmds.append(f"write -P {rng.randrange(1, 256)} {off} {n}")
    qemu.qemu_io(path, *cmds)


def _plain(tmp: Path) -> Path:
    p = qemu.create(tmp / "plain.qcow2", 8 * MiB)
    _writes(p, 1, 20, 8 * MiB, 64 * KiB)
    return p


def _snapshots(tmp: Path) -> Path:
    p = qemu.create(tmp / "snap.qcow2", 8 * MiB, "cluster_size=4096")
    _writes(p, 2, 30, 8 * MiB, 4 * KiB)
    qemu.snapshot_create(p, "s1")
    _writes(p, 3, 30, 8 * MiB, 4 * KiB)
    qemu.snapshot_create(p, "s2")
    _writes(p, 4, 10, 8 * MiB, 4 * KiB)
    qemu.qemu_io(p, "discard 0 1M")
    return p


def _compressed(tmp: Path) -> Path:
    src = qemu.create(tmp / "csrc.qcow2", 4 * MiB)
    qemu.qemu_io(src, "write -P 0x11 0 1M", "write -P 0x22 2M 512k", "write -z 3M 64k")
    p = tmp / "comp.qcow2"
    qemu.qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", src, p)
    _writes(p, 5, 10, 4 * MiB, 4 * KiB)  # normal clusters beside the compressed ones
    qemu.snapshot_create(p, "after")
    return p


def _bitmaps(tmp: Path) -> Path:
    p = qemu.create(tmp / "bm.qcow2", 16 * MiB)
    qemu.bitmap_add(p, "b1")
    qemu.bitmap_add(p, "b2", granularity=512)
    _writes(p, 6, 20, 16 * MiB, 64 * KiB)
    return p


def _extended(tmp: Path) -> Path:
    p = qemu.create(tmp / "ext.qcow2", 8 * MiB, "extended_l2=on", "cluster_size=65536")
    _writes(p, 7, 40, 8 * MiB, 2 * KiB)  # subcluster-sized writes
    qemu.qemu_io(p, "write -z 1M 128k", "write -z -u 3M 64k")
    qemu.snapshot_create(p, "x")
    _writes(p, 8, 10, 8 * MiB, 2 * KiB)
    return p


def _refcount_bits(tmp: Path) -> Path:
    p = qemu.create(tmp / "rc.qcow2", 4 * MiB, "refcount_bits=2", "cluster_size=4096")
    _writes(p, 9, 20, 4 * MiB, 4 * KiB)
    qemu.snapshot_create(p, "a")
    qemu.snapshot_create(p, "b")  # refcount 3 = the 2-bit maximum
    return p


SHAPES = {
    "plain": _plain,
    "snapshots": _snapshots,
    "compressed": _compressed,
    "bitmaps": _bitmaps,
    "extended_l2": _extended,
    "refcount_bits_2": _refcount_bits,
}

EXPECTED_KINDS = {
    "plain": {"header", "refcount_table", "refcount_block", "l1_table", "l2_table", "data"},
    "snapshots": {"snapshot_table", "l1_table", "l2_table", "data"},
    "compressed": {"compressed", "data", "snapshot_table"},
    "bitmaps": {"bitmap_directory", "bitmap_table", "bitmap_data"},
    "extended_l2": {"data", "snapshot_table"},
    "refcount_bits_2": {"snapshot_table", "data"},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_walker_counts_are_the_refcounts_qemu_checks(tmp_path: Path, shape: str) -> None:
    path = SHAPES[shape](tmp_path)
    report, status = qemu.check_json(path)
    assert status == 0, report
    with open_image(path, "r", backing=False) as img:
        walk = walk_references(img)
        assert walk.errors == []
        kinds = {r.kind for r in walk.references}
        assert EXPECTED_KINDS[shape] <= kinds, kinds
        counts = reference_counts(img, walk)
        stored = stored_refcounts(img)
        assert walk.errors == []  # nothing reached past the end of the file
        assert counts.tolist() == stored.tolist()[: len(counts)]
        # the scan's in-memory refcount table (what check compares) agrees
        scanner = Scanner(img, lambda line: None)
        scanner.calculate(0)
        imrt = scanner.imrt.tolist()
        n = max(len(imrt), len(counts))
        assert imrt + [0] * (n - len(imrt)) == counts.tolist() + [0] * (n - len(counts))
        # active data: qemu's allocated and compressed cluster counts
        cs = img.cluster_size
        active = [r for r in walk.references if r.owner == "active"]
        compressed = sum(1 for r in active if r.kind == "compressed")
        allocated = compressed + sum(
            r.length // cs for r in active if r.kind in ("data", "zero_alloc")
        )
        assert allocated == report.get("allocated-clusters", 0)
        assert compressed == report.get("compressed-clusters", 0)
        if shape == "compressed":
            assert compressed


@pytest.mark.parametrize("shape", ["snapshots", "bitmaps"])
def test_walker_owners_name_snapshots_and_bitmaps(tmp_path: Path, shape: str) -> None:
    path = SHAPES[shape](tmp_path)
    with open_image(path, "r", backing=False) as img:
        walk = walk_references(img)
        owners = {r.owner for r in walk.references}
    if shape == "snapshots":
        assert {"image", "active", "snapshot 1 (s1)", "snapshot 2 (s2)"} <= owners
    else:
        assert {"bitmap b1", "bitmap b2"} <= owners


@pytest.mark.parametrize("shape", ["snapshots", "compressed", "extended_l2"])
def test_one_l1_tree_is_the_walk_of_that_owner(tmp_path: Path, shape: str) -> None:
    """``l1_tree`` (what a snapshot operation counts) gives the references the whole
    walk attributes to that L1's owner, minus the L1 table itself."""
    from pyqcow.walk import cluster_references, l1_tree

    path = SHAPES[shape](tmp_path)
    with open_image(path, "r", backing=False) as img:
        walk = walk_references(img)
        trees = [("active", img.l1, img.virtual_size)]
        for sn in walk.snapshots:
            trees.append((f"snapshot {sn.id_str} ({sn.name})", walk.snapshot_l1[sn.id_str],
                          sn.disk_size))
        assert len(trees) > 1
        cb = img.cluster_bits
        total = cluster_references(
            [r for r in walk.references if r.owner == "image" or r.kind == "l1_table"], cb
        )
        for owner, l1, disk_size in trees:
            tree = l1_tree(img, l1, owner, disk_size)
            assert tree.errors == []
            want = [r for r in walk.references if r.owner == owner and r.kind != "l1_table"]
            assert tree.references == want
            total.update(cluster_references(tree.references, cb))
        # per cluster: the trees plus the fixed structures are the refcounts qemu checked
        counts = reference_counts(img, walk)
        assert total == {c: n for c, n in enumerate(counts) if n}
        assert counts.tolist() == stored_refcounts(img).tolist()[: len(counts)]


def test_problems_of_one_tree(tmp_path: Path) -> None:
    """A data cluster that is unaligned, one past the end of the file and an L2 table
    past the end of the file are Problems, in walk order; the walk goes on (the
    records are still made, ``errors`` names only the L2 table, as before) unless
    asked to stop at the first one."""
    from pyqcow import spec
    from pyqcow.walk import l1_tree

    p = qemu.create(tmp_path / "a.qcow2", "1G")
    qemu.qemu_io(p, "write -P 1 0 64k", "write -P 2 128k 64k", "write -P 3 512M 64k")
    with open_image(p, "r", backing=False) as img:
        l1_offset = img.header.l1_table_offset
        l2 = img.l1[0] & spec.L1E_OFFSET_MASK
        e0, e2 = img.l2_table(l2)[0], img.l2_table(l2)[2]
        l1e1 = img.l1[1]
    keep = ~spec.L2E_OFFSET_MASK
    bad0 = (e0 & keep) | ((e0 & spec.L2E_OFFSET_MASK) + 512)
    bad2 = (e2 & keep) | (1 << 40)
    with open(p, "r+b") as f:
        for off, value in ((l2, bad0), (l2 + 16, bad2), (l1_offset + 8, (l1e1 & keep) | 1 << 40)):
            f.seek(off)
            f.write(value.to_bytes(8, "big"))
    with open_image(p, "r", backing=False) as img:
        w = l1_tree(img, img.l1)
        assert [(q.kind, q.l1_index, q.host_offset, q.entry) for q in w.problems] == [
            ("data", 0, bad0 & spec.L2E_OFFSET_MASK, bad0),
            ("data", 0, 1 << 40, bad2),
            ("l2_table", 1, 1 << 40, 0),
        ]
        assert [r.host_offset for r in w.references if r.kind == "data"] == [
            bad0 & spec.L2E_OFFSET_MASK, 1 << 40,
        ]
        assert w.errors == ["active: L2 table at 0x10000000000 (L1 index 1) is beyond the "
                            "end of the file"]
        assert len(walk_references(img).errors) == 1
        first = l1_tree(img, img.l1, stop_at_problem=True)
        assert [q.kind for q in first.problems] == ["data"]
