"""convert's fast paths (h-convert): the C copy of mapped source runs that leaves
zero blocks out, the background writeback starter, the raw output's groups."""

from __future__ import annotations

import errno
import os

import pytest
from host_needs import require_native

from pyqcow import fastcopy
from pyqcow.ops import convert_common as cc

KiB = 1024



@pytest.fixture
def native() -> None:
    require_native()


needs_native = pytest.mark.usefixtures("native")


def _data_ranges(path) -> list[tuple[int, int]]:
    """(offset, end) of the allocated ranges of ``path`` (SEEK_DATA/SEEK_HOLE)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


@needs_native
def test_copy_nonzero_copies_data_and_leaves_zero_blocks_out(tmp_path):
    blocks = [os.urandom(4 * KiB), bytes(4 * KiB), bytes(4 * KiB), os.urandom(4 * KiB),
              b"\0" * 4095 + b"\1", bytes(8 * KiB), os.urandom(4 * KiB)]
    data = b"".join(blocks)
    src = tmp_path / "src"
    src.write_bytes(data)
    dst = tmp_path / "dst"
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(dfd, 64 * KiB + len(data))
        with cc.SourceMaps() as maps:
            # two runs: the whole file at 64 KiB, its first 8 KiB at 0
            n = maps.copy_nonzero(sfd, dfd, [(0, 64 * KiB, len(data)), (0, 0, 8 * KiB)])
    finally:
        os.close(sfd)
        os.close(dfd)
    got = dst.read_bytes()
    assert got[64 * KiB:] == data
    assert got[: 8 * KiB] == data[: 8 * KiB] and got[8 * KiB : 64 * KiB] == bytes(56 * KiB)
    # written: the 4 data blocks of the long run, the first block of the short one
    assert n == 5 * 4 * KiB
    holes_at = [64 * KiB + 4 * KiB, 64 * KiB + 20 * KiB]  # zero blocks: not written
    for off in holes_at:
        assert not any(a <= off < b for a, b in _data_ranges(dst))


@needs_native
def test_copy_nonzero_of_a_file_that_shrank_raises_efault(tmp_path):
    """The mapping's pages past the new end fault (SIGBUS): a clean OSError."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * KiB))
    dst = tmp_path / "dst"
    sfd = os.open(src, os.O_RDWR)
    dfd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with cc.SourceMaps() as maps:
            assert maps.view(sfd, 0, 4 * KiB) is not None  # mapped at 64 KiB
            os.ftruncate(sfd, 0)
            with pytest.raises(OSError) as exc:
                maps.copy_nonzero(sfd, dfd, [(0, 0, 64 * KiB)])
            assert exc.value.errno == errno.EFAULT
    finally:
        os.close(sfd)
        os.close(dfd)


def test_copy_nonzero_without_a_mapping_or_the_helper_says_none(tmp_path):
    r, w = os.pipe()
    try:
        with cc.SourceMaps() as maps:
            assert maps.copy_nonzero(r, w, [(0, 0, 4 * KiB)]) is None  # not mappable
            src = tmp_path / "s"
            src.write_bytes(b"x" * 4 * KiB)
            fd = os.open(src, os.O_RDONLY)
            try:
                with fastcopy.backend("python"):
                    assert maps.copy_nonzero(fd, w, [(0, 0, 4 * KiB)]) is None
            finally:
                os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_background_writeback_starts_every_range_before_close():
    from pyqcow.writeback import BackgroundWriteback

    calls = []
    wb = BackgroundWriteback(7, lambda fd, off, n: calls.append((fd, off, n)))
    for k in range(5):
        wb(k * 100, 100)
    wb.close()
    assert wb.thread is None
    # ranges queued while the thread was busy are merged: together they cover all
    assert all(fd == 7 for fd, _, _ in calls)
    covered = set()
    for _, off, n in calls:
        covered.update(range(off, off + n))
    assert covered == set(range(500))
    wb.close()  # twice: nothing


def test_raw_groups_keep_order_and_size():
    from pyqcow.ops.convert_raw import RAW_PIECE, Batch, _groups

    work = [Batch(5, [(0, 0, RAW_PIECE // 2)], RAW_PIECE // 2),
            Batch(6, [(0, RAW_PIECE // 2, RAW_PIECE // 2)], RAW_PIECE // 2),
            Batch(5, [(RAW_PIECE, RAW_PIECE, 1)], 1),
            Batch(None, [(RAW_PIECE + 1, RAW_PIECE + 1, RAW_PIECE)], RAW_PIECE)]
    groups = _groups(work)
    assert groups == [work[:2], [work[2]], [work[3]]]
    assert [b for g in groups for b in g] == work


def test_lean_zero_runs_equal_fastcopys():
    from pyqcow.ops.convert_qcow2 import _zero_runs

    buf = bytearray(os.urandom(64 * KiB))
    buf[8 * KiB : 24 * KiB] = bytes(16 * KiB)
    buf[60 * KiB :] = bytes(4 * KiB)
    want = fastcopy.zero_runs(buf, 4 * KiB)
    assert _zero_runs(fastcopy._native_for_call(), memoryview(buf), 4 * KiB) == want
    assert _zero_runs(None, memoryview(buf), 4 * KiB) == want
    assert (8 * KiB, 16 * KiB, True) in want


def _chain(tmp_path):
    import qemu

    C = 64 * KiB
    base = qemu.create(tmp_path / "base.qcow2", 64 * C)
    qemu.qemu_io(base, f"write -P 1 0 {20 * C}", f"write -P 2 {30 * C} {10 * C}",
                 f"write -z {32 * C} {C}")
    top = qemu.create(tmp_path / "top.qcow2", 64 * C, backing=base, backing_fmt="qcow2")
    qemu.qemu_io(top, f"write -P 3 {5 * C} {C}", f"write -P 4 {12 * C} {3 * C}",
                 f"write -z {16 * C} {C}", f"write -P 5 {50 * C} {C}")
    return base, top


@needs_native
@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_convert_qcow2_copies_host_data_file_to_file(tmp_path, monkeypatch, cache):
    """Host data goes file to file into the qcow2 output on any file system (one
    in-kernel copy), in batches; with -t none it is written from buffers
    (O_DIRECT).  The result equals the source and checks clean either way."""
    import qemu

    import pyqcow
    from pyqcow import hostfile
    from pyqcow.ops.convert import convert_to_qcow2

    base, top = _chain(tmp_path)
    calls = []
    real = fastcopy.copy_runs

    def counting(src, dst, runs, **kw):
        calls.append(len(runs))
        return real(src, dst, runs, **kw)

    monkeypatch.setattr(fastcopy, "copy_runs", counting)
    monkeypatch.setattr(hostfile, "_cache", {"write": cache, "read": "writeback"})
    out = tmp_path / "out.qcow2"
    with pyqcow.open(str(top)) as img:
        convert_to_qcow2(img, out)
    monkeypatch.undo()
    assert qemu.compare(top, out) == 0
    assert qemu.check_json(out)[1] == 0
    if cache == "writeback":
        assert calls and len(calls) <= 2  # one call per source file (one batch)
    else:
        assert calls == []
    # -B onto the base: only what the top holds, the same way
    calls.clear()
    monkeypatch.setattr(fastcopy, "copy_runs", counting)
    outb = tmp_path / "outb.qcow2"
    with pyqcow.open(str(top)) as img:
        convert_to_qcow2(img, outb, backing=str(base), backing_format="qcow2")
    monkeypatch.undo()
    assert qemu.compare(top, outb) == 0
    assert qemu.check_json(outb)[1] == 0
    assert calls == [3]  # the top's three data runs, one call


def _mapping_rss_kib(path) -> int:
    """The resident KiB of this process's mappings of the file ``path`` (smaps)."""
    hit = False
    total = None
    with open("/proc/self/smaps") as f:
        for line in f:
            words = line.split()
            if "-" in words[0] and not words[0].endswith(":"):
                hit = words[-1] == str(path)
            elif hit and words[0] == "Rss:":
                total = (total or 0) + int(words[1])
    assert total is not None, "mapping not found"
    return total


def test_source_maps_let_go_of_pages_scanned_after_their_window(tmp_path, monkeypatch):
    """convert -O qcow2 takes a chunk's view up to two chunks before it scans it
    (read ahead, consumed later): pages scanned after their window was let go must
    still be let go (was: they stayed mapped, 143 MiB peak RSS on the 4 GiB chain)."""
    monkeypatch.setattr(cc, "DROP_BYTES", 1 << 20)
    chunk, ahead, size = 256 * KiB, 2, 48 << 20
    src = tmp_path / "src"
    src.write_bytes(os.urandom(size))
    fd = os.open(src, os.O_RDONLY)
    try:
        with cc.SourceMaps() as maps:
            pending = []
            total = 0
            for off in range(0, size, chunk):
                pending.append(maps.view(fd, off, chunk))
                if len(pending) > ahead:
                    total += sum(pending.pop(0)[::4096])  # the scan: touches every page
            rss = _mapping_rss_kib(src)
            del pending
    finally:
        os.close(fd)
    # a window (1 MiB) or a few mapped at a time, not the 48 MiB scanned
    assert rss < 8 * 1024, f"{rss} KiB of the source still mapped"
