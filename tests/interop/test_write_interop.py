"""Write engine against qemu-img: convert -O qcow2, refcount-table relocation,
bad input on read-write open, out-of-range writes, ENOSPC/EIO during writes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
from pathlib import Path

import pytest
import qemu
from qemu import check_json, compare, create, info_json, map_json, qemu_img, qemu_io

import pyqcow
from pyqcow.cli.main import main as cli
from pyqcow.hostfile import HostFile

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    qemu.require_tool("qemu-img")
    qemu.require_tool("qemu-io")


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


# --- convert -O qcow2 ------------------------------------------------------------------


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A chain (qcow2 base + overlay) with data, zeros, compressed and random clusters."""
    base = create(tmp_path / "srcbase.qcow2", 12 * MiB + 1536)
    qemu_io(base, "write -P 0x11 0 1M", "write -P 0x12 8M 256k")
    top = create(tmp_path / "src.qcow2", None, backing=base, backing_fmt="qcow2")
    rnd = tmp_path / "rnd.bin"
    rnd.write_bytes(random.Random(7).randbytes(256 * KiB))
    qemu_io(
        top,
        "write -P 0x21 512k 1M",  # over the base's data and beyond
        "write -P 0 2M 1M",  # written zeros: must not be allocated
        "write -c -P 0x33 4M 128k",  # compressed in the source
        "write -z 8M 64k",  # zero cluster over base data
        f"write -s {rnd} 10M 256k",  # incompressible
        "write -P 0x44 12M 1536",  # the short last cluster
    )
    return top


def _allocated(p: Path) -> int:
    return sum(e["length"] for e in map_json(p) if e["data"])


CONVERT_OPTS = [
    [],
    ["-c"],
    ["-c", "-o", "compression_type=zstd"],
    ["-o", "cluster_size=512,refcount_bits=1"],
    ["-c", "-o", "cluster_size=512"],
    ["-c", "-o", "compat=0.10"],
    ["-c", "-o", "extended_l2=on,cluster_size=32k"],
    ["-c", "-o", "cluster_size=2M,refcount_bits=64"],
    ["-o", "lazy_refcounts=on,refcount_bits=8"],
    ["-c", "-o", "refcount_bits=1,cluster_size=4k"],
]


@pytest.mark.parametrize("opts", CONVERT_OPTS, ids=lambda o: " ".join(o) or "plain")
def test_convert_qcow2_matches_source(source: Path, tmp_path: Path, opts: list[str]) -> None:
    dst = tmp_path / "dst.qcow2"
    assert cli(["convert", "-O", "qcow2", *opts, str(source), str(dst)]) == 0
    assert compare(source, dst) == 0
    result, rc = check_json(dst)
    assert rc == 0, result
    info = info_json(dst)
    assert "backing-filename" not in info
    extents = map_json(dst)
    data = [e for e in extents if e["data"]]
    # zero detection: the written-zeros MiB and the zero cluster are not data
    for e in data:
        assert not (e["start"] < 3 * MiB and e["start"] + e["length"] > 2 * MiB), e
    if "-c" in opts:
        assert result.get("compressed-clusters", 0) > 0, result
        compressed = [e for e in data if "offset" not in e]
        assert compressed, extents
        # the incompressible random range stays uncompressed (offset shown)
        if "cluster_size=2M" not in opts[-1]:  # a 2M cluster with it compresses well
            rnd = [e for e in data if e["start"] <= 10 * MiB < e["start"] + e["length"]]
            assert rnd and "offset" in rnd[0], rnd
    else:
        assert all("offset" in e for e in data)
        cs = info["cluster-size"]
        # allocated clusters: exactly the non-zero guest clusters
        raw = tmp_path / "dst.raw"
        qemu.convert_raw(source, raw)
        buf = raw.read_bytes()
        expected = sum(min(cs, len(buf) - o) for o in range(0, len(buf), cs) if any(buf[o : o + cs]))
        assert _allocated(dst) == expected


def test_convert_compressed_refcounts_shared_clusters(tmp_path: Path) -> None:
    """Many small compressed clusters share host clusters; refcounts count each one."""
    src = create(tmp_path / "s.qcow2", 8 * MiB)
    qemu_io(src, *(f"write -P {i + 1:#x} {i * 64 * KiB} 64k" for i in range(100)))
    dst = tmp_path / "d.qcow2"
    assert cli(["convert", "-O", "qcow2", "-c", str(src), str(dst)]) == 0
    result, rc = check_json(dst)
    assert rc == 0 and result["compressed-clusters"] == 100, result
    assert os.path.getsize(dst) < 1 * MiB  # packed: far fewer host clusters than 100
    assert compare(src, dst) == 0
    # and our writer keeps them right when they are overwritten afterwards
    with pyqcow.open(dst, "r+") as img:
        img.write(5 * 64 * KiB + 100, b"x" * 5000)
        img.write_zeroes(10 * 64 * KiB, 64 * KiB)
        img.discard(20 * 64 * KiB, 128 * KiB)
    result, rc = check_json(dst)
    assert rc == 0, result
    with pyqcow.open(dst) as img:
        assert img.read(5 * 64 * KiB + 100, 5000) == b"x" * 5000
        assert img.read(5 * 64 * KiB, 100) == b"\x06" * 100
        assert img.read(10 * 64 * KiB, 64 * KiB) == bytes(64 * KiB)
        assert img.read(30 * 64 * KiB, 64 * KiB) == bytes([31]) * 64 * KiB


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_convert_with_backing_writes_only_differences(
    source: Path, tmp_path: Path, compat: str
) -> None:
    base = tmp_path / "srcbase.qcow2"
    dst = tmp_path / "dst.qcow2"
    argv = ["convert", "-O", "qcow2", "-o", f"compat={compat}", "-B", str(base), "-F", "qcow2"]
    assert cli([*argv, str(source), str(dst)]) == 0
    assert compare(source, dst) == 0
    assert check_json(dst)[1] == 0
    info = info_json(dst)
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"
    top = [e for e in map_json(dst) if e["depth"] == 0]
    covered = sum(e["length"] for e in top)
    # the base's untouched 0..512k and 8M+64k.. are not copied
    assert not any(e["start"] < 512 * KiB for e in top), top
    assert covered < 4 * MiB, top
    # the zero cluster over base data became zeros in dst (zero flag on v3)
    z = [e for e in top if e["start"] <= 8 * MiB < e["start"] + e["length"]]
    assert z, top
    if compat == "1.1":
        assert z[0]["zero"] and not z[0]["data"]


def test_convert_refuses_options_for_raw_and_same_file(source: Path, tmp_path: Path, capsys) -> None:
    assert cli(["convert", "-O", "raw", "-c", str(source), str(tmp_path / "x.raw")]) == 1
    assert "-c needs -O qcow2" in capsys.readouterr().err
    before = _sha(source)
    assert cli(["convert", "-O", "qcow2", "-U", str(source), str(source)]) == 1
    assert "destination is the source" in capsys.readouterr().err
    assert _sha(source) == before
    other = tmp_path / "other.qcow2"
    shutil.copy(source, other)
    before = _sha(other)
    assert cli(["convert", "-O", "qcow2", "-B", "other.qcow2", str(source), str(other)]) == 1
    assert "is the destination itself" in capsys.readouterr().err
    assert _sha(other) == before


# --- refcount table relocation ------------------------------------------------------------


def _reftable(p: Path) -> tuple[int, int]:
    h = qemu.header_bytes(p, 48, 12)
    return int.from_bytes(h[:8], "big"), int.from_bytes(h[8:], "big")


@pytest.mark.parametrize("refcount_bits", [64, 16])
def test_refcount_table_relocation_512(tmp_path: Path, refcount_bits: int) -> None:
    """512-byte clusters: the one-cluster refcount table covers 64 (or 256) blocks;
    writing past that moves the table (copy-then-switch), maybe several times."""
    p = create(tmp_path / "r.qcow2", 64 * MiB, "cluster_size=512", f"refcount_bits={refcount_bits}")
    before = _reftable(p)
    model = bytearray(64 * MiB)
    r = random.Random(refcount_bits)
    total = 12 * MiB if refcount_bits == 64 else 24 * MiB
    img = pyqcow.open(p, "r+")
    written = 0
    while written < total:
        if r.random() < 0.3:  # small scattered writes: L2 tables all over
            off, n = r.randrange(64 * MiB - 3000), r.randint(1, 3000)
        else:
            off, n = r.randrange(0, 60 * MiB, 512), 256 * KiB
        data = r.randbytes(n)
        img.write(off, data)
        model[off : off + n] = data
        written += n
        if r.random() < 0.05:
            img.close()
            img = pyqcow.open(p, "r+")
    img.close()
    after = _reftable(p)
    assert after[0] != before[0], "refcount table did not move"
    assert after[1] > before[1]
    result, rc = check_json(p)
    assert rc == 0, result
    raw = qemu.convert_raw(p, tmp_path / "r.raw")
    assert raw.read_bytes() == bytes(model)


# --- bad input on read-write open ------------------------------------------------------------


def _poke(p: Path, offset: int, value: int, size: int) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(size, "big"))


def _luks(p: Path) -> Path:
    return qemu.create_luks(p)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("unknown_incompat", pyqcow.UnsupportedFeatureError, "incompatible"),
        ("corrupt", pyqcow.CorruptImageError, "corrupt"),
        ("aes", pyqcow.UnsupportedFeatureError, "(?i)encrypt|AES"),
        ("luks", pyqcow.UnsupportedFeatureError, "(?i)encrypt|LUKS"),
    ],
)
def test_bad_image_refused_read_write_untouched(tmp_path: Path, case: str, error, match: str) -> None:
    p = tmp_path / f"{case}.qcow2"
    if case == "luks":
        _luks(p)
    else:
        create(p, 1 * MiB)
        qemu_io(p, "write -P 0x5 0 64k")
        if case == "unknown_incompat":
            _poke(p, 72, 1 << 7, 8)
        elif case == "corrupt":
            _poke(p, 72, 1 << 1, 8)
        else:
            _poke(p, 32, 1, 4)
    before = _sha(p)
    mtime = os.stat(p).st_mtime_ns
    with pytest.raises(error, match=match) as exc:
        pyqcow.open(p, "r+")
    assert str(p) in str(exc.value)
    assert _sha(p) == before and os.stat(p).st_mtime_ns == mtime


def test_write_beyond_virtual_size(tmp_path: Path) -> None:
    p = create(tmp_path / "s.qcow2", 1 * MiB + 512)
    before = _sha(p)
    with pyqcow.open(p, "r+") as img:
        for call in (
            lambda: img.write(1 * MiB, b"x" * 1024),
            lambda: img.write(-1, b"x"),
            lambda: img.write_zeroes(1 * MiB + 1, 512),
            lambda: img.discard(2 * MiB, 512),
        ):
            with pytest.raises(pyqcow.OperationError, match="outside the disk") as exc:
                call()
            assert str(p) in str(exc.value)
    assert _sha(p) == before
    with pyqcow.open(p) as img, pytest.raises(pyqcow.OperationError, match="read-only"):
        img.write(0, b"x")


# --- ENOSPC / EIO during a write ----------------------------------------------------------------


def _failing(monkeypatch, method: str, after: int, err: int) -> list[int]:
    calls = [0]
    orig = getattr(HostFile, method)

    def fail(self, *a, **k):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(err, os.strerror(err))
        return orig(self, *a, **k)

    monkeypatch.setattr(HostFile, method, fail)
    return calls


def _fault_base(d: Path, kind: str) -> Path:
    if kind == "snap":
        p = create(d / "f.qcow2", 4 * MiB)
        qemu_io(p, "write -P 0x61 0 1M", "write -c -P 0x62 2M 128k")
        qemu.snapshot_create(p, "s1")
    elif kind == "c512":
        p = create(d / "f.qcow2", 4 * MiB, "cluster_size=512", "refcount_bits=64")
        qemu_io(p, "write -P 0x61 0 1M")
    else:
        b = create(d / "fb.qcow2", 4 * MiB)
        qemu_io(b, "write -P 0x71 0 4M")
        p = create(d / "f.qcow2", None, backing=b, backing_fmt="qcow2")
        qemu_io(p, "write -P 0x61 64k 64k")
    return p


def _ops(img) -> None:
    r = random.Random(1)
    img.write(30 * KiB + 7, r.randbytes(300 * KiB))  # COW edges, many clusters
    img.write(2 * MiB + 1000, r.randbytes(100 * KiB))  # over compressed / backing data
    img.write_zeroes(1 * MiB, 256 * KiB)
    img.discard(3 * MiB, 256 * KiB)
    img.write(3 * MiB + 300 * KiB, r.randbytes(600 * KiB))
    img.flush()


@pytest.mark.parametrize(
    "method, err, kind",
    [(m, e, k) for m, e in [("pwrite", errno.ENOSPC), ("pwrite", errno.EIO), ("fsync", errno.EIO)]
     for k in ("snap", "c512", "backing")]
    # only the snapshot image's writes grow the file through truncate
    + [("truncate", errno.ENOSPC, "snap")],
)
def test_io_error_during_write_leaves_old_or_new(tmp_path: Path, monkeypatch, kind, method, err):
    """Fail the Nth host write/fsync/truncate: the error reaches the caller with its
    errno, and the image (reopened) reads old or new data, leaks at worst."""
    d0 = tmp_path / "orig"
    d0.mkdir()
    orig = _fault_base(d0, kind)
    old = qemu.convert_raw(orig, tmp_path / "old.raw").read_bytes()
    # the new content: run the operations on a copy without faults
    shutil.copytree(d0, tmp_path / "ok")
    ok = tmp_path / "ok" / orig.name
    with pyqcow.open(ok, "r+") as img:
        _ops(img)
    new = qemu.convert_raw(ok, tmp_path / "new.raw").read_bytes()
    shutil.copytree(d0, tmp_path / "count")
    with monkeypatch.context() as m:
        total = _failing(m, method, 10**9, err)
        with pyqcow.open(tmp_path / "count" / orig.name, "r+") as img:
            total[0] = 0
            _ops(img)
            n_calls = total[0]
    assert n_calls, f"these operations make no {method} call"
    for after in sorted({a for a in (0, 1, 2, 3, n_calls // 3, n_calls // 2, n_calls - 1) if a < n_calls}):
        d = tmp_path / f"run{after}"
        shutil.copytree(d0, d)
        p = d / orig.name
        img = pyqcow.open(p, "r+")
        with monkeypatch.context() as m:
            _failing(m, method, after, err)
            with pytest.raises(OSError) as exc:
                _ops(img)
            assert exc.value.errno == err
            try:
                img.close()
            except OSError:
                img.hf.close()
        result, rc = check_json(p)
        assert rc in (0, 3), (after, result)
        assert not result.get("corruptions"), (after, result)
        got = qemu.convert_raw(p, d / "got.raw").read_bytes()
        bad = [i for i in range(0, len(got), 512)
               if got[i : i + 512] not in (old[i : i + 512], new[i : i + 512])]
        assert not bad, f"fault after {after} {method} calls: sector {bad[0]} neither old nor new"
        with pyqcow.open(p, "r+") as img:  # still opens read-write and takes writes
            img.write(0, b"again")
        assert check_json(p)[1] in (0, 3)
        if kind == "snap":
            s1 = qemu.convert_raw(p, d / "s1.raw", "s1").read_bytes()
            assert s1 == qemu.convert_raw(orig, d / "s1o.raw", "s1").read_bytes()
        shutil.rmtree(d)


# --- persistent bitmaps -------------------------------------------------------------------------


def test_write_keeps_bitmaps_valid_and_check_stays_clean(tmp_path: Path) -> None:
    """pyqcow keeps dirty bitmaps valid (issue 11 item 4; it used to flag every one
    in use on the first write): after a write and a clean close they are not in
    use, and qemu-img check stays clean.  Their bits: tests/interop/test_bitmaps.py."""
    p = create(tmp_path / "bm.qcow2", 4 * MiB)
    qemu_io(p, "write -P 0x1 0 64k")
    qemu.bitmap_add(p, "b0")
    qemu.bitmap_add(p, "b1", granularity=128 * KiB)
    with pyqcow.open(p) as img:  # read-only: nothing changes
        pass
    flags = {b["name"]: b["flags"] for b in info_json(p)["format-specific"]["data"]["bitmaps"]}
    assert flags == {"b0": ["auto"], "b1": ["auto"]}
    with pyqcow.open(p, "r+") as img:
        img.write(1 * MiB, b"y" * 5000)
    info = info_json(p)
    flags = {b["name"]: b["flags"] for b in info["format-specific"]["data"]["bitmaps"]}
    assert flags == {"b0": ["auto"], "b1": ["auto"]}
    result, rc = check_json(p)
    assert rc == 0, result
    # qemu can still use the image and drop the bitmaps
    qemu_io(p, "write -P 0x2 2M 4k")
    qemu_img("bitmap", "--remove", p, "b0")
    qemu_img("bitmap", "--remove", p, "b1")
    result, rc = check_json(p)
    assert rc == 0, result
    assert "bitmaps" not in info_json(p)["format-specific"]["data"]
