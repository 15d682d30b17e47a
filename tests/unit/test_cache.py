"""pyqcow.cache.TableCache on its own, and the writer over a cache smaller than
the tables one write touches (qemu-img check and compare as oracles)."""

from __future__ import annotations

import os
import random

import pytest
import qemu

from pyqcow.cache import TableCache
from pyqcow.chain import open_image

KiB = 1024
MiB = 1024 * KiB


# --------------------------------------------------------------------------- the cache alone
def test_bounded_clean_tables_dropped_least_recently_used_first():
    c = TableCache(3)
    for k in range(3):
        c.put(k, [k])
    assert c.get(0) == [0]  # 0 is now the most recently used
    c.put(3, [3])
    assert sorted(c.keys()) == [0, 2, 3]  # 1 was the least recently used
    c.put(4, [4])
    assert sorted(c.keys()) == [0, 3, 4]
    assert len(c) == 3 and c.get(1) is None


def test_eviction_writes_nothing_and_never_drops_a_dirty_table():
    c = TableCache(2, dirty_limit=10)
    writes = []
    for k in range(5):
        c.put(k, [k], dirty=True)
    assert sorted(c.keys()) == [0, 1, 2, 3, 4]  # all dirty: over the bound, none dropped
    c.put(5, [5])  # clean, the newest: kept (its caller is about to use it)
    assert sorted(c.keys()) == [0, 1, 2, 3, 4, 5]
    c.put(6, [6])  # a clean one beyond the bound goes, dirty ones stay
    assert 5 not in c and 6 in c and all(k in c for k in range(5))
    assert writes == []
    assert c.dirty == {0, 1, 2, 3, 4}


def test_mark_dirty_pins_a_cached_table():
    c = TableCache(1)
    c.put("a", [1])
    c.mark_dirty("a")
    c.put("b", [2])
    c.put("c", [3])
    assert "a" in c and c.dirty == {"a"}
    with pytest.raises(KeyError, match="not cached"):
        c.mark_dirty("zz")


def test_needs_flush_past_the_dirty_limit():
    c = TableCache(4, dirty_limit=2)
    c.put(1, [1], dirty=True)
    c.put(2, [2], dirty=True)
    assert not c.needs_flush
    c.put(3, [3], dirty=True)
    assert c.needs_flush


def test_write_dirty_in_key_order_then_clean_and_bounded_again():
    c = TableCache(2, dirty_limit=100)
    for k in (30, 10, 20, 40):
        c.put(k, [k], dirty=True)
    c.put(5, [5])
    written = []
    assert c.write_dirty(lambda k, t: written.append((k, list(t))))
    assert written == [(10, [10]), (20, [20]), (30, [30]), (40, [40])]
    assert not c.dirty and len(c) == 2  # clean now: dropped down to the bound
    assert not c.write_dirty(lambda k, t: written.append(k))


def test_write_dirty_failure_keeps_the_unwritten_tables_dirty():
    c = TableCache(8)
    for k in (1, 2, 3):
        c.put(k, [k], dirty=True)

    def write(k, t):
        if k == 2:
            raise OSError("EIO")

    with pytest.raises(OSError, match="EIO"):
        c.write_dirty(write)
    assert c.dirty == {2, 3}


def test_drop_pop_and_clear_forget_dirty_tables_too():
    c = TableCache(8)
    c.put(1, [1], dirty=True)
    c.put(2, [2], dirty=True)
    c.put(3, [3])
    c.drop(1)
    assert 1 not in c and c.dirty == {2}
    assert c.pop(2) == [2] and c.dirty == set()
    assert c.pop(99, "none") == "none"
    c.clear()
    assert len(c) == 0


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="at least one table"):
        TableCache(0)


# --------------------------------------------------------------------------- writer over a tiny cache
def _tiny_caches(img) -> None:
    img.l2_cache.capacity = 2
    img.l2_cache.dirty_limit = 3
    img.refcounts.blocks.capacity = 1
    img.refcounts.blocks.dirty_limit = 1


@pytest.mark.parametrize("opts, size", [
    (("cluster_size=512",), 4 * MiB),  # an L2 table maps 32 KiB
    (("cluster_size=16384", "extended_l2=on"), 72 * MiB),  # ... 16 MiB
    (("cluster_size=512", "refcount_bits=1"), 4 * MiB),  # a refcount block: 4096 clusters
])
def test_writes_touching_more_tables_than_the_cache_holds(tmp_path, opts, size):
    """One write spanning many more L2 tables (and refcount blocks) than the cache
    bound, then scattered partial writes over a backing file (copy-on-write reads
    through evicted tables): qemu-img check clean, same guest data as qemu-io's."""
    base = qemu.create(tmp_path / "base.qcow2", size, "cluster_size=512")
    qemu.qemu_io(base, f"write -P 0x33 0 {size}")
    ours = qemu.create(tmp_path / "ours.qcow2", None, *opts, backing="base.qcow2",
                       backing_fmt="qcow2", cwd=tmp_path)
    ref = qemu.create(tmp_path / "ref.qcow2", None, *opts, backing="base.qcow2",
                      backing_fmt="qcow2", cwd=tmp_path)
    rng = random.Random(13)
    big = os.urandom(size * 3 // 4 + 700)  # more L2 tables than the cache holds
    small = [(rng.randrange(size - 3000), os.urandom(rng.randrange(1, 3000))) for _ in range(60)]
    with open_image(str(ours), "r+") as img:
        _tiny_caches(img)
        img.write(300, big)
        for off, data in small:
            img.write(off, data)
            assert len(img.l2_cache.dirty) <= 3  # flushed at the end of each write
        img.write_zeroes(MiB + 512, 100 * KiB)
        img.discard(2 * MiB, 64 * KiB)
    with open_image(str(ref), "r+") as img:  # pyqcow with its default cache sizes
        img.write(300, big)
        for off, data in small:
            img.write(off, data)
        img.write_zeroes(MiB + 512, 100 * KiB)
        img.discard(2 * MiB, 64 * KiB)
    res, rc = qemu.check_json(ours)
    assert rc == 0 and not res.get("leaks") and not res.get("corruptions"), res
    assert qemu.compare(ours, ref) == 0
    # the guest bytes qemu reads are the ones written
    raw = bytearray(qemu.convert_raw(base, tmp_path / "expect.raw").read_bytes())
    raw[300 : 300 + len(big)] = big
    for off, data in small:
        raw[off : off + len(data)] = data
    raw[MiB + 512 : MiB + 512 + 100 * KiB] = bytes(100 * KiB)
    raw[2 * MiB : 2 * MiB + 64 * KiB] = bytes(64 * KiB)  # discarded over a backing: zeros
    (tmp_path / "expect.raw").write_bytes(raw)
    assert qemu.compare(ours, tmp_path / "expect.raw", fmt_b="raw") == 0


# --------------------------------------------------------------------------- prepare_write handles
def _counting_flush(monkeypatch) -> list:
    from pyqcow import writer

    calls = []
    real = writer.Writer.flush

    def flush(self):
        calls.append(self.unfilled)
        return real(self)

    monkeypatch.setattr(writer.Writer, "flush", flush)
    return calls


def test_no_flush_while_a_prepared_range_is_unfilled(tmp_path, monkeypatch):
    """The cache over its bound does not flush while a prepare_write handle waits
    for its data; filling it is the safe point that flushes."""
    path = qemu.create(tmp_path / "d.qcow2", 4 * MiB, "cluster_size=512")
    calls = _counting_flush(monkeypatch)
    with open_image(str(path), "r+") as img:
        _tiny_caches(img)
        handle = img.prepare_write(0, 256 * KiB)  # 8 L2 tables: over the bound at once
        assert handle.pending and sum(n for _, _, n in handle) == 256 * KiB
        img.write(MiB, os.urandom(200 * KiB))  # more dirty tables: still no flush
        assert calls == []
        for g, h, n in handle:
            os.pwrite(img.data_hf.fd, bytes([0x40 + (g >> 15) % 64]) * n, h)
        handle.filled()
        assert calls == [0] and not handle.pending
        handle.filled()  # twice: nothing more
        assert calls == [0]
    res, rc = qemu.check_json(path)
    assert rc == 0 and not res.get("leaks"), res
    for g in range(0, 256 * KiB, 32 * KiB):
        qemu.qemu_io(path, f"read -P {0x40 + (g >> 15) % 64:#x} {g} {32 * KiB}", read_only=True)


def test_old_callers_fill_then_flush(tmp_path, monkeypatch):
    """The list-of-runs contract: a caller that never calls filled() fills the runs
    and flushes; its explicit flush settles the handle."""
    path = qemu.create(tmp_path / "d.qcow2", 4 * MiB, "cluster_size=512")
    calls = _counting_flush(monkeypatch)
    with open_image(str(path), "r+") as img:
        _tiny_caches(img)
        runs = img.prepare_write(MiB, 128 * KiB)
        assert isinstance(runs, list) and runs == [tuple(r) for r in runs]
        for _, h, n in runs:
            os.pwrite(img.data_hf.fd, b"\x5a" * n, h)
        img.flush()
        assert calls == [1] and img.writer.unfilled == 0
        runs.filled()  # a late filled() after the flush changes nothing
        assert img.writer.unfilled == 0
        img.write(0, os.urandom(200 * KiB))  # 7 tables: the writer flushes by itself again
        assert len(calls) == 2
    res, rc = qemu.check_json(path)
    assert rc == 0 and not res.get("leaks"), res
    qemu.qemu_io(path, f"read -P 0x5a {MiB} {128 * KiB}", read_only=True)


# --------------------------------------------------------------------------- the copier's batches
@pytest.mark.parametrize("op", ["commit", "stream"])
def test_copier_batch_keeps_dirty_tables_near_the_bound(tmp_path, monkeypatch, op):
    """A commit/stream of clusters scattered over many more L2 tables than the
    cache's dirty limit drains its batch as the tables add up: the dirty set
    stays near the bound (was: every table of a 256 MiB batch pinned at once,
    310 MiB of RSS on a 4 TiB image) and the result equals qemu-img's."""
    from pyqcow import cache, image
    from pyqcow.ops.commit import commit
    from pyqcow.ops.stream import stream

    monkeypatch.setattr(image, "L2_CACHE_TABLES", 2)
    monkeypatch.setattr(image, "MAX_DIRTY_L2", 4)
    peak = [0]
    real_mark, real_put = cache.TableCache.mark_dirty, cache.TableCache.put

    def mark_dirty(self, key):
        real_mark(self, key)
        peak[0] = max(peak[0], len(self.dirty))

    def put(self, key, table, dirty=False):
        real_put(self, key, table, dirty)
        peak[0] = max(peak[0], len(self.dirty))

    monkeypatch.setattr(cache.TableCache, "mark_dirty", mark_dirty)
    monkeypatch.setattr(cache.TableCache, "put", put)
    size = 4 * MiB  # 512-byte clusters: an L2 table maps 32 KiB, 128 tables
    paths = {}
    for who in ("ours", "ref"):
        base = qemu.create(tmp_path / f"{who}-base.qcow2", size, "cluster_size=512")
        qemu.qemu_io(base, *(f"write -P {1 + i % 200} {i * 32 * KiB + 1024} 512"
                             for i in range(0, 128, 2)))
        top = qemu.create(tmp_path / f"{who}-top.qcow2", size, "cluster_size=512",
                          backing=base.name, backing_fmt="qcow2", cwd=tmp_path)
        qemu.qemu_io(top, *(f"write -P {0x80 + i % 100} {i * 32 * KiB + 4096} 512"
                            for i in range(1, 128, 2)))
        paths[who] = (base, top)
    expect = qemu.convert_raw(paths["ref"][1], tmp_path / "expect.raw")
    base, top = paths["ours"]
    if op == "commit":
        commit(str(top))
        result = base
    else:
        stream(str(top))
        result = top
    assert 0 < peak[0] <= 2 * 4 + 1, peak[0]
    res, rc = qemu.check_json(result)
    assert rc == 0 and not res.get("leaks") and not res.get("corruptions"), res
    assert qemu.compare(result, expect, fmt_b="raw") == 0
