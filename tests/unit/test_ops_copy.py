"""The planner's whole-guest-view plan (convert) and the copier's buffer writes;
rebase's request checks in the library (the CLI calls the same function)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import qemu

import pyqcow
from pyqcow.entries import ClusterType
from pyqcow.errors import BackingChainError, FormatError, OperationError
from pyqcow.ops import copier
from pyqcow.ops.common import read_guest
from pyqcow.ops.plan import CopyStep, RawPlan, cluster_ranges, copy_chunks, plan_raw
from pyqcow.ops.rebase import backing_target, validate

KiB = 1024
C = 64 * KiB

pytestmark = pytest.mark.usefixtures("qemu_img_path", "qemu_io_path")


# -- plan: the whole guest view ------------------------------------------------------------
def test_cluster_ranges_widen_merge_and_clip():
    plan = RawPlan(10 * C + 100, [
        CopyStep(100, 10),  # inside cluster 0
        CopyStep(C + 5, 10),  # cluster 1: merges with cluster 0's range
        CopyStep(4 * C, 2 * C),  # clusters 4-5
        CopyStep(10 * C, 50),  # the short last cluster: clipped to the virtual size
    ])
    assert cluster_ranges(plan, C) == [(0, 2 * C), (4 * C, 6 * C), (10 * C, 10 * C + 100)]


def test_copy_chunks_cut_and_carry_host_offsets():
    plan = RawPlan(16 * C, [CopyStep(0, 6 * C, 7, 100 * C), CopyStep(6 * C, 2 * C)])
    chunks = copy_chunks(plan, [(0, 8 * C)], 4 * C)
    assert chunks == [
        (0, 4 * C, 7, 100 * C),  # inside the host-file step: read from fd 7
        (4 * C, 4 * C, None, None),  # crosses into the step read through the image
    ]
    assert copy_chunks(plan, [(2 * C, 6 * C)], 2 * C) == [
        (2 * C, 2 * C, 7, 102 * C),
        (4 * C, 2 * C, 7, 104 * C),
    ]


def test_plan_raw_steps_come_from_block_status(tmp_path):
    p = qemu.create(tmp_path / "a.qcow2", 8 * C)
    qemu.qemu_io(p, f"write -P 1 0 {C}", f"write -z {2 * C} {C}", f"write -c -P 2 {4 * C} {C}")
    with pyqcow.open(str(p)) as img:
        plan = plan_raw(img)
        assert plan.virtual_size == 8 * C
        assert [(s.guest_offset, s.length, s.fd is not None) for s in plan.steps] == [
            (0, C, True),  # plain data: copied from the host file
            (4 * C, C, False),  # compressed: read through the image
        ]
        assert plan.data_bytes == 2 * C


# -- copier: buffers into fresh clusters ---------------------------------------------------
def test_read_guest_zeros_past_the_end_and_without_image(tmp_path):
    p = qemu.create(tmp_path / "a.qcow2", 2 * C)
    qemu.qemu_io(p, f"write -P 9 0 {2 * C}")
    buf = bytearray(b"\xff" * (2 * C))
    with pyqcow.open(str(p)) as img:
        read_guest(img, memoryview(buf), C)
    assert buf == b"\x09" * C + bytes(C)
    buf = bytearray(b"\xff" * 10)
    read_guest(None, memoryview(buf), 0)
    assert buf == bytes(10)


def test_buffer_writer_checkpoint_flushes_with_data_first(tmp_path):
    """Pooled writes hold their prepared ranges unfilled, so the writer cannot flush
    by itself; once its cache is over the bound, a checkpoint waits for them and the
    writer flushes (data first).  What was written reads back, qemu-img finds the
    image clean and equal."""
    from concurrent.futures import ThreadPoolExecutor

    from pyqcow.writer import MAX_DIRTY_L2

    cs = 512  # 64 entries per L2 table: one table per 32 KiB
    span = (MAX_DIRTY_L2 + 2) * 64 * cs
    p = tmp_path / "out.qcow2"
    qemu.create(p, span, f"cluster_size={cs}")
    data = bytes(range(256)) * (span // 256)
    with pyqcow.open(str(p), "r+") as out, ThreadPoolExecutor(2) as pool:
        w = copier.BufferWriter(out, pool=pool)
        assert w.write(0, memoryview(data)) == span
        assert len(out.l2_cache.dirty) > MAX_DIRTY_L2  # unfilled: nothing flushed yet
        assert out.writer.needs_flush()
        w.checkpoint()
        assert len(out.l2_cache.dirty) == 0 and not w.pending
        w.finish()
    raw = tmp_path / "ref.raw"
    raw.write_bytes(data)
    assert qemu.compare(p, raw, fmt_b="raw") == 0
    assert qemu.check_json(p)[1] == 0  # clean: no corruption, no leak


def test_buffer_writer_compressed_clusters(tmp_path):
    from pyqcow.ops.convert import compressor

    p = tmp_path / "out.qcow2"
    qemu.create(p, 4 * C)
    data = b"a" * C + os.urandom(C)  # compresses / does not
    with pyqcow.open(str(p), "r+") as out:
        w = copier.BufferWriter(out, comp=compressor("zlib"))
        assert w.write(0, memoryview(data)) == 2 * C
        w.finish()
    raw = tmp_path / "ref.raw"
    raw.write_bytes(data + bytes(2 * C))
    assert qemu.compare(p, raw, fmt_b="raw") == 0
    with pyqcow.open(str(p)) as img:
        assert [r.type for r in img.runs(0, 2 * C)] == [ClusterType.COMPRESSED, ClusterType.NORMAL]


# -- rebase: the request checks ------------------------------------------------------------
def test_rebase_validate(tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", C)
    top = qemu.create(tmp_path / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2",
                      cwd=tmp_path)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(C))
    validate(top, "base.qcow2", "qcow2")  # fine
    validate(top, None)  # removing the backing file: fine
    with pytest.raises(OperationError, match="backing file name too long"):
        validate(top, "x" * 1024)
    with pytest.raises(OperationError, match="no such file"):
        validate(tmp_path / "nope.qcow2", "base.qcow2")
    with pytest.raises(OperationError, match="is a raw image; only qcow2 images"):
        validate(raw, "base.qcow2")
    with pytest.raises(OperationError, match=r"opened as raw \(-f raw\)"):
        validate(top, "base.qcow2", image_format="raw")
    with pytest.raises(FormatError, match="bad magic"):
        validate(raw, "base.qcow2", image_format="qcow2")
    with pytest.raises(OperationError, match="unsupported backing format 'vmdk'"):
        validate(top, "base.qcow2", "vmdk")
    with pytest.raises(BackingChainError, match="would make a backing loop"):
        validate(base, "top.qcow2", "qcow2")
    assert backing_target(top, "base.qcow2") == (str(Path(base)), "qcow2")
    assert backing_target(top, "gone.qcow2", None) == (str(tmp_path / "gone.qcow2"), None)
    assert backing_target(top, "") == (None, None)


def test_convert_n_into_an_image_with_an_external_data_file(tmp_path):
    """Guest data goes into the target's data file (the copier writes where
    prepare_write's host offsets point), not into the qcow2 file itself."""
    from pyqcow.ops.convert import ConvertOptions, convert_to_qcow2

    src = qemu.create(tmp_path / "src.qcow2", 4 * C)
    qemu.qemu_io(src, f"write -P 7 0 {C}", f"write -P 8 {2 * C} {2 * C}")
    dst = qemu.create(tmp_path / "dst.qcow2", 4 * C, f"data_file={tmp_path / 'dst.data'}")
    with pyqcow.open(str(src)) as img:
        convert_to_qcow2(img, dst, opts=ConvertOptions(existing=True))
    assert qemu.compare(src, dst) == 0
    assert qemu.check_json(dst)[1] == 0


@pytest.mark.parametrize("bits", [16, 1, 64])
def test_alloc_scan_finds_the_first_free_clusters(tmp_path, bits):
    """The allocation scan skips used clusters a block at a time: it still
    returns the free clusters (holes) in order, then the end of the file."""
    from pyqcow.chain import open_image

    p = qemu.create(tmp_path / "a.qcow2", 8 * 1024 * KiB, f"refcount_bits={bits}")
    qemu.qemu_io(p, "write -P 1 0 4M")
    with open_image(str(p), "r+") as img:
        rc = img.writer.refcounts
        end = rc.end_cluster
        used = [c for c in range(1, end) if rc.get(c)]
        holes = used[10::7][:6]
        assert len(holes) == 6
        for c in holes:
            rc.set(c, 0)  # (in memory only: abandoned below)
        rc.free_hint = 1
        got = [rc.alloc(1) >> img.cluster_bits for _ in holes]
        assert got == holes
        assert rc.alloc(2) >> img.cluster_bits == end
        img.writer.abandon()  # nothing of this reaches the file
    assert qemu.check_json(p)[1] == 0


# -- convert -B: only what lies above the backing's layer is read and compared -------------
def _chain3(tmp_path):
    """base <- mid <- top, 16 clusters; top also rewrites one cluster with the
    bytes the base has there (a cluster that reads the same)."""
    base = qemu.create(tmp_path / "base.qcow2", 16 * C)
    qemu.qemu_io(base, f"write -P 1 0 {8 * C}", f"write -P 2 {12 * C} {C}")
    mid = qemu.create(tmp_path / "mid.qcow2", 16 * C, backing=base, backing_fmt="qcow2")
    qemu.qemu_io(mid, f"write -P 3 {2 * C} {C}", f"write -P 4 {9 * C} {C}")
    top = qemu.create(tmp_path / "top.qcow2", 16 * C, backing=mid, backing_fmt="qcow2")
    qemu.qemu_io(top, f"write -P 5 {4 * C} {2 * C}", f"write -P 1 {6 * C} {C}",
                 f"write -z {12 * C} {C}", f"write -P 6 {15 * C} {C}")
    return base, mid, top


def _top_clusters(path) -> list[tuple[int, int, bool]]:
    return [(e["start"], e["length"], e["zero"]) for e in qemu.map_json(path)
            if e["depth"] == 0]


@pytest.mark.parametrize("onto", ["base", "mid"])
def test_convert_B_onto_a_layer_of_the_source(tmp_path, onto):
    from pyqcow.ops.convert import convert_to_qcow2
    from pyqcow.ops.convert_qcow2 import differing_candidates

    base, mid, top = _chain3(tmp_path)
    backing = {"base": base, "mid": mid}[onto]
    dst = tmp_path / "dst.qcow2"
    with pyqcow.open(str(top)) as img, pyqcow.open(str(backing)) as b:
        plan, ranges = differing_candidates(img, b, C)
        above = [(4 * C, 7 * C), (12 * C, 13 * C), (15 * C, 16 * C)]
        if onto == "base":  # mid's clusters too
            above = [(2 * C, 3 * C), (4 * C, 7 * C), (9 * C, 10 * C), *above[1:]]
        assert ranges == above
        # the plan holds the host data of exactly those layers' data clusters
        assert all(s.fd is not None for s in plan.steps)
        assert sum(s.length for s in plan.steps) == (3 + 1 + (2 if onto == "base" else 0)) * C
        convert_to_qcow2(img, dst, backing=str(backing), backing_format="qcow2")
    assert qemu.compare(top, dst) == 0
    assert qemu.check_json(dst)[1] == 0
    want = [(4 * C, 2 * C, False), (12 * C, C, True), (15 * C, C, False)]
    if onto == "base":
        want = [(2 * C, C, False), (4 * C, 2 * C, False), (9 * C, C, False), *want[1:]]
    # the cluster at 6*C reads as the base's bytes: compared, not written
    assert _top_clusters(dst) == want


def test_convert_B_onto_a_copy_of_the_base_compares_everything(tmp_path):
    """A backing that is not a layer of the source (here a copy of the base) may
    differ anywhere: every cluster is compared, and the result is the same."""
    import shutil

    from pyqcow.ops.convert import convert_to_qcow2
    from pyqcow.ops.convert_qcow2 import differing_candidates

    base, _mid, top = _chain3(tmp_path)
    copy = tmp_path / "copy.qcow2"
    shutil.copy(base, copy)
    qemu.qemu_io(copy, f"write -P 9 {14 * C} {C}")  # differs where the source has base data
    dst = tmp_path / "dst.qcow2"
    with pyqcow.open(str(top)) as img, pyqcow.open(str(copy)) as b:
        assert differing_candidates(img, b, C)[1] == [(0, 16 * C)]
        convert_to_qcow2(img, dst, backing=str(copy), backing_format="qcow2")
    assert qemu.compare(top, dst) == 0
    assert (14 * C, C, True) in _top_clusters(dst)  # zeros over the copy's new data


# -- convert -O raw: batches, the output's truncation, writeback as it goes ----------------
def test_raw_split_batches_runs_of_one_file():
    from pyqcow.ops.convert_raw import RAW_PIECE, Batch, _split

    plan = RawPlan(64 * C + RAW_PIECE * 2, [
        CopyStep(0, C, 5, 10 * C),
        CopyStep(2 * C, C, 5, 11 * C),  # same file: same batch
        CopyStep(3 * C, C, 6, 0),  # another file: a new batch
        CopyStep(4 * C, C),  # through the image
        CopyStep(5 * C, C),
        CopyStep(8 * C, RAW_PIECE + C, 5, 40 * C),  # cut at RAW_PIECE
    ])
    work, gaps = _split(plan)
    assert work == [
        Batch(5, [(10 * C, 0, C), (11 * C, 2 * C, C)], 2 * C),
        Batch(6, [(0, 3 * C, C)], C),
        Batch(None, [(4 * C, 4 * C, C), (5 * C, 5 * C, C)], 2 * C),
        Batch(5, [(40 * C, 8 * C, RAW_PIECE)], RAW_PIECE),
        Batch(5, [(40 * C + RAW_PIECE, 8 * C + RAW_PIECE, C)], C),
    ]
    assert all(b.length <= RAW_PIECE for b in work)
    assert gaps == [(C, C), (6 * C, 2 * C), (9 * C + RAW_PIECE, plan.virtual_size - 9 * C - RAW_PIECE)]


def test_convert_raw_over_an_existing_bigger_file(tmp_path):
    """The output is emptied first (no stale bytes in the holes) and takes the
    source's size."""
    from pyqcow.ops.convert import convert_to_raw

    src = qemu.create(tmp_path / "s.qcow2", 8 * C)
    qemu.qemu_io(src, f"write -P 7 {C} {C}")
    dst = tmp_path / "d.raw"
    dst.write_bytes(b"\xee" * (20 * C))
    with pyqcow.open(str(src)) as img:
        convert_to_raw(img, dst)
    assert dst.read_bytes() == bytes(C) + b"\x07" * C + bytes(6 * C)


def test_writeback_started_as_the_output_grows(tmp_path, monkeypatch):
    from pyqcow import hostfile
    from pyqcow.ops import convert_common as cc

    calls = []
    monkeypatch.setattr(cc.os, "posix_fadvise", lambda fd, off, n, adv: calls.append((off, n)))
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
        f.flush()
        kick = cc.WritebackKicker(f.fileno())
        f.write(b"y" * (cc.KICK_BYTES - 1))
        f.flush()
        kick()
        assert calls == []  # not enough new bytes yet
        f.write(b"z")
        f.flush()
        kick()
        assert calls == [(4096, cc.KICK_BYTES)]
        monkeypatch.setattr(hostfile, "_cache", {"write": "unsafe", "read": "writeback"})
        f.write(b"w" * cc.KICK_BYTES)
        f.flush()
        unsafe = cc.WritebackKicker(f.fileno())
        f.write(b"w" * cc.KICK_BYTES)
        f.flush()
        unsafe()
        assert calls == [(4096, cc.KICK_BYTES)]  # -t unsafe: left to the kernel


def test_source_maps_view_inside_the_file_only(tmp_path):
    from pyqcow.ops.convert_common import SourceMaps

    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 64)
    fd = os.open(path, os.O_RDONLY)
    try:
        with SourceMaps() as maps:
            assert bytes(maps.view(fd, 256, 4)) == b"\x00\x01\x02\x03"
            assert maps.view(fd, 16 * KiB - 4, 8) is None  # past the end: pread instead
        r, w = os.pipe()
        try:
            with SourceMaps() as maps:
                assert maps.view(r, 0, 1) is None  # not a regular file
        finally:
            os.close(r)
            os.close(w)
    finally:
        os.close(fd)


def test_parts_by_chunk_groups_cut_chunks_only():
    from pyqcow.ops.convert_qcow2 import parts_by_chunk

    chunks = [(0, 4 * C, None, None), (4 * C, 4 * C, 3, 0), (8 * C, 4 * C, None, None)]
    parts = [(0, C, 3, 100 * C), (C, 3 * C, None, None), (4 * C, 4 * C, 3, 0),
             (8 * C, 4 * C, None, None)]
    assert parts_by_chunk(chunks, parts) == {0: parts[:2]}


def test_source_maps_let_scanned_pages_go_and_still_read_right(tmp_path, monkeypatch):
    from pyqcow.ops import convert_common as cc

    monkeypatch.setattr(cc, "DROP_BYTES", 8 * KiB)
    data = os.urandom(64 * KiB)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        with cc.SourceMaps() as maps:
            kept = maps.view(fd, 0, 4 * KiB)
            for off in range(0, 64 * KiB, 4 * KiB):  # drops every 8 KiB scanned
                assert bytes(maps.view(fd, off, 4 * KiB)) == data[off : off + 4 * KiB]
            assert bytes(kept) == data[: 4 * KiB]  # a view held across a drop
            del kept
    finally:
        os.close(fd)
