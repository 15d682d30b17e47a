"""Internal snapshots (pyqcow.snapshot, ``pyqcow snapshot``) against qemu-img 7.2.

qemu-img is the oracle throughout: after each of our operations
``qemu-img snapshot -l`` / ``info`` show the table we expect, ``qemu-img
check`` is clean (no leaks, no corruptions: the COPIED flags agree with the
refcounts), and ``qemu-img convert -l snapshot.id=N -O raw`` of every snapshot
and a plain convert of the active layer read what they read before (after
``-a``: the applied snapshot's content).  Writes after a snapshot, through
pyqcow and through qemu-io, never change a snapshot.

What qemu-img 7.2.22 does, and these tests pin down (or deliberately differ from):

- ``snapshot -c`` writes 24 bytes of extra data (vm_state_size_large 0,
  disk_size, icount 0), v2 and v3 alike; IDs are max(numeric id) + 1.
- ``snapshot -c`` accepts a duplicate name (two entries with one name);
  pyqcow refuses it (issue 7).
- ``snapshot -a X`` looks for ID X first, then name X; ``snapshot -d X``
  matches names only ("snapshot not found" for an ID): pyqcow tries the name
  first and falls back to an ID, so it never deletes a different snapshot.
- ``snapshot -a`` of a snapshot taken at another virtual size resizes the
  disk to the snapshot's size (shrinking too); the L1 table never shrinks.
- ``snapshot -l`` prints nothing at all for an image without snapshots, and
  lists nothing for an image with an external data file, where ``-c`` fails.
- Deleting the last snapshot leaves nb_snapshots 0 and snapshots_offset 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from interop.shapes import SHAPES, shapes_without
from qemu import (
    QemuError,
    check_json,
    compare,
    convert_raw,
    create,
    header_bytes,
    qemu_img,
    qemu_io,
    require_tool,
)

import pyqcow
from pyqcow import spec
from pyqcow.cli.main import main as cli_main
from pyqcow.errors import CorruptImageError, OperationError, QcowError, UnsupportedFeatureError
from pyqcow.ops.snapshot import (
    SnapshotExistsError,
    SnapshotNotFoundError,
    apply_snapshot,
    create_snapshot,
    delete_snapshot,
    list_snapshots,
    snapshot,
)

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")


# --- oracles -------------------------------------------------------------------


def qemu_snapshots(path: Path) -> list[tuple[str, str]]:
    """(id, name) of every snapshot, as qemu-img info --output=json lists them."""
    info = json.loads(qemu_img("info", "--output=json", "-U", path))
    return [(s["id"], s["name"]) for s in info.get("snapshots", [])]


def assert_clean(path: Path) -> None:
    result, status = check_json(path)
    assert status == 0, result
    assert result.get("leaks", 0) == 0 and result.get("corruptions", 0) == 0, result
    assert result["check-errors"] == 0, result


class Contents:
    """Raw copies (made by qemu-img convert) of the active layer and of snapshots."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.n = 0

    def raw(self, path: Path, snap_id: str | None = None) -> Path:
        self.n += 1
        dst = self.tmp / f"c{self.n}.raw"
        convert_raw(path, dst, None if snap_id is None else f"snapshot.id={snap_id}")
        return dst

    def all(self, path: Path) -> dict[str | None, Path]:
        out: dict[str | None, Path] = {None: self.raw(path)}
        for sid, _ in qemu_snapshots(path):
            out[sid] = self.raw(path, sid)
        return out


def same(a: Path, b: Path) -> bool:
    return compare(a, b, strict=True, fmt_a="raw", fmt_b="raw") == 0


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def qemu_made(tmp: Path, *opts: str, size: str = "4M") -> Path:
    """An image with two qemu-made snapshots, shared, COWed, compressed and zero clusters."""
    p = create(tmp / "q.qcow2", size, *opts)
    compressed = "cluster_size=512" not in opts
    cmds = ["write -P 0x11 0 192k", "write -P 0x12 1M 64k"]
    if compressed:
        cmds.append("write -c -P 0x13 2M 64k")
    qemu_io(p, *cmds)
    qemu_img("snapshot", "-c", "s1", p)
    cmds = ["write -P 0x21 64k 64k", "write -z 1M 64k", "write -P 0x22 3M 4k"]
    qemu_io(p, *cmds)
    qemu_img("snapshot", "-c", "s2", p)
    qemu_io(p, "write -P 0x31 0 4k", "write -P 0x32 2M 64k")
    return p


# --- the full cycle on images with qemu-made snapshots ---------------------------


@pytest.mark.parametrize(
    "opts",
    [
        pytest.param((), id="v3"),
        pytest.param(("cluster_size=512",), id="c512"),
        # v2, extended L2 and wide refcounts also go through test_every_shape
        pytest.param(("compat=0.10",), id="v2", marks=pytest.mark.slow),
        pytest.param(("extended_l2=on",), id="extl2", marks=pytest.mark.slow),
        pytest.param(("refcount_bits=4",), id="rc4", marks=pytest.mark.slow),
    ],
)
def test_cycle_with_qemu_snapshots(tmp_path: Path, opts: tuple[str, ...]) -> None:
    p = qemu_made(tmp_path, *opts)
    c = Contents(tmp_path)
    before = c.all(p)
    assert qemu_snapshots(p) == [("1", "s1"), ("2", "s2")]

    # -c
    with pyqcow.open(p, "r+") as img:
        info = create_snapshot(img, "ours", vm_clock_nsec=1_500_000_000)
    assert (info.id_str, info.name) == ("3", "ours")
    assert qemu_snapshots(p) == [("1", "s1"), ("2", "s2"), ("3", "ours")]
    assert_clean(p)
    after = c.all(p)
    for k in before:
        assert same(before[k], after[k]), k
    assert same(after["3"], before[None])
    sn = json.loads(qemu_img("info", "--output=json", p))["snapshots"][2]
    assert sn["vm-clock-sec"] == 1 and sn["vm-clock-nsec"] == 500_000_000
    assert sn["icount"] == 0 and sn["vm-state-size"] == 0

    # writes after the snapshot: pyqcow, then qemu-io
    with pyqcow.open(p, "r+") as img:
        img.write(0, b"\x41" * 100_000)
        img.write(2 * MiB + 512, b"\x42" * 512)
        img.write_zeroes(1 * MiB, 64 * KiB)
    qemu_io(p, "write -P 0x43 64k 128k", "write -P 0x44 3M 4k")
    assert_clean(p)
    for sid in ("1", "2", "3"):
        assert same(c.raw(p, sid), after[sid]), sid
    active = c.raw(p)
    assert not same(active, after[None])

    # -a (ID first: "1")
    apply_snapshot(p, "1")
    assert_clean(p)
    assert same(c.raw(p), before["1"])
    for sid in ("1", "2", "3"):
        assert same(c.raw(p, sid), after[sid]), sid
    qemu_io(p, "write -P 0x55 0 64k")  # the snapshot stays put
    assert same(c.raw(p, "1"), before["1"])
    assert_clean(p)

    # -d (a name), then the rest; COPIED flags come back (check stays clean)
    delete_snapshot(p, "s2")
    assert qemu_snapshots(p) == [("1", "s1"), ("3", "ours")]
    assert_clean(p)
    assert same(c.raw(p, "3"), before[None])
    assert same(c.raw(p, "1"), before["1"])
    current = c.raw(p)
    delete_snapshot(p, "ours")
    delete_snapshot(p, "s1")
    assert qemu_snapshots(p) == []
    assert_clean(p)
    assert same(c.raw(p), current)
    with pyqcow.open(p) as img:
        assert img.header.nb_snapshots == 0 and img.header.snapshots_offset == 0
    # nothing shared any more: qemu writes in place, and the image stays clean
    qemu_io(p, "write -P 0x66 0 64k")
    assert_clean(p)


def test_qemu_operates_on_our_snapshots(tmp_path: Path) -> None:
    p = create(tmp_path / "a.qcow2", "2M")
    qemu_io(p, "write -P 1 0 128k", "write -c -P 2 1M 64k")
    c = Contents(tmp_path)
    first = c.raw(p)
    create_snapshot(p, "a")
    qemu_io(p, "write -P 3 0 64k")
    second = c.raw(p)
    create_snapshot(p, "b")
    qemu_io(p, "write -P 4 64k 64k")
    assert_clean(p)
    qemu_img("snapshot", "-a", "a", p)
    assert same(c.raw(p), first)
    assert_clean(p)
    qemu_img("snapshot", "-d", "a", p)
    assert same(c.raw(p, "2"), second)
    assert_clean(p)
    qemu_img("snapshot", "-c", "c", p)  # qemu appends to the table we wrote
    assert qemu_snapshots(p) == [("2", "b"), ("3", "c")]
    delete_snapshot(p, "c")
    apply_snapshot(p, "b")
    assert same(c.raw(p), second)
    assert_clean(p)


def test_many_snapshots_table_grows(tmp_path: Path) -> None:
    """Entries over many 512-byte clusters: the table moves on every change."""
    p = create(tmp_path / "a.qcow2", "1M", "cluster_size=512")
    qemu_io(p, "write -P 1 0 8k")
    names = [f"snapshot-number-{i:04d}-" + "x" * 30 for i in range(30)]
    with pyqcow.open(p, "r+") as img:
        for name in names:
            create_snapshot(img, name)
        assert img.header.nb_snapshots == 30
        assert sum(s.entry_size for s in img.snapshots) > 6 * img.cluster_size
    assert [n for _, n in qemu_snapshots(p)] == names
    assert_clean(p)
    with pyqcow.open(p, "r+") as img:
        for name in names[::2]:
            delete_snapshot(img, name)
    assert [n for _, n in qemu_snapshots(p)] == names[1::2]
    assert_clean(p)
    qemu_io(p, "read -P 1 0 8k")


def test_apply_resizes_like_qemu(tmp_path: Path) -> None:
    p = create(tmp_path / "a.qcow2", "1M")
    q = tmp_path / "b.qcow2"
    qemu_io(p, "write -P 1 0 64k")
    create_snapshot(p, "small")
    qemu_img("resize", "-q", p, "600M")
    qemu_io(p, "write -P 2 500M 64k")
    create_snapshot(p, "big")
    shutil.copy(p, q)
    c = Contents(tmp_path)
    big = c.raw(p)
    apply_snapshot(p, "small")
    qemu_img("snapshot", "-a", "small", q)
    ours, theirs = (json.loads(qemu_img("info", "--output=json", x)) for x in (p, q))
    assert ours["virtual-size"] == theirs["virtual-size"] == 1 * MiB
    with pyqcow.open(p) as a, pyqcow.open(q) as b:
        assert a.header.l1_size == b.header.l1_size
        assert a.read(0, 64 * KiB) == b"\x01" * 64 * KiB
    assert_clean(p)
    apply_snapshot(p, "big")
    assert json.loads(qemu_img("info", "--output=json", p))["virtual-size"] == 600 * MiB
    assert same(c.raw(p), big)
    assert_clean(p)


# --- every image shape ------------------------------------------------------------

# no internal snapshots with an external data file; a dirty image is repaired
# first; 16 TiB cannot be converted to a raw file on ext4
_SHAPES = [n for n in shapes_without("huge", "dirty", "data_file") if n != "refcount1"]


@pytest.mark.parametrize("name", _SHAPES)
def test_every_shape(tmp_path: Path, name: str) -> None:
    shape = SHAPES[name](tmp_path)
    p = shape.path
    c = Contents(tmp_path)
    before = c.all(p)
    old = qemu_snapshots(p)
    info = create_snapshot(p, "pyqcow")
    assert qemu_snapshots(p) == [*old, (info.id_str, "pyqcow")]
    assert_clean(p)
    with pyqcow.open(p, "r+") as img:
        size = img.virtual_size
        img.write(0, b"\x5a" * 70_000)
        img.write(size - 4096, b"\x5b" * 4096)
    assert same(c.raw(p, info.id_str), before[None])
    for sid, _ in old:
        assert same(c.raw(p, sid), before[sid])
    bitmaps = "bitmap" in shape.tags
    if bitmaps:  # as qemu-img: "Device has active dirty bitmaps"
        _unchanged(p, lambda: apply_snapshot(p, info.id_str), OperationError, "dirty bitmaps")
    else:
        apply_snapshot(p, info.id_str)
        assert same(c.raw(p), before[None])
        assert_clean(p)
    delete_snapshot(p, "pyqcow")
    assert qemu_snapshots(p) == old
    assert_clean(p)
    if not bitmaps:
        assert same(c.raw(p), before[None])


def _bitmaps(path: Path) -> list:
    info = json.loads(qemu_img("info", "--output=json", path))
    return info["format-specific"]["data"].get("bitmaps", [])


def test_bitmaps_as_qemu(tmp_path: Path) -> None:
    """-c and -d leave persistent bitmaps valid (the guest data does not change), as
    qemu-img does; -a is refused while there are bitmaps, as qemu-img refuses it."""
    p = create(tmp_path / "a.qcow2", "4M")
    qemu_io(p, "write -P 1 0 64k")
    qemu_img("bitmap", "--add", p, "enabled")
    qemu_img("bitmap", "--add", "--disable", p, "disabled")
    q = tmp_path / "b.qcow2"
    shutil.copy(p, q)
    create_snapshot(p, "x")
    qemu_img("snapshot", "-c", "x", q)
    assert _bitmaps(p) == _bitmaps(q) and all("in-use" not in b["flags"] for b in _bitmaps(p))
    with pytest.raises(QemuError, match="dirty bitmaps"):
        qemu_img("snapshot", "-a", "x", q)
    _unchanged(p, lambda: apply_snapshot(p, "x"), OperationError, "dirty bitmaps")
    delete_snapshot(p, "x")
    qemu_img("snapshot", "-d", "x", q)
    assert _bitmaps(p) == _bitmaps(q)
    assert_clean(p)


# --- names and IDs ------------------------------------------------------------------


def test_ids_and_names_as_qemu(tmp_path: Path) -> None:
    p = create(tmp_path / "a.qcow2", "1M")
    qemu_io(p, "write -P 1 0 64k")
    create_snapshot(p, "x")  # ID 1
    qemu_io(p, "write -P 2 0 64k")
    create_snapshot(p, "1")  # ID 2, named like ID 1
    qemu_io(p, "write -P 3 0 64k")
    q = tmp_path / "b.qcow2"
    shutil.copy(p, q)
    # -a: an ID first
    apply_snapshot(p, "1")
    qemu_img("snapshot", "-a", "1", q)
    for x in (p, q):
        qemu_io(x, "read -P 1 0 64k")
    # -d: a name first (qemu-img matches names only)
    delete_snapshot(p, "1")
    qemu_img("snapshot", "-d", "1", q)
    assert qemu_snapshots(p) == qemu_snapshots(q) == [("1", "x")]
    # where qemu finds no name, we fall back to the ID
    with pytest.raises(QemuError, match="snapshot not found"):
        qemu_img("snapshot", "-d", "1", q)
    delete_snapshot(p, "1")
    assert qemu_snapshots(p) == []
    # new IDs: max + 1, as qemu (after deleting 1, the next is 1 again if empty)
    create_snapshot(p, "y")
    assert qemu_snapshots(p) == [("1", "y")]
    qemu_img("snapshot", "-c", "z", p)
    create_snapshot(p, "w")
    assert qemu_snapshots(p) == [("1", "y"), ("2", "z"), ("3", "w")]
    assert_clean(p)


def test_entry_matches_qemu_bytes(tmp_path: Path) -> None:
    """Our entry has the layout qemu writes: 24 bytes of extra data, disk size, icount 0."""
    p = create(tmp_path / "a.qcow2", "3M")
    qemu_img("snapshot", "-c", "q", p)
    create_snapshot(p, "p", date=(1_700_000_000, 123_456_000))
    a, b = list_snapshots(p)
    assert a.extra_data == b.extra_data
    assert len(b.extra_data) == 24 and b.disk_size == 3 * MiB and b.icount == 0
    assert (b.date_sec, b.date_nsec) == (1_700_000_000, 123_456_000)
    assert b.entry_size == a.entry_size


def test_convenience_function(tmp_path: Path) -> None:
    p = create(tmp_path / "a.qcow2", "1M")
    assert snapshot(p, "-l") == []
    snapshot(p, "create", "a")
    snapshot(p, "c", "b")
    assert [s.name for s in snapshot(p, "list")] == ["a", "b"]
    snapshot(p, "-a", "a")
    snapshot(p, "d", "a")
    assert [s.name for s in list_snapshots(p)] == ["b"]
    with pytest.raises(ValueError):
        snapshot(p, "x", "b")
    assert_clean(p)


# --- bad input: a clear error and the image unchanged -------------------------------


def _unchanged(path: Path, fn, exc, match: str) -> None:
    digest = file_digest(path)
    with pytest.raises(exc, match=match) as ei:
        fn()
    assert digest == file_digest(path)
    assert str(path) in str(ei.value) or os.fspath(path) == ei.value.path


def test_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = create(tmp_path / "a.qcow2", "1M")
    qemu_io(p, "write -P 1 0 64k")
    create_snapshot(p, "a")
    create_snapshot(p, "b")
    _unchanged(p, lambda: apply_snapshot(p, "nope"), SnapshotNotFoundError, "no internal snapshot")
    _unchanged(p, lambda: delete_snapshot(p, "3"), SnapshotNotFoundError, "no internal snapshot")
    _unchanged(p, lambda: create_snapshot(p, "a"), SnapshotExistsError, "already exists")
    _unchanged(p, lambda: create_snapshot(p, ""), OperationError, "empty")
    _unchanged(p, lambda: create_snapshot(p, "n" * 256), OperationError, "too long")
    monkeypatch.setattr(spec, "MAX_SNAPSHOTS", 2)
    _unchanged(p, lambda: create_snapshot(p, "c"), OperationError, "too many snapshots")
    monkeypatch.setattr(spec, "MAX_SNAPSHOTS", 65536)
    monkeypatch.setattr(spec, "MAX_SNAPSHOTS_TABLE_BYTES", 150)
    _unchanged(p, lambda: create_snapshot(p, "c"), OperationError, "64 MiB")
    monkeypatch.undo()
    with pyqcow.open(p) as img:  # read-only
        _unchanged(p, lambda: create_snapshot(img, "c"), OperationError, "read-only")
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    _unchanged(raw, lambda: create_snapshot(raw, "c"), QcowError, "qcow2")
    assert_clean(p)


def test_refcount_bits_1(tmp_path: Path) -> None:
    p = create(tmp_path / "a.qcow2", "1M", "refcount_bits=1")
    create_snapshot(p, "empty")  # nothing to share: qemu allows it too
    delete_snapshot(p, "empty")
    qemu_io(p, "write -P 1 0 64k")
    _unchanged(p, lambda: create_snapshot(p, "a"), UnsupportedFeatureError, "refcount_bits=1")
    assert_clean(p)


def test_refcount_bits_2_limit(tmp_path: Path) -> None:
    p = create(tmp_path / "a.qcow2", "1M", "refcount_bits=2")
    qemu_io(p, "write -P 1 0 64k")
    create_snapshot(p, "a")
    create_snapshot(p, "b")  # refcount 3 = the maximum
    _unchanged(p, lambda: create_snapshot(p, "c"), OperationError, "would exceed 3")
    assert_clean(p)


def test_external_data_file(tmp_path: Path) -> None:
    p = create(tmp_path / "a.qcow2", "1M", f"data_file={tmp_path / 'a.data'}")
    with pytest.raises(QemuError):
        qemu_img("snapshot", "-c", "x", p)
    _unchanged(p, lambda: create_snapshot(p, "x"), UnsupportedFeatureError, "external data file")
    assert list_snapshots(p) == []


def test_corrupt_refcount_refused(tmp_path: Path) -> None:
    """A referenced cluster whose refcount is too low: refuse before changing anything."""
    p = create(tmp_path / "a.qcow2", "1M")
    qemu_io(p, "write -P 1 0 64k")
    with pyqcow.open(p) as img:
        l2 = img.l1[0] & spec.L1E_OFFSET_MASK
        host = img.l2_table(l2)[0] & spec.L2E_OFFSET_MASK
        cluster = host >> img.cluster_bits
        rt = img.header.refcount_table_offset
        block = int.from_bytes(img.hf.pread(8, rt), "big")
    with open(p, "r+b") as f:
        f.seek(block + 2 * cluster)
        f.write((0).to_bytes(2, "big"))
    _unchanged(p, lambda: create_snapshot(p, "x"), CorruptImageError, "refcount 0")


def _l2_slot(p: Path, l1_index: int = 0, l2_index: int = 0) -> tuple[int, int]:
    """(file offset, value) of one L2 entry of the active tree."""
    with pyqcow.open(p) as img:
        l2 = img.l1[l1_index] & spec.L1E_OFFSET_MASK
        return l2 + 8 * l2_index, img.l2_table(l2)[l2_index]


def _poke(p: Path, offset: int, value: int) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(8, "big"))


@pytest.mark.parametrize("damage", ["unaligned", "past_eof"])
def test_corrupt_data_cluster_refused(tmp_path: Path, damage: str) -> None:
    """A data cluster the refcount update cannot count (unaligned, or past the end of
    the file): create, apply and delete refuse it before writing anything, naming
    the tree and the raw L2 entry."""
    p = create(tmp_path / "a.qcow2", "1M")
    qemu_io(p, "write -P 1 0 64k", "write -P 2 128k 64k")
    create_snapshot(p, "a")
    slot, e = _l2_slot(p, 0, 2)  # guest 128k: its own cluster, not the first one
    host = e & spec.L2E_OFFSET_MASK
    bad_host = host + 512 if damage == "unaligned" else 1 << 40
    bad = (e & ~spec.L2E_OFFSET_MASK) | bad_host
    _poke(p, slot, bad)
    msg = re.escape(f"L2 entry {bad:#018x} points at an invalid data cluster")
    _unchanged(p, lambda: create_snapshot(p, "x"), CorruptImageError, "active L1: " + msg)
    # the snapshot shares the table: apply counts the snapshot's tree first, delete
    # only that tree
    _unchanged(p, lambda: apply_snapshot(p, "a"), CorruptImageError, "snapshot 1: " + msg)
    _unchanged(p, lambda: delete_snapshot(p, "a"), CorruptImageError, "snapshot 1: " + msg)


def test_corrupt_compressed_cluster_refused(tmp_path: Path) -> None:
    """A compressed cluster starting past the end of the file is refused by create."""
    p = create(tmp_path / "a.qcow2", "1M")
    qemu_io(p, "write -c -P 3 0 64k")
    slot, e = _l2_slot(p)
    assert e & spec.QCOW_OFLAG_COMPRESSED
    size = os.path.getsize(p)
    shift = 62 - (16 - 8)  # cluster_bits 16: the host offset field is bits 0..53
    bad_host = (size + (1 << 20)) & ~0x1FF
    bad = (e & ~((1 << shift) - 1)) | bad_host
    _poke(p, slot, bad)
    msg = re.escape(f"active L1: compressed cluster at {bad_host:#x} lies outside the file")
    _unchanged(p, lambda: create_snapshot(p, "x"), CorruptImageError, msg)


@pytest.mark.parametrize("damage", ["unaligned", "past_eof"])
def test_corrupt_l2_table_refused(tmp_path: Path, damage: str) -> None:
    """An L1 entry pointing at an unaligned L2 table or one past the end of the file."""
    p = create(tmp_path / "a.qcow2", "1M")
    qemu_io(p, "write -P 1 0 64k")
    with pyqcow.open(p) as img:
        l1_offset = img.header.l1_table_offset
        l1e = img.l1[0]
    l2 = l1e & spec.L1E_OFFSET_MASK
    bad_l2 = l2 + 512 if damage == "unaligned" else 1 << 40
    _poke(p, l1_offset, (l1e & ~spec.L1E_OFFSET_MASK) | bad_l2)
    msg = re.escape(f"active L1: L1 entry 0 points at an invalid L2 table {bad_l2:#x}")
    _unchanged(p, lambda: create_snapshot(p, "x"), CorruptImageError, msg)


# --- CLI ------------------------------------------------------------------------------


def test_cli_list_matches_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = create(tmp_path / "a.qcow2", "1M")
    assert cli_main(["snapshot", "-l", str(p)]) == 0
    assert capsys.readouterr().out == qemu_img("snapshot", "-l", p) == ""
    qemu_img("snapshot", "-c", "qemu-made", p)
    assert cli_main(["snapshot", "-c", "ours", str(p)]) == 0
    assert cli_main(["snapshot", "-c", "a much longer snapshot name", str(p)]) == 0
    assert cli_main(["snapshot", "-c", "ünï", str(p)]) == 0  # qemu pads by bytes
    capsys.readouterr()
    assert cli_main(["snapshot", "-l", str(p)]) == 0
    assert capsys.readouterr().out == qemu_img("snapshot", "-l", p)
    assert cli_main(["snapshot", "-l", "--output", "json", str(p)]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours == json.loads(qemu_img("info", "--output=json", p))["snapshots"]
    assert cli_main(["snapshot", "-a", "ours", str(p)]) == 0
    assert cli_main(["snapshot", "-d", "qemu-made", str(p)]) == 0
    assert [n for _, n in qemu_snapshots(p)] == ["ours", "a much longer snapshot name", "ünï"]
    assert_clean(p)


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = create(tmp_path / "a.qcow2", "1M")
    assert cli_main(["snapshot", "-c", "a", str(p)]) == 0
    capsys.readouterr()
    for argv in (["-c", "a"], ["-a", "zz"], ["-d", "zz"]):
        assert cli_main(["snapshot", *argv, str(p)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"pyqcow: {p}: ") and err.count("\n") == 1, err
    assert cli_main(["snapshot", "-l", str(tmp_path / "missing.qcow2")]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert cli_main(["snapshot", "-c", "x", "-d", "y", str(p)]) != 0
    assert cli_main(["snapshot", str(p)]) != 0
    capsys.readouterr()
    assert [n for _, n in qemu_snapshots(p)] == ["a"]


# --- hypothesis: random writes / snapshot operations against a model ------------------

_SIZE = 512 * KiB
_CLUSTER = 4 * KiB

_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"),
            st.integers(0, _SIZE - 1),
            st.integers(1, 3 * _CLUSTER),
            st.integers(1, 255),
        ),
        st.tuples(st.just("qwrite"), st.integers(0, _SIZE // 512 - 1), st.integers(1, 16),
                  st.integers(1, 255)),
        st.tuples(
            st.sampled_from(["zero", "discard"]),
            st.integers(0, _SIZE - 1),
            st.integers(1, 3 * _CLUSTER),
        ),
        st.tuples(st.just("cwrite"), st.integers(0, 63), st.integers(0, 255)),
        st.tuples(st.just("create")),
        st.tuples(st.just("apply"), st.integers(0, 7)),
        st.tuples(st.just("delete"), st.integers(0, 7)),
    ),
    min_size=1,
    max_size=10,
)


@settings(
    max_examples=int(os.environ.get("SNAPSHOT_EXAMPLES", "12")),  # more: SNAPSHOT_EXAMPLES=200
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=_ops, kind=st.sampled_from(["v3", "v2", "extended_l2"]))
def test_random_sequences_match_model(
    tmp_path_factory: pytest.TempPathFactory, ops, kind: str
) -> None:
    tmp = tmp_path_factory.mktemp("hyp")
    extended = kind == "extended_l2"
    cluster = 16 * _CLUSTER if extended else _CLUSTER
    opts = [f"cluster_size={cluster}"] + (["extended_l2=on"] if extended else [])
    if kind == "v2":
        opts.append("compat=0.10")
    p = create(tmp / "m.qcow2", _SIZE, *opts)
    active = bytearray(_SIZE)
    snaps: dict[str, bytes] = {}
    counter = 0
    for op in ops:
        kind = op[0]
        if kind == "write":
            _, off, n, b = op
            n = min(n, _SIZE - off)
            with pyqcow.open(p, "r+") as img:
                img.write(off, bytes([b]) * n)
            active[off : off + n] = bytes([b]) * n
        elif kind == "qwrite":
            _, sector, count, b = op
            off, n = sector * 512, min(count * 512, _SIZE - sector * 512)
            qemu_io(p, f"write -P {b} {off} {n}")
            active[off : off + n] = bytes([b]) * n
        elif kind == "cwrite":  # one compressed cluster (packed by the writer)
            _, index, b = op
            off = index * cluster % _SIZE
            data = bytes([b]) * (cluster // 2) + bytes(range(256)) * (cluster // 512)
            z = zlib.compressobj(6, zlib.DEFLATED, -12)
            with pyqcow.open(p, "r+") as img:
                img.write_compressed(off, z.compress(data) + z.flush())
            active[off : off + cluster] = data
        elif kind in ("zero", "discard"):
            _, off, n = op
            n = min(n, _SIZE - off)
            with pyqcow.open(p, "r+") as img:
                if kind == "zero":
                    img.write_zeroes(off, n)
                    active[off : off + n] = bytes(n)
                else:  # whole clusters only (writer.discard); nothing behind: zeros
                    img.discard(off, n)
                    start, end = -(-off // cluster) * cluster, (off + n) // cluster * cluster
                    if off + n == _SIZE:
                        end = _SIZE
                    if end > start:
                        active[start:end] = bytes(end - start)
        elif kind == "create":
            counter += 1
            create_snapshot(p, f"s{counter}")
            snaps[f"s{counter}"] = bytes(active)
        elif snaps:
            name = sorted(snaps)[op[1] % len(snaps)]
            if kind == "apply":
                apply_snapshot(p, name)
                active[:] = snaps[name]
            else:
                delete_snapshot(p, name)
                del snaps[name]
    assert_clean(p)
    assert sorted(n for _, n in qemu_snapshots(p)) == sorted(snaps)
    assert convert_raw(p, tmp / "active.raw").read_bytes() == active
    ids = {n: i for i, n in qemu_snapshots(p)}
    for name, content in snaps.items():
        got = convert_raw(p, tmp / f"{name}.raw", f"snapshot.id={ids[name]}").read_bytes()
        assert got == content, name


def test_apply_snapshot_without_disk_size(tmp_path: Path) -> None:
    """An entry without extra data (old qemu): its disk size is the image's current
    size, possibly past the snapshot's own L1 table (qemu grows the L1)."""
    p = create(tmp_path / "a.qcow2", "1M", "cluster_size=4k", "compat=0.10")  # v3 needs 16
    qemu_io(p, "write -P 1 0 8k")
    qemu_img("snapshot", "-c", "old", p)
    with pyqcow.open(p) as img:
        (sn,) = img.snapshots
        at = sn.table_offset
    raw = bytearray(header_bytes(p, at, sn.entry_size))
    extra = int.from_bytes(raw[36:40], "big")
    body = raw[40 + extra :]
    raw[36:40] = bytes(4)
    raw[40:] = body + bytes(extra)
    with open(p, "r+b") as f:
        f.seek(at)
        f.write(raw)
    with pyqcow.open(p, "r+") as img:  # qemu-img refuses: "a v2 image which has snapshots"
        img.resize(8 * MiB)  # past the old L1 (one entry maps 2 MiB)
    qemu_io(p, "write -P 2 6M 4k")
    q = tmp_path / "b.qcow2"
    shutil.copy(p, q)
    (sn,) = list_snapshots(p)
    assert sn.disk_size == 8 * MiB and sn.l1_size == 1
    apply_snapshot(p, "old")
    qemu_img("snapshot", "-a", "old", q)
    with pyqcow.open(p) as a, pyqcow.open(q) as b:
        assert (a.virtual_size, a.header.l1_size) == (b.virtual_size, b.header.l1_size)
        assert a.read(0, 8 * MiB) == b.read(0, 8 * MiB)
    assert_clean(p)


def test_raw_image_refused(tmp_path: Path) -> None:
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(65536))
    with (
        pyqcow.open(raw, "r+", format="raw") as img,
        pytest.raises(UnsupportedFeatureError, match="qcow2"),
    ):
        create_snapshot(img, "x")
    with (
        pyqcow.open(raw, format="raw") as img,
        pytest.raises(UnsupportedFeatureError, match="qcow2"),
    ):
        list_snapshots(img)


# --- crash consistency: replay the writes of one operation up to every fsync ----------

_COPIED_LINE = re.compile(
    r"OFLAG_COPIED (?:data|L2) cluster: (?:l1_index=\d+ )?l[12]_entry=([0-9a-f]+) refcount=(\d+)"
)


class _Journal:
    """Every pwrite/truncate/fsync pyqcow issues on one file, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
        from pyqcow import hostfile

        self.events: list[tuple] = []
        target = os.path.realpath(path)
        real_pwrite, real_truncate, real_fsync = (
            hostfile.HostFile.pwrite, hostfile.HostFile.truncate, hostfile.HostFile.fsync
        )
        journal = self

        def mine(hf) -> bool:
            return os.path.realpath(hf.path) == target

        def pwrite(hf, data, offset):
            if mine(hf):
                journal.events.append(("w", offset, bytes(memoryview(data).cast("B"))))
            return real_pwrite(hf, data, offset)

        def truncate(hf, size):
            if mine(hf):
                journal.events.append(("t", size))
            return real_truncate(hf, size)

        def fsync(hf):
            if mine(hf):
                journal.events.append(("s",))
            return real_fsync(hf)

        monkeypatch.setattr(hostfile.HostFile, "pwrite", pwrite)
        monkeypatch.setattr(hostfile.HostFile, "truncate", truncate)
        monkeypatch.setattr(hostfile.HostFile, "fsync", fsync)

    def states(self, original: bytes, rng) -> list[bytes]:
        """Disk contents a power cut could leave: everything up to each fsync, and
        that plus a random subset of the next (unordered) batch of writes."""
        out = [original]
        img = bytearray(original)
        batch: list[tuple] = []

        def apply(buf: bytearray, ev: tuple) -> None:
            if ev[0] == "w":
                _, off, data = ev
                if len(buf) < off + len(data):
                    buf.extend(bytes(off + len(data) - len(buf)))
                buf[off : off + len(data)] = data
            else:
                del buf[ev[1] :]
                buf.extend(bytes(max(0, ev[1] - len(buf))))

        for ev in [*self.events, ("s",)]:
            if ev[0] != "s":
                batch.append(ev)
                continue
            if len(batch) > 1:
                torn = bytearray(img)
                for e in batch:
                    if rng.random() < 0.5:
                        apply(torn, e)
                out.append(bytes(torn))
            for e in batch:
                apply(img, e)
            batch = []
            out.append(bytes(img))
        return out


def _check_crash_state(path: Path) -> None:
    """qemu-img check finds at most leaks, and COPIED flags missing where the refcount
    is 1 (harmless: one extra copy-on-write; qemu's own snapshot code has the same
    window).  Never a dangling reference, never COPIED on a shared cluster."""
    proc = subprocess.run(
        ["qemu-img", "check", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode in (0, 2, 3), proc.stderr
    for line in proc.stderr.splitlines():
        if not line.strip() or line.startswith("Leaked cluster"):
            continue
        m = _COPIED_LINE.search(line)
        assert m, line
        entry, refcount = int(m.group(1), 16), int(m.group(2))
        assert refcount == 1 and not entry & (1 << 63), line


def _snapshot_contents(path: Path, tmp: Path) -> tuple[list[tuple[str, str]], dict]:
    snaps = qemu_snapshots(path)
    tmp.mkdir(exist_ok=True)
    c = Contents(tmp)
    got = {None: c.raw(path).read_bytes()}
    for sid, name in snaps:
        got[name] = c.raw(path, sid).read_bytes()
    return snaps, got


@pytest.mark.parametrize(
    ("op", "grow"),
    [
        ("create", False), ("apply", False), ("delete", False),
        # 512-byte clusters, the refcount table full: the operation adds refcount
        # blocks and moves the refcount table (its own header switch)
        pytest.param("create", True, id="create-grow", marks=pytest.mark.slow),
        pytest.param("apply", True, id="apply-grow", marks=pytest.mark.slow),
    ],
)
def test_crash_at_every_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, grow: bool
) -> None:
    import random

    if grow:
        p = create(tmp_path / "a.qcow2", "12M", "cluster_size=512")
    else:
        p = create(tmp_path / "a.qcow2", "2M", "cluster_size=4k")
    qemu_io(p, "write -P 1 0 64k", "write -c -P 2 1M 8k")
    qemu_img("snapshot", "-c", "s1", p)
    qemu_io(p, "write -P 3 4k 8k", "write -P 4 1536k 4k")
    qemu_img("snapshot", "-c", "s2", p)
    qemu_io(p, "write -P 5 0 4k")
    if grow:  # fill the file up to 3 clusters below what the refcount table covers
        capacity = 64 * 256  # one 512-byte table cluster: 64 blocks of 256 refcounts
        guest = 2 * MiB
        while (gap := capacity - os.path.getsize(p) // 512) > 3:
            n = max(1, (gap - 3) * 64 // 66) * 512  # data plus its share of L2 tables
            qemu_io(p, f"write -P 9 {guest} {n}")
            guest += n
        with pyqcow.open(p) as img:
            table = (img.header.refcount_table_offset, img.header.refcount_table_clusters)
    original = p.read_bytes()
    before_list, before = _snapshot_contents(p, tmp_path)
    journal = _Journal(monkeypatch, p)
    if op == "create":
        create_snapshot(p, "new")
    elif op == "apply":
        apply_snapshot(p, "s1")
    else:
        delete_snapshot(p, "s1")
    monkeypatch.undo()
    after_list, after = _snapshot_contents(p, tmp_path)
    assert_clean(p)
    if grow:
        with pyqcow.open(p) as img:
            assert (img.header.refcount_table_offset, img.header.refcount_table_clusters) != table
    states = journal.states(original, random.Random(7))
    assert len(states) > 4
    seen: set = set()
    for i, state in enumerate(states):
        q = tmp_path / f"state{i}.qcow2"
        q.write_bytes(state)
        _check_crash_state(q)
        snaps, got = _snapshot_contents(q, tmp_path / f"s{i}")
        seen.add((tuple(snaps), got[None] == after[None]))
        assert snaps in (before_list, after_list), i
        expected = before if snaps == before_list else after
        for name, data in got.items():
            if name is None:  # the active layer: before or after (apply switches)
                assert data in (before[None], after[None]), i
            else:
                assert data == expected[name], (i, name)
    assert (tuple(after_list), True) in seen and (tuple(before_list), before[None] == after[None]) in seen


def test_zero_sized_disk(tmp_path: Path) -> None:
    p = create(tmp_path / "a.qcow2", 0)
    create_snapshot(p, "a")
    qemu_img("snapshot", "-c", "b", p)
    apply_snapshot(p, "a")
    qemu_img("snapshot", "-a", "b", p)
    delete_snapshot(p, "b")
    assert qemu_snapshots(p) == [("1", "a")]
    assert_clean(p)


def test_image_in_use_by_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """qemu's image locks are honoured: a running qemu-io keeps us out (-l -U reads)."""
    import time

    from pyqcow.errors import ImageLockedError

    p = create(tmp_path / "a.qcow2", "1M")
    create_snapshot(p, "a")
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", "-c", "sleep 20000", str(p)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # until qemu-io holds its locks
            try:
                list_snapshots(p)
            except ImageLockedError:
                break
            assert time.monotonic() < deadline, "qemu-io never locked the image"
            time.sleep(0.05)
        _unchanged(p, lambda: create_snapshot(p, "b"), ImageLockedError, "in use")
        _unchanged(p, lambda: delete_snapshot(p, "a"), ImageLockedError, "in use")
        capsys.readouterr()
        assert cli_main(["snapshot", "-l", "-U", str(p)]) == 0
        assert " a " in capsys.readouterr().out
    finally:
        proc.terminate()
        proc.wait(timeout=10)
