"""The copier's O_DIRECT path (directcopy.DirectWriter): fresh clusters of the
destination written through an O_DIRECT descriptor on threads, the rest as
before; results checked against qemu-img's own commit / stream."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import qemu
from host_needs import require_native, require_o_direct

from pyqcow import fastcopy
from pyqcow.ops import directcopy
from pyqcow.ops.commit import commit
from pyqcow.ops.stream import stream

KiB = 1024
MiB = 1024 * KiB

pytestmark = pytest.mark.usefixtures("qemu_img_path", "qemu_io_path")


def _chain(d: Path) -> tuple[Path, Path]:
    """base (data at 0-24 MiB) under top (scattered runs, some past base's data)."""
    base = qemu.create(d / "base.qcow2", 64 * MiB)
    qemu.qemu_io(base, f"write -P 0x11 0 {24 * MiB}", f"write -P 0x12 {40 * MiB} {3 * MiB}")
    top = qemu.create(d / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qemu.qemu_io(top, *(f"write -P {0x20 + i} {i * 3 * MiB + 64 * KiB} {2 * MiB + 4 * KiB}"
                        for i in range(20)))
    return base, top


def _commit_both(d: Path) -> None:
    """The same chain committed by qemu-img in d/q and by pyqcow in d/p."""
    src = d / "src"
    src.mkdir()
    _chain(src)
    _copy_chain(src, d / "q")
    _copy_chain(src, d / "p")
    qemu.qemu_img("commit", "-q", d / "q" / "top.qcow2")
    commit(str(d / "p" / "top.qcow2"))


def _copy_chain(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in src.glob("*.qcow2"):
        shutil.copyfile(f, dst / f.name)


@pytest.fixture
def counted(monkeypatch):
    """Bytes written through the O_DIRECT path, per call."""
    seen: list[int] = []
    real = directcopy.DirectWriter._fill_and_write

    def spy(self, src_fd, group, view):
        n = real(self, src_fd, group, view)
        seen.append(n)
        return n

    monkeypatch.setattr(directcopy.DirectWriter, "_fill_and_write", spy)
    monkeypatch.setattr(directcopy, "DIRECT_MIN", 256 * KiB)
    monkeypatch.setattr(directcopy, "DIRECT_GROUP", 512 * KiB)
    return seen


def _require_direct(d: Path) -> None:
    require_native()  # (fallocate)
    require_o_direct(d)


@pytest.mark.parametrize("op", ["commit", "stream"])
def test_direct_copy_matches_qemu_img(tmp_path, counted, op):
    _require_direct(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    _chain(src)
    _copy_chain(src, tmp_path / "q")
    _copy_chain(src, tmp_path / "p")
    q, p = tmp_path / "q", tmp_path / "p"
    if op == "commit":
        qemu.qemu_img("commit", "-q", q / "top.qcow2")
        commit(str(p / "top.qcow2"))
        result = "base.qcow2"
    else:
        qemu.qemu_img("rebase", "-q", "-b", "", q / "top.qcow2")
        stream(str(p / "top.qcow2"))
        result = "top.qcow2"
    assert counted and sum(counted) >= 8 * MiB  # the fresh clusters went through O_DIRECT
    assert qemu.compare(q / result, p / result) == 0
    res, rc = qemu.check_json(p / result)
    assert rc == 0, res


def test_einval_from_o_direct_falls_back_to_buffered(tmp_path, counted, monkeypatch):
    _require_direct(tmp_path)
    real_pwrite = os.pwrite
    refused: list[int] = []

    def pwrite(fd, data, offset):
        if fcntl_flags(fd) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "refused")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    _commit_both(tmp_path)
    assert refused  # the O_DIRECT write was tried, refused, and done buffered
    assert qemu.compare(tmp_path / "q" / "base.qcow2", tmp_path / "p" / "base.qcow2") == 0


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_split_keeps_old_space_and_unaligned_edges_buffered():
    w = directcopy.DirectWriter.__new__(directcopy.DirectWriter)
    w.fresh = 8 * MiB
    runs = [
        (0, 4 * MiB, 2 * MiB),  # below the fresh space: buffered
        (100, 8 * MiB, 3 * MiB),  # fresh, contiguous with the next one
        (10 * MiB, 11 * MiB, 2 * MiB + 100),  # its unaligned end stays buffered
        (50 * MiB, 20 * MiB + 512, 4 * MiB),  # unaligned start: its head buffered
    ]
    groups, rest = directcopy.DirectWriter._split(w, runs)
    direct = [r for g in groups for r in g]
    assert sum(n for _, _, n in direct) + sum(n for _, _, n in rest) == sum(n for *_, n in runs)
    for so, do, n in direct:
        assert do >= w.fresh and do % directcopy.DIRECT_ALIGN == 0
    for g in groups:
        assert sum(n for *_, n in g) <= directcopy.DIRECT_GROUP
        ends = [(do, do + n) for _, do, n in g]
        assert all(a[1] == b[0] for a, b in zip(ends, ends[1:]))  # contiguous destination
        assert (ends[-1][1] - ends[0][0]) % directcopy.DIRECT_ALIGN == 0
    assert (0, 4 * MiB, 2 * MiB) in rest
    assert (10 * MiB + 2 * MiB, 13 * MiB, 100) in rest  # the 100-byte tail
    assert (50 * MiB, 20 * MiB + 512, 4096 - 512) in rest  # the head up to 4 KiB
    # every source byte lands where the run said
    for so, do, n in direct + rest:
        src = next(r for r in runs if r[1] <= do < r[1] + r[2])
        assert so - src[0] == do - src[1]


def test_group_past_the_source_end_reads_zeros(tmp_path):
    _require_direct(tmp_path)
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x5a" * (MiB + 1000))
    dst = tmp_path / "dst.bin"
    dst.write_bytes(b"\xff" * MiB)
    with open(src, "rb") as s, open(dst, "r+b") as d:
        w = directcopy.DirectWriter(d.fileno(), str(dst))
        try:
            w.reserve(4 * MiB)
            assert w.fresh == MiB and os.fstat(d.fileno()).st_size == 4 * MiB
            n = fastcopy.copy_runs(s.fileno(), d.fileno(), [(0, MiB, 2 * MiB)], direct=w)
        finally:
            w.close()
    data = dst.read_bytes()
    assert n == 2 * MiB
    assert data[:MiB] == b"\xff" * MiB
    assert data[MiB : 2 * MiB + 1000] == b"\x5a" * (MiB + 1000)
    assert data[2 * MiB + 1000 :] == bytes(2 * MiB - 1000)


def test_split_joins_fresh_runs_between_overwrites():
    """commit: a batch's new clusters are one contiguous run in the destination,
    interleaved in guest order with overwrites of old clusters; they are written
    as one direct extent, the overwrites stay buffered."""
    w = directcopy.DirectWriter.__new__(directcopy.DirectWriter)
    w.fresh = 64 * MiB
    half = directcopy.DIRECT_MIN // 2
    runs = [
        (0, MiB, 64 * KiB),  # old
        (64 * KiB, 64 * MiB, half),  # fresh
        (5 * MiB, 3 * MiB, 64 * KiB),  # old
        (6 * MiB, 64 * MiB + half, half),  # fresh, right after the first fresh one
    ]
    groups, rest = directcopy.DirectWriter._split(w, runs)
    assert sorted(rest) == sorted([runs[0], runs[2]])
    assert [r for g in groups for r in g] == [runs[1], runs[3]]


def test_background_writeback_merges_queued_ranges():
    import threading

    from pyqcow.writeback import BackgroundWriteback

    calls: list[tuple[int, int, int]] = []
    gate, started = threading.Event(), threading.Event()

    def fake(fd, offset, length):
        started.set()
        gate.wait(5)
        calls.append((fd, offset, length))

    s = BackgroundWriteback(7, fake)
    s(0, 10)
    assert started.wait(5)  # under way (blocked in the gate)
    s(100, 100)  # queued
    s(50, 10)  # merged with the queued one
    gate.set()
    s.close()
    assert calls[0] == (7, 0, 10)
    assert calls[1:] == [(7, 50, 150)]


def test_copier_starts_writeback_on_its_own_thread(tmp_path, monkeypatch):
    """A durable commit starts the write-back of what it copied through
    BackgroundWriteback (sync_file_range in the C helper), on the base's fd."""
    from pyqcow import writeback
    from pyqcow.ops import copier

    seen = []
    real = writeback.BackgroundWriteback.__call__

    def spy(self, offset, length):
        seen.append((self.start, offset, length))
        return real(self, offset, length)

    monkeypatch.setattr(writeback.BackgroundWriteback, "__call__", spy)
    _commit_both(tmp_path)
    assert seen and all(start is copier.start_writeback for start, _, _ in seen)
    assert qemu.compare(tmp_path / "q" / "base.qcow2", tmp_path / "p" / "base.qcow2") == 0


def test_without_the_helper_nothing_is_reserved_and_all_stays_buffered(tmp_path):
    dst = tmp_path / "dst.bin"
    dst.write_bytes(bytes(MiB))
    with open(dst, "r+b") as d, fastcopy.backend("python"):
        w = directcopy.DirectWriter(d.fileno(), str(dst))
        try:
            w.reserve(8 * MiB)
            assert os.fstat(d.fileno()).st_size == MiB  # no fallocate: no zeros written
            runs = [(0, MiB, 4 * MiB)]
            assert w.start(d.fileno(), runs) == ([], runs)
        finally:
            w.close()


def test_not_on_a_reflink_file_system(tmp_path, monkeypatch):
    """XFS/btrfs: copy_file_range shares the extents; no O_DIRECT write may
    replace that (tests/interop/test_reflink.py checks the sharing itself)."""
    monkeypatch.setattr(fastcopy, "_fs_type", lambda fd: 0x58465342)  # XFS
    dst = tmp_path / "dst.bin"
    dst.write_bytes(bytes(MiB))
    with open(dst, "r+b") as d:
        w = directcopy.DirectWriter(d.fileno(), str(dst))
        try:
            assert not w.usable and w.dfd < 0
            w.reserve(8 * MiB)
            assert os.fstat(d.fileno()).st_size == MiB
        finally:
            w.close()
