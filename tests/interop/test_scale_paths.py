"""The scale paths (issue 14 item 5) against the slow paths they replace.

- check: the scan that keeps the active tables' data entries for the COPIED
  pass, with the C nonzero scan, reports exactly what the scan that reads every
  table again with the Python fallback reports (messages, counts), on every
  shape of the zoo and every hand-corrupted image of test_check_interop;
- merge planning: ``merge_costs`` equals the byte counts of the commit and
  stream plans, on the zoo's chains and on random chains (hypothesis);
- "time proportional to the allocated metadata": on a sparse 1 TiB chain,
  merge planning, check, map and the commit/stream plans read each L2 table at
  most once and none that no L1 entry points to (counted preads, no timing).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from interop.shapes import SHAPES
from interop.test_check_interop import CORRUPTIONS, _base

from pyqcow import fastcopy
from pyqcow import scan as scan_mod
from pyqcow.chain import open_image
from pyqcow.check_result import CheckFailed
from pyqcow.entries import l1_l2_offset
from pyqcow.errors import CorruptImageError
from pyqcow.image import QcowImage
from pyqcow.mapping import chain_status
from pyqcow.ops import plan as plan_mod
from pyqcow.ops.check import check
from pyqcow.ops.commit import plan_commit
from pyqcow.ops.merge import plan_merge
from pyqcow.ops.plan import data_bytes, merge_costs
from pyqcow.ops.stream import plan_stream, stream_bytes
from pyqcow.testing import chains

pytestmark = pytest.mark.usefixtures("qemu_img_path", "qemu_io_path")

GiB = 1 << 30
TiB = 1 << 40


def _outcome(path: Path):
    try:
        return check(str(path))
    except CheckFailed as e:
        return ("failed", e.message, e.messages)


def _check_both_ways(path: Path, monkeypatch) -> None:
    fast = _outcome(path)
    with monkeypatch.context() as m:
        m.setattr(scan_mod, "_COPIED_CACHE_ENTRIES", 0)  # the COPIED pass reads again
        with fastcopy.backend("python"):
            slow = _outcome(path)
    assert fast == slow


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_check_fast_path_equals_slow_path_on_shapes(name, tmp_path, monkeypatch) -> None:
    shape = SHAPES[name](tmp_path)
    assert shape.fmt == "qcow2"  # every shape of the zoo's tops is (a raw one would need a branch)
    _check_both_ways(shape.path, monkeypatch)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_check_fast_path_equals_slow_path_on_corrupted(name, tmp_path, monkeypatch) -> None:
    p = _base(tmp_path / "img.qcow2")
    CORRUPTIONS[name](p)
    _check_both_ways(p, monkeypatch)


def _old_costs(top, base) -> tuple[int, int]:
    return data_bytes(plan_commit(top, base)), stream_bytes(top, base.backing)


def _walked_costs(top, base) -> tuple[int, int]:
    """merge_costs by walking runs (its path for layers whose tables do not compare)."""
    real = plan_mod._tables_comparable
    plan_mod._tables_comparable = lambda top, base: False
    try:
        return merge_costs(top, base)
    finally:
        plan_mod._tables_comparable = real


def _costs_agree(top_path: str) -> None:
    top = open_image(top_path, "r", force_share=True)
    try:
        img = top
        while img is not None and img.backing is not None and img.format == "qcow2":
            costs = merge_costs(img, img.backing)
            assert costs == _old_costs(img, img.backing) == _walked_costs(img, img.backing)
            img = img.backing
    finally:
        top.close()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_merge_costs_equal_plans_on_shapes(name, tmp_path) -> None:
    shape = SHAPES[name](tmp_path)
    assert shape.fmt == "qcow2"  # every shape of the zoo's tops is (a raw one would need a branch)
    _costs_agree(str(shape.path))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ch=chains())
def test_merge_costs_equal_plans_on_random_chains(ch) -> None:
    try:
        _costs_agree(ch.top)
    finally:
        shutil.rmtree(ch.directory, ignore_errors=True)


@pytest.mark.parametrize("layer", ["top", "base"])
@pytest.mark.parametrize("entry", [0x10000 | 0x200, 1 << 50, 0x40000000000000 | 0x10000])
def test_merge_costs_refuse_a_bad_l2_entry_as_a_lookup_does(tmp_path, layer, entry) -> None:
    """An unaligned host offset, one past the end of the file, reserved bits: the
    table comparison raises the error the run walk raises, naming the image."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    str(top)], check=True, cwd=tmp_path)
    for path in (base, top):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 1M 64k", str(path)], check=True,
                       stdout=subprocess.DEVNULL)
    bad = base if layer == "base" else top
    img = QcowImage(str(bad), "r", force_share=True)
    l2 = l1_l2_offset(img.l1[0])
    img.close()
    with open(bad, "r+b") as f:  # guest cluster 17 (1 MiB + 64 KiB): data past 1M's
        f.seek(l2 + 8 * 17)
        f.write(entry.to_bytes(8, "big"))
    img = open_image(str(top), "r", force_share=True)
    try:
        with pytest.raises(CorruptImageError) as walked:
            _walked_costs(img, img.backing)
        with pytest.raises(CorruptImageError) as compared:
            merge_costs(img, img.backing)
    finally:
        img.close()
    assert str(compared.value) == str(walked.value)
    assert str(bad) in str(compared.value)


# --------------------------------------------------------------- proportional work
@pytest.fixture(scope="module")
def sparse_chain():
    """A 1 TiB base with data in 6 of its 2,048 L2 spans, and an overlay writing
    into 3 spans (one shared with the base)."""
    d = Path(tempfile.mkdtemp(prefix="scale-"))
    span = 512 << 20
    base, top = d / "base.qcow2", d / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(TiB)], check=True)
    cmds = [f"write -P {i + 1} {s * span + 65536 * i} 65536"
            for i, s in enumerate((0, 3, 700, 701, 1500, 2047))]
    subprocess.run(["qemu-io", "-f", "qcow2", str(base)] + sum((["-c", c] for c in cmds), []),
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    str(top)], check=True, cwd=d)
    cmds = [f"write -P 9 {s * span + 131072} 65536" for s in (3, 1000, 2046)]
    subprocess.run(["qemu-io", "-f", "qcow2", str(top)] + sum((["-c", c] for c in cmds), []),
                   check=True, stdout=subprocess.DEVNULL)
    yield base, top
    shutil.rmtree(d, ignore_errors=True)


class _Reads:
    """Counts the cluster-sized preads (L2 tables) of every image opened, with an
    L2 cache of one table (so that a second look at a table is a second read)."""

    def __init__(self, monkeypatch) -> None:
        from pyqcow import image
        from pyqcow.hostfile import HostFile

        monkeypatch.setattr(image, "L2_CACHE_TABLES", 1)

        self.reads: list[tuple[str, int]] = []
        original = HostFile.pread
        reads = self.reads

        def pread(hf, n, offset):
            if n == 65536:
                reads.append((hf.path, offset))
            return original(hf, n, offset)

        monkeypatch.setattr(HostFile, "pread", pread)


def _l2_tables(path: Path) -> set[tuple[str, int]]:
    img = QcowImage(str(path), "r", force_share=True)
    try:
        return {(img.hf.path, l1_l2_offset(e)) for e in img.l1 if e}
    finally:
        img.close()


def _assert_each_table_once(reads, tables) -> None:
    l2_reads = [r for r in reads if r in tables]
    assert len(l2_reads) == len(set(l2_reads)), "an L2 table was read twice"


def test_merge_planning_reads_each_l2_table_once(sparse_chain, monkeypatch) -> None:
    base, top = sparse_chain
    tables = _l2_tables(base) | _l2_tables(top)
    assert len(tables) == 9  # 6 + 3 of 2 x 2,048 L1 entries
    r = _Reads(monkeypatch)
    plan = plan_merge(str(top))
    assert (plan.commit_bytes, plan.stream_bytes) == (3 * 65536, 6 * 65536)
    # every cluster-sized read is the header or an L2 table an L1 entry points to
    # (a refcount block for the plan's refusals), each table at most once
    _assert_each_table_once(r.reads, tables)
    assert len(r.reads) <= len(tables) + 4


def test_check_reads_each_l2_table_once(sparse_chain, monkeypatch) -> None:
    base, _ = sparse_chain
    tables = _l2_tables(base)
    r = _Reads(monkeypatch)
    res = check(str(base))
    assert res.clean and not res.messages
    _assert_each_table_once(r.reads, tables)
    assert {x for x in r.reads if x in tables} == tables


@pytest.mark.parametrize("what", ["map", "commit", "stream"])
def test_map_and_plans_read_only_allocated_tables(sparse_chain, monkeypatch, what) -> None:
    base, top = sparse_chain
    tables = _l2_tables(base) | _l2_tables(top)
    r = _Reads(monkeypatch)
    img = open_image(str(top), "r", force_share=True)
    try:
        if what == "map":
            chain_status(img)
        elif what == "commit":
            assert data_bytes(plan_commit(img, img.backing)) == 3 * 65536
        else:
            assert data_bytes(plan_stream(img, None)) == 6 * 65536
    finally:
        img.close()
    _assert_each_table_once(r.reads, tables)
    assert len(r.reads) <= len(tables) + 2
