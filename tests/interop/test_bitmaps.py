"""Persistent dirty bitmaps stay valid through every pyqcow write path (issue 11,
item 4), with qemu as the oracle: ``qemu-nbd -B`` + ``qemu-img map
x-dirty-bitmap`` (tests/nbd_bitmap.py) reads the bits, ``qemu-img check`` and
``qemu-img info`` judge the metadata.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import qemu
from nbd_bitmap import assert_clean, bitmap_flags, granule_ranges, granules_of, qemu_dirty
from qemu import QemuError, create, qemu_img, qemu_io

import pyqcow
from pyqcow import bitmaps
from pyqcow.errors import OperationError
from pyqcow.image import QcowImage

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    for t in ("qemu-img", "qemu-io", "qemu-nbd"):
        qemu.require_tool(t)


def _with_bitmaps(path: Path, size: int = 4 * MiB, *opts: str) -> Path:
    """An image with bitmaps b0 (64k, enabled), big (128k, enabled), off (disabled)."""
    create(path, size, *opts)
    qemu_img("bitmap", "--add", path, "b0")
    qemu_img("bitmap", "--add", "-g", "128K", path, "big")
    qemu_img("bitmap", "--add", "--disable", path, "off")
    return path


def _assert_valid(path: Path) -> None:
    assert_clean(path)
    flags = bitmap_flags(path)
    assert flags and all("in-use" not in f for f in flags.values()), flags


# --- the oracle itself -------------------------------------------------------------


def test_oracle_sees_qemu_io_writes(tmp_path: Path) -> None:
    """qemu-io makes ranges dirty; the oracle reports exactly their granules."""
    p = _with_bitmaps(tmp_path / "a.qcow2")
    qemu_io(p, "write 200k 8k", "write -z 3M 64k")
    assert qemu_dirty(p, "b0") == [(192 * KiB, 64 * KiB), (3 * MiB, 64 * KiB)]
    assert qemu_dirty(p, "big") == [(128 * KiB, 128 * KiB), (3 * MiB, 128 * KiB)]
    assert qemu_dirty(p, "off") == []


# --- guest writes ---------------------------------------------------------------------

OPS = [
    ("write", 200 * KiB, 8 * KiB),
    ("write", 1 * MiB - 512, 1024),  # straddles a 64k and a 128k boundary
    ("write", 2 * MiB, 256 * KiB),  # whole clusters (batched path)
    ("zero", 3 * MiB, 64 * KiB),
    ("zero", 3 * MiB + 200 * KiB, 4 * KiB),  # partial: written as data
    ("discard", 3 * MiB + 512 * KiB, 64 * KiB),
    ("discard", 4 * MiB - 4 * KiB, 4 * KiB),  # partial discard: still "may change"
]


def _pyqcow_ops(p: Path) -> None:
    with pyqcow.open(p, "r+") as img:
        for op, off, n in OPS:
            if op == "write":
                img.write(off, b"\x5a" * n)
            elif op == "zero":
                img.write_zeroes(off, n)
            else:
                img.discard(off, n)


def _qemu_ops(p: Path) -> None:
    cmds = []
    for op, off, n in OPS:
        cmds.append({"write": "write -P 0x5a", "zero": "write -z", "discard": "discard"}[op] + f" {off} {n}")
    qemu_io(p, *cmds)


def test_guest_writes_set_bits_as_qemu_does(tmp_path: Path) -> None:
    """write / write_zeroes / discard: every enabled bitmap gets the granules of each
    request, exactly the bits qemu-io sets for the same requests on a copy; the
    disabled bitmap is untouched; check clean, nothing in use."""
    p = _with_bitmaps(tmp_path / "p.qcow2")
    qemu_io(p, "write 0 4k")  # bits qemu set before: kept
    q = tmp_path / "q.qcow2"
    shutil.copyfile(p, q)
    _pyqcow_ops(p)
    _qemu_ops(q)
    _assert_valid(p)
    for name, gran in (("b0", 64 * KiB), ("big", 128 * KiB)):
        want: set[int] = granules_of(0, 4 * KiB, gran)
        for _op, off, n in OPS:
            want |= granules_of(off, n, gran)
        got = qemu_dirty(p, name)
        assert got == granule_ranges(want, gran, 4 * MiB)
        assert got == qemu_dirty(q, name)
    assert qemu_dirty(p, "off") == []
    assert qemu.compare(p, q) == 0


def test_bitmap_data_roundtrip_and_all_ones_clusters(tmp_path: Path) -> None:
    """512-byte clusters and granularity: a fully dirty bitmap data cluster is stored
    as an all-ones table entry; qemu reads it, pyqcow reads qemu's own clusters."""
    p = create(tmp_path / "s.qcow2", 8 * MiB, "cluster_size=512")
    qemu_img("bitmap", "--add", "-g", "512", p, "fine")
    qemu_io(p, f"write {8 * MiB - 1024} 512")  # qemu stores a data cluster of its own
    with pyqcow.open(p, "r+") as img:
        assert img.bitmaps()[0].dirty_ranges() == [(8 * MiB - 1024, 512)]
        img.write(0, bytes(2 * MiB + 1024))  # 4096 bits = one data cluster, all ones
    _assert_valid(p)
    assert qemu_dirty(p, "fine") == [(0, 2 * MiB + 1024), (8 * MiB - 1024, 512)]
    with QcowImage(p) as img:
        bm = bitmaps.read_bitmap(img, "fine")
        assert bm.dirty_ranges() == [(0, 2 * MiB + 1024), (8 * MiB - 1024, 512)]


def test_clean_close_without_writes_leaves_file_alone(tmp_path: Path) -> None:
    p = _with_bitmaps(tmp_path / "a.qcow2")
    before = p.read_bytes()
    with pyqcow.open(p, "r+"):
        pass
    assert p.read_bytes() == before


def test_bitmaps_in_use_during_write_and_crash_leaves_them_invalid(tmp_path: Path) -> None:
    """Between the first write and close the stored bitmaps are flagged in use (a
    crash there invalidates them; never leaves them wrong)."""
    p = _with_bitmaps(tmp_path / "a.qcow2")
    img = pyqcow.open(p, "r+")
    try:
        img.write(0, b"x" * 512)
        img.flush()
        flags = bitmap_flags_shared(p)
        assert all("in-use" in f for f in flags.values()), flags
    finally:
        img.close()
    _assert_valid(p)
    assert qemu_dirty(p, "b0") == [(0, 64 * KiB)]


def bitmap_flags_shared(p: Path) -> dict[str, list[str]]:
    info = qemu.info_json(p, share=True)
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"]["bitmaps"]}


def test_inconsistent_bitmap_left_as_it_is(tmp_path: Path) -> None:
    """A bitmap in use when opened (qemu killed) stays in use, untouched; the others
    are maintained; qemu-img check stays clean and qemu can remove it."""
    p = _with_bitmaps(tmp_path / "a.qcow2")
    qemu_io(p, "write 0 4k", "sigraise 9", allow_failure=True)  # all three now in use
    qemu_img("bitmap", "--add", p, "fresh")
    assert "in-use" in bitmap_flags(p)["b0"]
    _pyqcow_ops(p)
    assert_clean(p)
    flags = bitmap_flags(p)
    assert all("in-use" in flags[n] for n in ("b0", "big", "off"))
    assert "in-use" not in flags["fresh"]
    assert qemu_dirty(p, "fresh") == granule_ranges(
        set().union(*(granules_of(o, n, 64 * KiB) for _op, o, n in OPS)), 64 * KiB, 4 * MiB
    )
    with pytest.raises(QemuError, match="inconsistent"):
        qemu_dirty(p, "b0")
    qemu_img("bitmap", "--remove", p, "b0")
    assert_clean(p)


def test_resize_grows_bitmaps_as_qemu(tmp_path: Path) -> None:
    p = _with_bitmaps(tmp_path / "a.qcow2")
    q = tmp_path / "q.qcow2"
    shutil.copyfile(p, q)
    with pyqcow.open(p, "r+") as img:
        img.write(0, b"a" * 4096)
        img.resize(64 * MiB)
        img.write(40 * MiB, b"b" * 4096)
    qemu_io(q, "write 0 4k")
    qemu_img("resize", q, "64M")
    qemu_io(q, "write 40M 4k")
    _assert_valid(p)
    for name in ("b0", "big", "off"):
        assert qemu_dirty(p, name) == qemu_dirty(q, name)


def test_extended_l2_and_compressed_writes(tmp_path: Path) -> None:
    p = _with_bitmaps(tmp_path / "a.qcow2", 4 * MiB, "extended_l2=on", "cluster_size=128k")
    with pyqcow.open(p, "r+") as img:
        img.write(5 * KiB, b"x" * 100)
        import zlib

        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        img.write_compressed(1 * MiB, c.compress(bytes(128 * KiB)) + c.flush())
    _assert_valid(p)
    assert qemu_dirty(p, "b0") == [(0, 64 * KiB), (1 * MiB, 128 * KiB)]


# --- commit, stream, rebase -------------------------------------------------------------


def _chain(d: Path) -> tuple[Path, Path]:
    d.mkdir()
    base = _with_bitmaps(d / "base.qcow2")
    qemu_io(base, "write -P 1 0 64k", "write -P 1 1M 1M")
    top = create(d / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2")
    qemu_img("bitmap", "--add", top, "t0")
    qemu_io(top, "write -P 2 2M 4k", "write -z 3M 64k", "write -P 3 200k 8k", f"write -P 4 {MiB + 64 * KiB} 300k")
    return base, top


def test_commit_bitmaps_match_qemu_img_commit(tmp_path: Path) -> None:
    """pyqcow.commit sets in BASE's enabled bitmaps the bits of every cluster it
    writes, exactly as qemu-img commit does on an identical copy; TOP's bitmap (TOP
    emptied, guest content unchanged) is left as qemu leaves it."""
    base, top = _chain(tmp_path / "p")
    shutil.copytree(tmp_path / "p", tmp_path / "q")
    qbase, qtop = tmp_path / "q" / "base.qcow2", tmp_path / "q" / "top.qcow2"
    pyqcow.commit(top)
    qemu_img("commit", qtop)
    _assert_valid(base)
    _assert_valid(top)
    assert qemu.compare(base, qbase) == 0
    for name in ("b0", "big", "off"):
        assert qemu_dirty(base, name) == qemu_dirty(qbase, name), name
    assert qemu_dirty(base, "b0") != []  # the commit did set bits
    assert qemu_dirty(top, "t0") == qemu_dirty(qtop, "t0")


def test_commit_into_bigger_top_resizes_bitmaps(tmp_path: Path) -> None:
    """BASE grows to TOP's size; its bitmaps grow with it and stay valid.  qemu-img
    commit sets only the written cluster; pyqcow's commit also writes zeros past
    the old end of BASE (where it already reads zeros), so its bits are a superset."""
    for d in (tmp_path / "p", tmp_path / "q"):
        d.mkdir()
        _with_bitmaps(d / "base.qcow2")
        top = create(d / "top.qcow2", 8 * MiB, backing="base.qcow2", backing_fmt="qcow2")
        qemu_io(top, "write 6M 4k")
    pyqcow.commit(tmp_path / "p" / "top.qcow2", drop=True)
    qemu_img("commit", "-d", tmp_path / "q" / "top.qcow2")
    base, qbase = tmp_path / "p" / "base.qcow2", tmp_path / "q" / "base.qcow2"
    _assert_valid(base)
    assert qemu_dirty(qbase, "b0") == [(6 * MiB, 64 * KiB)]
    assert qemu_dirty(base, "b0") in ([(6 * MiB, 64 * KiB)], [(4 * MiB, 4 * MiB)])
    assert qemu_dirty(base, "off") == []
    assert qemu.info_json(base)["virtual-size"] == 8 * MiB


def test_stream_keeps_top_bitmaps_valid(tmp_path: Path) -> None:
    """stream writes backing data into TOP: TOP's enabled bitmap stays valid and
    covers its own writes and every streamed cluster (a superset: never wrong)."""
    base, top = _chain(tmp_path / "p")
    before = qemu_dirty(top, "t0")
    with QcowImage(base) as b:
        streamed = bitmaps.allocated_ranges(b)
    pyqcow.stream(top)
    _assert_valid(top)
    want: set[int] = set()
    for o, n in before + streamed:
        want |= granules_of(o, n, 64 * KiB)
    assert qemu_dirty(top, "t0") == granule_ranges(want, 64 * KiB, 4 * MiB)
    # the base was only read: its bitmaps are as they were
    assert_clean(base)
    assert qemu_dirty(base, "b0") == [(0, 64 * KiB), (1 * MiB, 1 * MiB)]


def test_safe_rebase_keeps_bitmaps_valid(tmp_path: Path) -> None:
    base, top = _chain(tmp_path / "p")
    before = qemu_dirty(top, "t0")
    pyqcow.rebase(top, None)  # onto nothing: base's data is written into top
    _assert_valid(top)
    got = qemu_dirty(top, "t0")
    want: set[int] = set()
    for o, n in before + [(0, 64 * KiB), (1 * MiB, 1 * MiB)]:
        want |= granules_of(o, n, 64 * KiB)
    assert set().union(*(granules_of(o, n, 64 * KiB) for o, n in got)) >= want


# --- merge API ----------------------------------------------------------------------------


def test_merge_into_union_copy_and_ranges(tmp_path: Path) -> None:
    """merge_into: a bitmap in both is the union, one only in src is copied with its
    flags and granularity, the given ranges are set in every enabled bitmap; qemu
    reads the result; nothing in use; check clean."""
    src = _with_bitmaps(tmp_path / "src.qcow2")
    qemu_io(src, "write 0 4k", "write 1M 64k")
    dest = create(tmp_path / "dest.qcow2", 4 * MiB)
    qemu_img("bitmap", "--add", dest, "b0")
    qemu_img("bitmap", "--add", "-g", "256K", dest, "own")
    qemu_io(dest, "write 2M 4k")
    with QcowImage(src) as s, QcowImage(dest, "r+") as d:
        assert bitmaps.merge_problems(d, s) == []
        carried = bitmaps.merge_into(d, s, [(3 * MiB, 4 * KiB)])
    assert carried == ["b0", "big", "off"]
    _assert_valid(dest)
    flags = bitmap_flags(dest)
    assert flags == {"b0": ["auto"], "own": ["auto"], "big": ["auto"], "off": []}
    assert qemu_dirty(dest, "b0") == [(0, 64 * KiB), (1 * MiB, 64 * KiB), (2 * MiB, 64 * KiB),
                                      (3 * MiB, 64 * KiB)]
    assert qemu_dirty(dest, "big") == [(0, 128 * KiB), (1 * MiB, 128 * KiB), (3 * MiB, 128 * KiB)]
    assert qemu_dirty(dest, "own") == [(2 * MiB, 256 * KiB), (3 * MiB, 256 * KiB)]
    assert qemu_dirty(dest, "off") == []
    info = qemu.info_json(dest)["format-specific"]["data"]["bitmaps"]
    assert {b["name"]: b["granularity"] for b in info} == {
        "b0": 65536, "own": 262144, "big": 131072, "off": 65536}


def test_merge_into_image_without_bitmaps_and_other_size(tmp_path: Path) -> None:
    src = _with_bitmaps(tmp_path / "src.qcow2", 8 * MiB)
    qemu_io(src, "write 0 4k", "write 7M 4k")  # past dest's end: dropped
    dest = create(tmp_path / "dest.qcow2", 4 * MiB)
    with QcowImage(src) as s, QcowImage(dest, "r+") as d:
        bitmaps.merge_into(d, s, bitmaps.allocated_ranges(d))
    _assert_valid(dest)
    assert qemu_dirty(dest, "b0") == [(0, 64 * KiB)]
    assert sorted(bitmap_flags(dest)) == ["b0", "big", "off"]


def test_merge_problems_refusals(tmp_path: Path) -> None:
    src = _with_bitmaps(tmp_path / "src.qcow2")
    v2 = create(tmp_path / "v2.qcow2", 4 * MiB, "compat=0.10")
    gran = create(tmp_path / "g.qcow2", 4 * MiB)
    qemu_img("bitmap", "--add", "-g", "1M", gran, "b0")
    plain = create(tmp_path / "plain.qcow2", 4 * MiB)
    with QcowImage(src) as s:
        with QcowImage(v2, "r+") as d:
            probs = bitmaps.merge_problems(d, s)
            assert len(probs) == 1 and "compat=0.10" in probs[0] and "'b0'" in probs[0]
            with pytest.raises(OperationError, match="compat=0.10"):
                bitmaps.merge_into(d, s)
        with QcowImage(gran, "r+") as d:
            probs = bitmaps.merge_problems(d, s)
            assert probs == [
                f"bitmap 'b0' has granularity 1048576 in {gran} but 65536 in {src}"
            ]
            with pytest.raises(OperationError, match="granularity"):
                bitmaps.merge_into(d, s)
        with QcowImage(plain) as d:  # nothing to refuse; no bitmaps in src either way
            assert bitmaps.merge_problems(d, s) == []
            assert bitmaps.merge_problems(s, d) == []
    # nothing was written by the refusals
    assert bitmap_flags(v2) == {} and bitmap_flags(gran) == {"b0": ["auto"]}
    assert_clean(v2)
    assert_clean(gran)
    # an inconsistent bitmap in src
    qemu_io(src, "write 0 4k", "sigraise 9", allow_failure=True)
    with QcowImage(src) as s, QcowImage(plain) as d:
        probs = bitmaps.merge_problems(d, s)
        assert len(probs) == 3 and all("in use" in m for m in probs)


def test_pyqcow_info_reports_no_in_use_after_write(tmp_path: Path) -> None:
    """The old behaviour (flag every bitmap in use on the first write) is gone."""
    p = _with_bitmaps(tmp_path / "a.qcow2")
    _pyqcow_ops(p)
    with QcowImage(p) as img:
        assert [b.in_use for b in bitmaps.read_bitmap_directory(img)] == [False] * 3
    assert os.path.getsize(p) > 0


def test_many_bitmaps_small_clusters_and_external_data_file(tmp_path: Path) -> None:
    """A directory spanning several 512-byte clusters, and an image whose guest data
    lives in an external data file (bitmap clusters stay in the qcow2 file)."""
    p = create(tmp_path / "a.qcow2", 4 * MiB, "cluster_size=512")
    names = [f"{i:03d}-" + "n" * 100 for i in range(20)]
    for n in names:
        qemu_img("bitmap", "--add", p, n)
    x = create(tmp_path / "x.qcow2", 4 * MiB, f"data_file={tmp_path / 'x.data'}")
    qemu_img("bitmap", "--add", x, "b0")
    for img_path in (p, x):
        with pyqcow.open(img_path, "r+") as img:
            img.write(1 * MiB + 5, b"y" * 70000)
        _assert_valid(img_path)
    for n in (names[0], names[-1]):  # granularity 4k (qemu's default for small clusters)
        assert qemu_dirty(p, n) == [(1 * MiB, 72 * KiB)]
    assert qemu_dirty(x, "b0") == [(1 * MiB, 128 * KiB)]


def test_merge_via_stream_carries_base_bitmaps(tmp_path: Path) -> None:
    """What merge --via stream does with the API: TOP's allocated ranges are taken
    before streaming, then BASE's bitmaps are carried into TOP (union with TOP's
    bitmap of the same name) with those ranges set; qemu reads the result."""
    d = tmp_path / "c"
    d.mkdir()
    base = _with_bitmaps(d / "base.qcow2")
    qemu_io(base, "write -P 1 0 64k", "write -P 1 1M 1M")
    top = create(d / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2")
    qemu_img("bitmap", "--add", top, "b0")  # libvirt: the checkpoint's bitmap in the overlay
    qemu_io(top, "write -P 2 3M 4k")
    qemu_img("bitmap", "--add", top, "late")  # created after TOP's write: clean
    with QcowImage(top) as t:
        top_ranges = bitmaps.allocated_ranges(t)
    assert top_ranges == [(3 * MiB, 64 * KiB)]
    with QcowImage(base) as b:
        base_dirty = [(r.name, r.dirty_ranges()) for r in b.bitmaps()]
    pyqcow.stream(top)
    with QcowImage(base) as b, QcowImage(top, "r+") as t:
        assert bitmaps.merge_problems(t, b) == []
        bitmaps.merge_into(t, b, top_ranges)
    _assert_valid(top)
    assert dict(base_dirty)["b0"] == [(0, 64 * KiB), (1 * MiB, 1 * MiB)]
    assert qemu_dirty(top, "b0")[0] == (0, 64 * KiB)
    b0 = set().union(*(granules_of(o, n, 64 * KiB) for o, n in qemu_dirty(top, "b0")))
    assert b0 >= granules_of(0, 64 * KiB, 64 * KiB) | granules_of(1 * MiB, 1 * MiB, 64 * KiB) | {48}
    assert qemu_dirty(top, "big") == [(0, 128 * KiB), (1 * MiB, 1 * MiB), (3 * MiB, 128 * KiB)]
    assert qemu_dirty(top, "off") == []
    assert 48 in set().union(*(granules_of(o, n, 64 * KiB) for o, n in qemu_dirty(top, "late")))


def test_write_problems_lists_bitmaps_a_write_would_invalidate(tmp_path: Path) -> None:
    """A bitmap whose table does not match the disk size cannot be maintained: it is
    listed before any write, and a write leaves it in use (invalid, never wrong)
    while the good one stays valid."""
    p = _with_bitmaps(tmp_path / "a.qcow2")
    with QcowImage(p) as img:
        assert bitmaps.write_problems(img) == []
        d = img.header.bitmaps.bitmap_directory_offset
    with open(p, "r+b") as f:  # b0's table size: 1 entry -> 2 (malformed)
        f.seek(d + 8)
        f.write((2).to_bytes(4, "big"))
    with QcowImage(p) as img:
        assert bitmaps.write_problems(img) == [
            f"{p}: bitmap 'b0' does not match the disk size (malformed); a write invalidates it"
        ]
    with pyqcow.open(p, "r+") as img:
        img.write(0, b"z")
    flags = bitmap_flags(p)
    assert "in-use" in flags["b0"] and "in-use" not in flags["big"]
    assert qemu_dirty(p, "big") == [(0, 128 * KiB)]
    res, rc = qemu.check_json(p)
    assert not res.get("corruptions"), res


def test_cli_commit_keeps_bitmaps_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyqcow.cli.main import main

    base, top = _chain(tmp_path / "p")
    assert main(["commit", str(top)]) == 0
    assert capsys.readouterr().err == ""
    _assert_valid(base)
    assert qemu_dirty(base, "b0")[-1] == (3 * MiB, 64 * KiB)
