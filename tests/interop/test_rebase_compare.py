"""Safe rebase compares the two chains where they lie (pyqcow/ops/rebase.py
``_Sources``): in read-only mappings of the files, through the C helper or the
Python fallback, compressed clusters read through their layer; bytes at the
same offset of the same file are equal without being looked at.  qemu-img's
rebase is the oracle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import qemu
from host_needs import backend_ctx, require_native

from pyqcow import fastcopy
from pyqcow.ops import rebase as rebase_mod

KiB = 1024
U = 64 * KiB
SIZE = 64 * U + 3 * 512  # a partial cluster at the end


def _build(d: Path) -> Path:
    d.mkdir()
    base = qemu.create(d / "base.qcow2", SIZE)
    qemu.qemu_io(base, f"write -P 0x11 0 {16 * U}", f"write -c -P 0x12 {20 * U} {U}",
                 f"write -z {24 * U} {U}", f"write -P 0x13 {40 * U} {4 * U}",
                 f"write -P 0x14 {64 * U} 1536")
    other = qemu.create(d / "other.qcow2", SIZE)
    qemu.qemu_io(other, f"write -P 0x11 0 {8 * U}",  # the same bytes as the old chain
                 f"write -P 0x99 {8 * U} {4 * U}",
                 f"write -c -P 0x12 {20 * U} {U}",  # compressed on both sides, equal
                 f"write -c -P 0x22 {21 * U} {U}",  # compressed, differs from zeros
                 f"write -P 0 {30 * U} {2 * U}",  # zeros written as data: equal to a hole
                 f"write -P 0x13 {41 * U} 4096",  # differs in its last bytes only
                 f"write -P 0x15 {42 * U + U - 512} 512",
                 f"write -P 0x16 {64 * U} 512")
    top = qemu.create(d / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qemu.qemu_io(top, f"write -P 0x31 {5 * U} {2 * U}")
    return top


def _raw(path: Path, out: Path) -> bytes:
    qemu.convert_raw(path, out)
    return out.read_bytes()


@pytest.mark.parametrize("backend", ["native", "python"])
def test_safe_rebase_compare_matches_qemu(tmp_path: Path, backend: str) -> None:
    ours, theirs = _build(tmp_path / "ours"), _build(tmp_path / "theirs")
    before = _raw(ours, tmp_path / "before.raw")
    with backend_ctx(backend):
        rebase_mod.rebase(ours, "other.qcow2", backing_format="qcow2")
    qemu.qemu_img("rebase", "-q", "-b", "other.qcow2", "-F", "qcow2", theirs, cwd=theirs.parent)
    assert _raw(ours, tmp_path / "after.raw") == before
    assert qemu.compare(ours, theirs) == 0
    assert qemu.check_json(ours)[1] == 0
    # where the chains read the same, the top still allocates nothing
    own = [(e["start"], e["start"] + e["length"]) for e in qemu.map_json(ours)
           if e["depth"] == 0 and (e["data"] or e["zero"])]
    for same in ((0, 5 * U), (7 * U, 8 * U), (20 * U, 21 * U), (30 * U, 32 * U)):
        assert not any(a < same[1] and same[0] < b for a, b in own), (same, own)
    for differs in (8 * U, 21 * U, 41 * U, 42 * U, 64 * U):
        assert any(a <= differs < b for a, b in own), (differs, own)


@pytest.mark.parametrize("backend", ["native", "python"])
def test_sibling_overlays_compare_only_what_they_allocate(tmp_path: Path, monkeypatch,
                                                          backend: str) -> None:
    """Rebasing from one overlay of a base onto another: where neither overlay
    allocates, both chains read the base's same clusters, which are not looked
    at (the new chain does not hold the old backing file, so this is found from
    the file and offset of each side)."""
    chains = {}
    for name in ("ours", "theirs"):
        d = tmp_path / name
        d.mkdir()
        base = qemu.create(d / "base.qcow2", 32 * U)
        qemu.qemu_io(base, f"write -P 0x11 0 {32 * U}")
        for mid, cmd in (("mid1", f"write -P 0x21 {2 * U} {U}"),
                         ("mid2", f"write -P 0x22 {10 * U} {U}")):
            qemu.create(d / f"{mid}.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
            qemu.qemu_io(d / f"{mid}.qcow2", cmd)
        chains[name] = qemu.create(d / "top.qcow2", None, backing="mid1.qcow2",
                                   backing_fmt="qcow2", cwd=d)
        qemu.qemu_io(chains[name], f"write -P 0x31 {20 * U} {U}")
    ours, theirs = chains["ours"], chains["theirs"]
    before = _raw(ours, tmp_path / "before.raw")
    looked: list[int] = []
    real = rebase_mod._Sources.view

    def view(self, p, loc, a, n, side):
        looked.append(n)
        return real(self, p, loc, a, n, side)

    monkeypatch.setattr(rebase_mod._Sources, "view", view)
    with backend_ctx(backend):
        rebase_mod.rebase(ours, "mid2.qcow2", backing_format="qcow2")
    monkeypatch.undo()
    qemu.qemu_img("rebase", "-q", "-b", "mid2.qcow2", "-F", "qcow2", theirs, cwd=theirs.parent)
    assert _raw(ours, tmp_path / "after.raw") == before
    assert qemu.compare(ours, theirs) == 0
    assert qemu.check_json(ours)[1] == 0
    # clusters 2 and 10 (one overlay allocates them), both chains: nothing else
    assert 0 < sum(looked) <= 2 * 2 * U, looked


def test_a_file_shrinking_under_the_compare_is_an_error_not_a_crash(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """The chains are compared in mappings of their files: a file truncated by
    someone else meanwhile raises SIGBUS there, which the C helper turns into
    a clean error (the process lives on, the top is as before)."""
    from pyqcow.errors import QcowError

    require_native()
    old = qemu.create(tmp_path / "old.qcow2", 4 * 1024 * KiB)
    qemu.qemu_io(old, f"write -P 0x11 0 {4 * 1024 * KiB}")
    new = qemu.create(tmp_path / "new.qcow2", 4 * 1024 * KiB)
    qemu.qemu_io(new, f"write -P 0x22 0 {4 * 1024 * KiB}")
    top = qemu.create(tmp_path / "top.qcow2", None, backing="old.qcow2", backing_fmt="qcow2",
                      cwd=tmp_path)
    ref = qemu.convert_raw(top, tmp_path / "ref.raw")
    real = rebase_mod._Sources._file

    def shrinking(self, fd):
        got = real(self, fd)
        if os.fstat(fd).st_ino == os.stat(old).st_ino:
            os.truncate(old, 3 * U)  # under the mapping just made
        return got

    monkeypatch.setattr(rebase_mod._Sources, "_file", shrinking)
    with fastcopy.backend("native"), pytest.raises(QcowError, match="shrank"):
        rebase_mod.rebase(top, "new.qcow2", backing_format="qcow2")
    monkeypatch.undo()
    assert qemu.check_json(top)[1] in (0, 3)
    assert qemu.info_json(top)["backing-filename"] == "old.qcow2"
    assert os.path.getsize(ref) == 4 * 1024 * KiB
