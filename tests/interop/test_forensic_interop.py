"""Forensic reading against qemu: reader(), snapshot views, hash, dump, orphans.

Oracles: ``qemu-img convert -O raw`` (``-l SNAPSHOT`` for snapshots) for guest
content, ``qemu-img info`` for metadata, ``qemu-img check`` for leaks, and
qemu-io for data written and then left behind in the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
import qemu
from interop.shapes import SHAPES, Shape

import pyqcow
from pyqcow import fastcopy, forensic
from pyqcow.chain import open_image
from pyqcow.cli.main import main
from pyqcow.errors import BackingChainError, ImageLockedError

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    qemu.require_tool("qemu-img")
    qemu.require_tool("qemu-io")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory):
    """Shapes built on first use, once per module (and xdist worker)."""
    root = tmp_path_factory.mktemp("forensic-shapes")
    cache: dict[str, Shape] = {}

    def get(name: str) -> Shape:
        if name not in cache:
            cache[name] = SHAPES[name](root)
        return cache[name]

    return get


def _file_state(paths) -> list[tuple]:
    out = []
    for p in paths:
        st = os.stat(p)
        h = hashlib.sha256(Path(p).read_bytes()).hexdigest() if st.st_size < 64 * MiB else None
        out.append((str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, h))
    return out


def _snapshot_names(path: Path) -> list[str]:
    info = qemu.info_json(path)
    return [s["name"] for s in info.get("snapshots", [])]


def _probe(reader, want: bytes, rng: random.Random, count: int = 300) -> None:
    buf = bytearray(256 * KiB)
    mv = memoryview(buf)
    size = len(want)
    for _ in range(count):
        whence = rng.choice((os.SEEK_SET, os.SEEK_CUR, os.SEEK_END))
        target = rng.randrange(size)
        if whence == os.SEEK_SET:
            reader.seek(target)
        elif whence == os.SEEK_CUR:
            reader.seek(target - reader.tell(), os.SEEK_CUR)
        else:
            reader.seek(target - size, os.SEEK_END)
        assert reader.tell() == target
        n = rng.choice((1, 512, 4096, 65536 + 3, rng.randrange(1, len(buf))))
        got = reader.readinto(mv[:n])
        assert got == min(n, size - target)
        assert mv[:got] == want[target : target + got], f"probe at {target} length {n}"
        assert reader.tell() == target + got


# -- reader() and snapshot views vs qemu-img convert --------------------------------
@pytest.mark.parametrize("backend", ["native", "python"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_reader_equals_qemu_convert(name: str, backend: str, shapes, tmp_path: Path) -> None:
    """Both read paths: the mmap-backed C helper and the pure-Python one."""
    if backend == "native" and not fastcopy.native_available():
        message = f"pyqcow._native is not built: {fastcopy.native_import_error()}"
        qemu.need(False, message)
    shape = shapes(name)
    before = _file_state(shape.files)
    rng = random.Random(name)
    with fastcopy.backend(backend), pyqcow.open(shape.path) as img:
        mappable = not (img.extended_l2 or img.has_data_file)
        assert (img.reader()._gmap is not None) == (backend == "native" and mappable)
        if "huge" in shape.tags:
            r = img.reader()
            for off, length, byte in shape.expect:
                r.seek(off)
                assert r.read(length) == bytes([byte]) * length
            # windows around the writes, against qemu-img dd
            for off, _, _ in shape.expect:
                start = max(0, off - 512 * KiB) // (64 * KiB)
                out = tmp_path / f"win-{start}.raw"
                qemu.qemu_img("dd", "-f", "qcow2", "-O", "raw", f"bs={64 * KiB}",
                              f"skip={start}", "count=16", f"if={shape.path}", f"of={out}")
                want = out.read_bytes()
                r.seek(start * 64 * KiB)
                assert r.read(len(want)) == want
        else:
            want = qemu.convert_raw(shape.path, tmp_path / "full.raw").read_bytes()
            r = img.reader()
            assert r.size == len(want)
            assert r.read() == want
            _probe(r, want, rng)
        for snap in _snapshot_names(shape.path):
            want = qemu.convert_raw(shape.path, tmp_path / f"{snap}.raw", snap).read_bytes()
            view = img.snapshot(snap)
            want = want[: view.virtual_size]
            vr = view.reader()
            assert vr.read() == want
            _probe(vr, want, rng)
    assert _file_state(shape.files) == before, "reading changed a file (bytes, size or times)"


def test_reading_never_changes_the_files(shapes) -> None:
    """Open, read, map, dump, orphans, hash and close: bytes, size, mtime, ctime unchanged."""
    for name in ("snapshots", "lazy_dirty", "chain_qcow2", "bitmap", "compressed_zstd"):
        shape = shapes(name)
        before = _file_state(shape.files)
        time.sleep(0.01)
        with pyqcow.open(shape.path) as img:
            img.reader().read()
            for s in (img.snapshots if img.format == "qcow2" else []):
                img.snapshot(s.id_str).reader().read()
        with open_image(shape.path, backing=False) as img:
            json.dumps(forensic.dump(img, tables=True))
            forensic.find_orphans(img)
        with pyqcow.open(shape.path) as img:
            forensic.hash_image(img)
        assert _file_state(shape.files) == before, name


def _locks_on(path: Path) -> list[str]:
    ino = os.stat(path).st_ino
    out = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            # "1: OFDLCK ADVISORY READ -1 fd:01:1234 100 100"
            dev_ino = [x for x in fields if x.count(":") == 2]
            if dev_ino and int(dev_ino[0].split(":")[2]) == ino:
                out.append(line.strip())
    return out


def test_read_only_open_takes_only_shared_read_locks(shapes) -> None:
    shape = shapes("default")
    with pyqcow.open(shape.path) as img:
        img.reader().read(64 * KiB)
        locks = _locks_on(shape.path)
        assert locks, "no image locks held"
        assert all(" READ " in line for line in locks), locks
        # other readers are welcome: qemu-img info (no -U) and another pyqcow reader
        qemu.info_json(shape.path)
        with pyqcow.open(shape.path) as other:
            assert other.read(0, 4) == img.read(0, 4)
        # a writer is not
        with pytest.raises(qemu.QemuError, match="lock"):
            qemu.qemu_io(shape.path, "read 0 512")
    assert not _locks_on(shape.path)


# -- force_share and backing_root ---------------------------------------------------
def test_force_share_reads_an_image_qemu_holds_open(shapes, tmp_path: Path) -> None:
    shape = shapes("default")
    want = qemu.convert_raw(shape.path, tmp_path / "want.raw").read_bytes()
    proc = subprocess.Popen(
        [qemu.require_tool("qemu-io"), "-f", "qcow2", str(shape.path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # wait until qemu-io holds its write lock
            try:
                pyqcow.open(shape.path).close()
            except ImageLockedError:
                break
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "qemu-io never locked the image"
            time.sleep(0.05)
        with pytest.raises(ImageLockedError, match="in use"):
            pyqcow.open(shape.path)
        assert main(["hash", str(shape.path)]) == 1
        with pyqcow.open(shape.path, force_share=True) as img:
            assert img.reader().read() == want
        assert main(["hash", "-U", str(shape.path)]) == 0
        assert proc.poll() is None, "qemu-io exited early"
    finally:
        proc.communicate("quit\n", timeout=30)


def test_backing_root_refuses_files_outside(tmp_path: Path, capsys) -> None:
    outside = tmp_path / "outside"
    root = tmp_path / "evidence"
    outside.mkdir()
    root.mkdir()
    base = qemu.create(outside / "base.qcow2", 1 * MiB)
    qemu.qemu_io(base, "write -P 0x42 0 64k")
    top = qemu.create(root / "top.qcow2", None, backing=base, backing_fmt="qcow2")
    with pytest.raises(BackingChainError, match="outside the allowed directory"):
        pyqcow.open(top, backing_root=root)
    # a relative name that climbs out, and a symlink inside the root that points out
    rel = qemu.create(root / "rel.qcow2", None, backing="../outside/base.qcow2",
                      backing_fmt="qcow2")
    with pytest.raises(BackingChainError, match="outside the allowed directory"):
        pyqcow.open(rel, backing_root=root)
    (root / "link.qcow2").symlink_to(base)
    linked = qemu.create(root / "linked.qcow2", None, backing="link.qcow2", backing_fmt="qcow2")
    with pytest.raises(BackingChainError, match="outside the allowed directory"):
        pyqcow.open(linked, backing_root=root)
    assert main(["hash", "--backing-root", str(root), str(top)]) == 1
    assert "outside the allowed directory" in capsys.readouterr().err
    # allowed when the root covers both
    with pyqcow.open(top, backing_root=tmp_path) as img:
        assert img.read(0, 2) == b"\x42\x42"


# -- hash --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["default", "compressed_zstd", "chain_3deep_relative",
                                  "extended_l2_overlay", "snapshots", "data_file"])
def test_hash_equals_sha256_of_qemu_convert(name: str, shapes, tmp_path: Path, capsys) -> None:
    shape = shapes(name)
    want = hashlib.sha256(qemu.convert_raw(shape.path, tmp_path / "a.raw").read_bytes())
    assert main(["hash", str(shape.path)]) == 0
    assert capsys.readouterr().out == f"{want.hexdigest()}  {shape.path}\n"
    for snap in _snapshot_names(shape.path):
        raw = qemu.convert_raw(shape.path, tmp_path / f"{snap}.raw", snap).read_bytes()
        assert main(["hash", f"{shape.path}@{snap}"]) == 0
        assert capsys.readouterr().out.split()[0] == hashlib.sha256(raw).hexdigest()


def test_hash_algorithms_and_at_sign_rule(shapes, tmp_path: Path, capsys) -> None:
    shape = shapes("snapshots")
    raw = qemu.convert_raw(shape.path, tmp_path / "a.raw").read_bytes()
    for algo in ("md5", "sha1", "blake2b", "sha3_256"):
        assert main(["hash", "--algorithm", algo, str(shape.path)]) == 0
        assert capsys.readouterr().out.split()[0] == hashlib.new(algo, raw).hexdigest()
    assert main(["hash", "--algorithm", "nope", str(shape.path)]) == 1
    assert "unknown hash algorithm" in capsys.readouterr().err
    # a file whose name contains '@' is hashed as a file, not split
    odd = tmp_path / "disk@s1"
    odd.write_bytes(shape.path.read_bytes())
    assert main(["hash", str(odd)]) == 0
    assert capsys.readouterr().out.split()[0] == hashlib.sha256(raw).hexdigest()
    assert main(["hash", f"{shape.path}@missing"]) == 1
    assert "no internal snapshot" in capsys.readouterr().err


# -- orphans -----------------------------------------------------------------------
def _orphans_json(path: Path, capsys, *extra: str) -> dict:
    assert main(["orphans", "--output", "json", *extra, str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def test_orphans_after_snapshot_delete(tmp_path: Path, capsys) -> None:
    """Overwrite a snapshotted cluster, delete the snapshot: the old data stays in the file
    when qemu does not pass the discard down (pass-discard-snapshot=off)."""
    p = qemu.create(tmp_path / "evidence.qcow2", 4 * MiB)
    secret = b"TOP SECRET: the plans are in the old mill.\n" * 1000
    src = tmp_path / "secret.txt"
    src.write_bytes(secret[: 64 * KiB].ljust(64 * KiB, b"\n"))
    qemu.qemu_io(p, "write -P 0x11 0 64k", f"write -s {src} 1M 64k", "write -P 0x5a 2M 64k")
    qemu.snapshot_create(p, "before")
    qemu.qemu_io(p, "write -P 0x66 1M 64k", "write -P 0x67 2M 64k")
    qemu.qemu_img("snapshot", "-d", "before", "--image-opts",
                  f"driver=qcow2,pass-discard-snapshot=off,file.filename={p}")
    report, rc = qemu.check_json(p)
    assert rc == 0 and report.get("leaks", 0) == 0
    out = tmp_path / "extracted"
    data = _orphans_json(p, capsys, "--extract", str(out))
    hints = {o["hint"] for o in data["orphans"]}
    assert {"text", "fill pattern"} <= hints, data
    files = {f.name: f.read_bytes() for f in out.iterdir()}
    assert src.read_bytes() in files.values()
    assert b"\x5a" * 64 * KiB in files.values()
    for o in data["orphans"]:
        assert o["file"] == f"orphan-0x{o['host_offset']:012x}.bin"
        with open(p, "rb") as f:
            f.seek(o["host_offset"])
            assert files[o["file"]] == f.read(o["length"])
    assert data["leaks"] == []
    assert main(["orphans", str(p)]) == 0
    human = capsys.readouterr().out
    assert "fill pattern (byte 0x5a" in human and "text" in human


def test_orphans_after_discard(tmp_path: Path, capsys) -> None:
    """qemu-io discard with pass-discard-request=off frees the cluster but leaves its bytes."""
    p = qemu.create(tmp_path / "d.qcow2", 4 * MiB, "compression_type=zstd")
    qemu.qemu_io(p, "write -P 0x11 0 64k", "write -P 0x77 1M 128k", "write -c -P 0x78 2M 64k")
    qemu.qemu_io(p, "discard 1M 128k", "discard 2M 64k")
    data = _orphans_json(p, capsys)
    # by default qemu punches holes where it frees clusters: nothing is left to find
    assert not [o for o in data["orphans"] if "0x77" in (o.get("detail") or "")]
    q = qemu.create(tmp_path / "k.qcow2", 4 * MiB, "compression_type=zstd")
    qemu.qemu_io(q, "write -P 0x11 0 64k", "write -P 0x77 1M 128k", "write -c -P 0x78 2M 64k")
    qemu.qemu_io(f"driver=qcow2,pass-discard-request=off,file.filename={q}",
                 "discard 1M 128k", "discard 2M 64k", fmt=None, extra=["--image-opts"])
    data = _orphans_json(q, capsys, "--extract", str(tmp_path / "x"))
    by_hint = {o["hint"]: o for o in data["orphans"]}
    assert by_hint["fill pattern"]["length"] == 128 * KiB
    assert by_hint["fill pattern"]["detail"] == f"byte 0x77 x {128 * KiB}"
    # the compressed cluster's host cluster: the file's last, ending right after the frame
    zstd_region = by_hint["zstd frame"]
    assert zstd_region["host_offset"] + zstd_region["length"] == data["file_size"]
    blob = (tmp_path / "x" / by_hint["fill pattern"]["file"]).read_bytes()
    assert blob == b"\x77" * 128 * KiB
    import zstandard

    z = (tmp_path / "x" / by_hint["zstd frame"]["file"]).read_bytes()
    assert zstandard.ZstdDecompressor().decompressobj().decompress(z)[:64 * KiB] == b"\x78" * 64 * KiB


def test_leaks_match_qemu_check(tmp_path: Path, capsys) -> None:
    """Drop an L2 entry by hand (a crash after the refcount update): one leaked cluster."""
    p = qemu.create(tmp_path / "leak.qcow2", 4 * MiB)
    qemu.qemu_io(p, "write -P 0x11 0 64k", "write -P 0x3c 1M 64k")
    extents = qemu.map_json(p)
    host = next(e["offset"] for e in extents if e["start"] == 1 * MiB)
    with pyqcow.open(p) as img:
        l2_offset = img.l1[0] & 0x00FFFFFFFFFFFE00
        slot = l2_offset + 8 * (1 * MiB // img.cluster_size)
    with open(p, "r+b") as f:
        f.seek(slot)
        assert int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00 == host
        f.seek(slot)
        f.write(bytes(8))
    report, rc = qemu.check_json(p)
    assert rc == 3 and report["leaks"] == 1
    data = _orphans_json(p, capsys, "--extract", str(tmp_path / "x"))
    assert data["leaked_clusters"] == report["leaks"]
    assert [(lk["host_offset"], lk["length"], lk["refcount"]) for lk in data["leaks"]] == [
        (host, 64 * KiB, 1)
    ]
    assert (tmp_path / "x" / f"leak-0x{host:012x}.bin").read_bytes() == b"\x3c" * 64 * KiB


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_orphans_and_dump_agree_with_qemu_check(name: str, shapes, capsys) -> None:
    shape = shapes(name)
    images = [f for f in shape.files if f.suffix == ".qcow2"]
    for path in images:
        report, _ = qemu.check_json(path)
        data = _orphans_json(path, capsys)
        if "dirty" not in shape.tags:
            assert data["leaked_clusters"] == report.get("leaks", 0)
        with open_image(path, backing=False) as img:
            dump = forensic.dump(img, tables=True)
        json.dumps(dump)
        _check_dump(path, dump, dirty="dirty" in shape.tags)


def _check_dump(path: Path, dump: dict, dirty: bool) -> None:
    info = qemu.info_json(path)
    h = dump["header"]
    assert h["size"] == info["virtual-size"]
    assert h["cluster_size"] == info["cluster-size"]
    specific = info["format-specific"]["data"]
    assert h["refcount_bits"] == specific["refcount-bits"]
    if h["version"] >= 3:
        assert specific["compat"] == "1.1"
        assert any(b["name"] == "lazy refcounts" for b in h["compatible_features"]["bits"]) == \
            specific["lazy-refcounts"]
        assert h["compression_type"] == specific["compression-type"]
        assert (dump["header"]["incompatible_features"]["value"] & 16 != 0) == \
            specific.get("extended-l2", False)
    assert [s["name"] for s in dump["snapshots"]] == [s["name"] for s in info.get("snapshots", [])]
    assert dump["backing_file"] == info.get("backing-filename")
    bitmaps = [b["name"] for b in specific.get("bitmaps", [])]
    got = [b["name"] for b in (dump["bitmap_directory"] or {}).get("bitmaps", [])]
    assert got == bitmaps
    # the host cluster map covers the whole file, in order
    pos = 0
    for r in dump["host_clusters"]:
        assert r["host_offset"] == pos
        pos += r["length"]
        if not dirty and r["references"]:
            assert r["refcount"] == len(r["references"]), r
    assert pos == dump["file_size"]
    assert dump["errors"] == []
    # every L2 table the L1s name is dumped
    l2s = {
        e["l2_offset"] + k * e.get("step", 0)
        for e in dump["l1_table"]["entries"]
        if e["l2_offset"]
        for k in range(e["count"])
    }
    assert l2s <= {t["offset"] for t in dump["l2_tables"]}


def test_dump_cli(shapes, capsys) -> None:
    shape = shapes("bitmap")
    assert main(["dump", str(shape.path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "l2_tables" not in data and "refcount_blocks" not in data
    assert data["bitmap_directory"]["valid"] is True
    names = {e["name"] for e in data["header_extensions"]}
    assert {"feature_table", "bitmaps"} <= names
    assert main(["dump", "--tables", str(shape.path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["l2_tables"] and data["refcount_blocks"]
    kinds = {ref["kind"] for r in data["host_clusters"] for ref in r["references"]}
    assert {"header", "refcount_table", "refcount_block", "l1_table", "l2_table", "data",
            "bitmap_directory", "bitmap_table"} <= kinds
    raw = shapes("chain_raw_base").files[1]
    assert main(["dump", str(raw)]) == 1
    assert "not a qcow2 image" in capsys.readouterr().err


def test_backing_root_refuses_outside_data_file(tmp_path: Path) -> None:
    """An external data file outside backing_root is refused like a backing file."""
    inside = tmp_path / "evidence"
    inside.mkdir()
    outside = tmp_path / "elsewhere.raw"
    img = inside / "disk.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={outside}", str(img), "1M")
    with pytest.raises(pyqcow.BackingChainError, match="outside the allowed directory"):
        pyqcow.open(img, backing_root=inside)
    with pyqcow.open(img, backing_root=tmp_path) as ok:
        assert ok.read(0, 512) == bytes(512)
