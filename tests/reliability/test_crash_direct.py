"""Crash and fault injection at every fault point of commit and stream with the
copier's O_DIRECT path forced on (directcopy.DirectWriter: fresh clusters reserved
with fallocate and written through an O_DIRECT descriptor on threads).  The
images of test_crash_inject's fixed chain are far below the path's real
thresholds, so these are lowered here; the promises are the same."""

from __future__ import annotations

import crashkit
import pytest
import scenarios
from host_needs import require_native, require_o_direct
from test_crash_inject import _run, fixed_chain

from pyqcow.ops import directcopy


@pytest.fixture(autouse=True)
def _native() -> None:
    require_native()  # the O_DIRECT path needs the helper's fallocate


@pytest.mark.parametrize("name", ["commit", "stream"])
def test_crash_points_with_direct_copies(name, tmp_path, monkeypatch):
    d = tmp_path / "chain"
    d.mkdir()
    require_o_direct(d)
    monkeypatch.setattr(directcopy, "DIRECT_MIN", 4096)
    monkeypatch.setattr(directcopy, "DIRECT_GROUP", 8192)
    direct: list[int] = []
    real = directcopy.DirectWriter._fill_and_write

    def spy(self, src_fd, group, view):
        n = real(self, src_fd, group, view)
        direct.append(n)
        return n

    monkeypatch.setattr(directcopy.DirectWriter, "_fill_and_write", spy)
    ch = fixed_chain(str(d))
    sc = scenarios.build(name, ch, 3)
    points = crashkit.count_points(ch.directory, ch.directory + ".work", sc.op)
    assert "copy_runs" in points and direct, "the O_DIRECT path did not run"
    n = _run(name, ch, modes=("crash", "enospc", "eio"), seed_=3)
    assert n >= len(points)


def test_crash_points_with_relocating_commit(xfs_reflink, request, monkeypatch):
    """On a reflink file system a commit moves the base's own clusters under the
    top's data to new ones (copied in source order) and frees and punches the
    old ones once the new mapping is durable: a crash, ENOSPC or EIO at any
    fault point of it keeps the promises (issue 14's XFS commit)."""
    import shutil

    from pyqcow import writer as writer_mod

    d = xfs_reflink / f"crash-{request.node.name}"
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(str(d) + ".work", ignore_errors=True)
    d.mkdir()
    punched: list[int] = []
    real = writer_mod._punch_clusters

    def spy(hf, clusters, cluster_bits):
        punched.extend(clusters)
        return real(hf, clusters, cluster_bits)

    monkeypatch.setattr(writer_mod, "_punch_clusters", spy)
    try:
        ch = fixed_chain(str(d))
        sc = scenarios.build("commit", ch, 3)
        points = crashkit.count_points(ch.directory, ch.directory + ".work", sc.op)
        assert "copy_runs" in points and punched, "the commit did not relocate"
        n = _run("commit", ch, modes=("crash", "enospc", "eio"), seed_=3)
        assert n >= len(points)
    finally:
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(str(d) + ".work", ignore_errors=True)
