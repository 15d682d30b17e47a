"""Issue 11, the create/convert/orphans/raw items: nothing is truncated or written
before every check passed and QEMU's lock is held; failures name the file and remove
only what the command itself created; no hidden loops, no unbounded decompression.

Images are made with pyqcow's own API (no qemu needed here); the qemu-nbd and
qemu-img differential checks live in tests/interop/test_workflow_create_interop.py.
"""

from __future__ import annotations

import errno
import os
import stat
import tracemalloc
from pathlib import Path

import pytest

import pyqcow
from pyqcow.cli.main import main
from pyqcow.errors import (
    CorruptImageError,
    ImageLockedError,
    OperationError,
    QcowError,
)
from pyqcow.newimage import create

KiB = 1024
MiB = 1024 * KiB
CS = 64 * KiB


# -- helpers -------------------------------------------------------------------------------
def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *needles: str) -> None:
    assert status == 1, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pyqcow: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    for needle in needles:
        assert needle in lines[0], err


def write(path: Path, offset: int, data: bytes) -> None:
    with pyqcow.open(path, "r+") as img:
        img.write(offset, data)
        img.flush()


def read(path: Path, offset: int = 0, length: int | None = None) -> bytes:
    with pyqcow.open(path) as img:
        return img.read(offset, img.virtual_size - offset if length is None else length)


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    """base.qcow2 (data) <- top.qcow2 (data)."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    create(base, 4 * MiB)
    write(base, 0, b"\xb0" * (256 * KiB))
    create(top, backing="base.qcow2", backing_format="qcow2")
    write(top, MiB, b"\x70" * (64 * KiB))
    return base, top


# -- item 1: locks before truncation --------------------------------------------------------
def test_create_over_locked_image_leaves_it_untouched(chain, capsys):
    base, top = chain
    before = top.read_bytes()
    with pyqcow.open(top, "r+"):  # another open file description holds QEMU's write lock
        with pytest.raises(ImageLockedError, match="in use"):
            create(top, 1 * MiB)
        assert top.read_bytes() == before
        for argv in (["create", top, "1M"], ["create", "--force", top, "1M"]):
            status, _, err = run(capsys, *argv)
            assert_one_line_error(status, err, str(top), "in use")
            assert top.read_bytes() == before


def test_create_over_read_locked_image_leaves_it_untouched(chain):
    _, top = chain
    before = top.read_bytes()
    with pyqcow.open(top, "r"):  # a reader refuses to share "write"
        with pytest.raises(ImageLockedError):
            create(top, 1 * MiB)
    assert top.read_bytes() == before


def test_create_holds_the_lock_until_the_image_is_complete(tmp_path, monkeypatch):
    """While create writes the new image, another opener is refused."""
    import pyqcow.image as image_mod

    p = tmp_path / "new.qcow2"
    seen = []
    real_resize = image_mod.QcowImage.resize

    def resize(self, size):
        with pytest.raises(ImageLockedError):
            pyqcow.open(p, "r")
        seen.append(size)
        return real_resize(self, size)

    monkeypatch.setattr(image_mod.QcowImage, "resize", resize)
    create(p, 2 * MiB)
    assert seen == [2 * MiB]
    with pyqcow.open(p) as img:  # and released afterwards
        assert img.virtual_size == 2 * MiB


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_destination_locked_is_untouched(chain, tmp_path, capsys, fmt):
    base, _ = chain
    dst = tmp_path / "dst.qcow2"
    create(dst, 1 * MiB)
    write(dst, 0, b"\x42" * 4096)
    before = dst.read_bytes()
    with pyqcow.open(dst, "r+"):
        status, _, err = run(capsys, "convert", "-O", fmt, base, dst)
        assert_one_line_error(status, err, str(dst), "in use")
        assert dst.read_bytes() == before
    assert dst.exists()


def test_convert_holds_destination_lock_while_writing(chain, tmp_path, monkeypatch):
    """The destination's lock is taken before the truncation and kept through the copy."""
    from pyqcow.ops import convert as convert_mod

    base, _ = chain
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"\x99" * 8192)
    events = []
    real_ftruncate = os.ftruncate

    def ftruncate(fd, size):
        with pytest.raises(ImageLockedError):
            pyqcow.open(dst, "r", format="raw")
        events.append(size)
        return real_ftruncate(fd, size)

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    with pyqcow.open(base) as src:
        convert_mod.convert_to_raw(src, dst)
    assert events
    monkeypatch.undo()
    assert read(base) == dst.read_bytes()


def _image_with_orphan(path: Path) -> Path:
    create(path, 1 * MiB)
    with open(path, "ab") as f:  # an unreferenced cluster of data after the metadata
        f.write(b"\x5a" * CS)
    return path


def test_orphans_extract_does_not_follow_planted_symlink(tmp_path, capsys):
    img = _image_with_orphan(tmp_path / "e.qcow2")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    status, listing, _ = run(capsys, "orphans", "--output", "json", img)
    assert status == 0
    import json

    name = json.loads(listing)["orphans"][0]
    planted = out / f"orphan-0x{name['host_offset']:012x}.bin"
    planted.symlink_to(victim)
    status, _, err = run(capsys, "orphans", "--extract", out, img)
    assert_one_line_error(status, err, str(planted), "symbolic link")
    assert victim.read_bytes() == b"precious\n"
    assert planted.is_symlink()


def test_orphans_extract_writes_regular_files(tmp_path, capsys):
    img = _image_with_orphan(tmp_path / "e.qcow2")
    out = tmp_path / "out"
    assert run(capsys, "orphans", "--extract", out, img)[0] == 0
    files = list(out.iterdir())
    assert [f.read_bytes() for f in files] == [b"\x5a" * CS]
    # a second run overwrites its own (regular) files
    assert run(capsys, "orphans", "--extract", out, img)[0] == 0
    assert [f.read_bytes() for f in out.iterdir()] == [b"\x5a" * CS]


# -- item 2: never create over the chain being backed onto, nor over data ----------------
def test_create_over_own_backing_chain_refused(chain, capsys):
    base, top = chain
    before_base, before_top = base.read_bytes(), top.read_bytes()
    # top is backed by base: creating base over top's chain would wipe base and loop
    status, _, err = run(capsys, "create", "-b", "top.qcow2", "-F", "qcow2", base)
    assert_one_line_error(status, err, str(base), "backing chain")
    with pytest.raises(OperationError, match="backing chain"):
        create(base, backing="top.qcow2", backing_format="qcow2", force=True)
    assert base.read_bytes() == before_base and top.read_bytes() == before_top


def test_create_over_chain_member_through_symlink_refused(chain, tmp_path):
    base, top = chain
    link = tmp_path / "alias.qcow2"
    link.symlink_to(base)
    before = base.read_bytes()
    with pytest.raises(OperationError, match="backing chain"):
        create(link, backing="top.qcow2", backing_format="qcow2")
    assert base.read_bytes() == before


def test_create_over_image_with_data_refused_without_force(chain, capsys):
    base, top = chain
    before = top.read_bytes()
    status, _, err = run(capsys, "create", top, "1M")
    assert_one_line_error(status, err, str(top), "--force", "data")
    assert top.read_bytes() == before
    with pytest.raises(OperationError, match="--force"):
        create(top, 1 * MiB)
    assert top.read_bytes() == before
    # --force: it is replaced
    assert run(capsys, "create", "--force", top, "1M")[0] == 0
    with pyqcow.open(top) as img:
        assert img.virtual_size == MiB and img.backing is None


def test_create_over_backing_file_of_another_image_refused(chain, capsys):
    base, top = chain
    empty = base.parent / "empty.qcow2"
    create(empty, 1 * MiB)
    create(top, backing="empty.qcow2", backing_format="qcow2", force=True)  # top now needs it
    before = empty.read_bytes()
    status, _, err = run(capsys, "create", empty, "2M")
    assert_one_line_error(status, err, str(empty), "backing file of", "top.qcow2", "--force")
    assert empty.read_bytes() == before
    create(empty, 2 * MiB, force=True)
    with pyqcow.open(empty) as img:
        assert img.virtual_size == 2 * MiB


def test_create_over_empty_overlay_allowed(chain, capsys):
    base, _ = chain
    snap = base.parent / "snap.qcow2"
    assert run(capsys, "create", "-q", "-b", "base.qcow2", "-F", "qcow2", snap)[0] == 0
    # re-running the same snapshot command over the still-empty overlay is fine
    assert run(capsys, "create", "-q", "-b", "base.qcow2", "-F", "qcow2", snap) == (0, "", "")
    assert read(snap) == read(base)


def test_create_over_image_with_internal_snapshot_refused(tmp_path):
    p = tmp_path / "s.qcow2"
    create(p, 1 * MiB)
    from pyqcow.ops.snapshot import create_snapshot

    with pyqcow.open(p, "r+") as img:
        create_snapshot(img, "s1")
    before = p.read_bytes()
    with pytest.raises(OperationError, match="snapshot"):
        create(p, 1 * MiB)
    assert p.read_bytes() == before


def test_create_dry_run_shows_the_refusal(chain, capsys):
    _, top = chain
    status, out, err = run(capsys, "create", "--dry-run", top, "1M")
    assert_one_line_error(status, err, "--force")
    assert out == ""


# -- item 3 (create part): the backing name is checked before any byte is written ----------
def test_create_backing_name_too_long_refused_before_writing(chain):
    base, top = chain
    before = top.read_bytes()
    name = "./" * 600 + "base.qcow2"  # resolves to base, but 1210 bytes
    with pytest.raises(OperationError, match="too long"):
        create(top, backing=name, backing_format="qcow2")
    assert top.read_bytes() == before


def test_create_backing_name_must_fit_in_cluster0(chain, tmp_path):
    base, _ = chain
    new = tmp_path / "small.qcow2"
    name = "./" * 200 + "base.qcow2"  # 410 bytes: fine for 64 KiB clusters, not for 512
    with pytest.raises(QcowError, match=r"small\.qcow2.*first cluster"):
        create(new, backing=name, backing_format="qcow2", cluster_size=512)
    assert not new.exists()
    create(new, backing=name, backing_format="qcow2")
    assert read(new) == read(base)


# -- item 11: sizes round up to 512 bytes ----------------------------------------------------
@pytest.mark.parametrize("size, expected", [(1000, 1024), (100, 512), (512, 512), (0, 0),
                                            (1025, 1536)])
def test_create_rounds_size_up_to_sector(tmp_path, capsys, size, expected):
    api = tmp_path / "api.qcow2"
    create(api, size)
    cli = tmp_path / "cli.qcow2"
    assert run(capsys, "create", cli, str(size)) == (0, "", "")
    for p in (api, cli):
        with pyqcow.open(p) as img:
            assert img.virtual_size == expected


# -- item 17: garbage in -o --------------------------------------------------------------
GARBAGE = [
    ("cluster_size", "abc"),
    ("cluster_size", "3000"),
    ("refcount_bits", "abc"),
    ("refcount_bits", "3"),
    ("compat", "abc"),
    ("lazy_refcounts", "maybe"),
    ("extended_l2", "maybe"),
    ("compression_type", "lz4"),
    ("preallocation", "full!"),
    ("backing_fmt", "vmdk!"),
]


@pytest.mark.parametrize("key, value", GARBAGE)
def test_create_option_garbage(tmp_path, capsys, key, value):
    p = tmp_path / "g.qcow2"
    status, _, err = run(capsys, "create", "-o", f"{key}={value}", p, "1M")
    assert_one_line_error(status, err, str(p), key, repr(value))
    assert not p.exists()


@pytest.mark.parametrize("key, value", GARBAGE)
def test_convert_option_garbage(chain, tmp_path, capsys, key, value):
    base, _ = chain
    p = tmp_path / "g.qcow2"
    status, _, err = run(capsys, "convert", "-O", "qcow2", "-o", f"{key}={value}", base, p)
    assert_one_line_error(status, err, str(p), key, repr(value))
    assert not p.exists()


@pytest.mark.parametrize("key, value", GARBAGE)
def test_api_option_garbage(tmp_path, key, value):
    from pyqcow.newimage import parse_options

    p = tmp_path / "g.qcow2"
    with pytest.raises(OperationError, match=key):
        create(p, MiB, **parse_options(str(p), f"{key}={value}"))
    assert not p.exists()


# -- item 19: a failed create/convert names the file and removes what it created ----------
def test_convert_enospc_names_file_and_removes_output(chain, tmp_path, monkeypatch, capsys):
    """Fault injection version (the real small filesystem is in the interop tests)."""
    base, _ = chain
    dst = tmp_path / "full.raw"
    from pyqcow import fastcopy

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fastcopy, "copy_runs", full)
    # (host data is copied by the C helper over the source's mapping: fail there too)
    from pyqcow.ops.convert_common import SourceMaps

    monkeypatch.setattr(SourceMaps, "copy_nonzero", full)
    status, _, err = run(capsys, "convert", "-O", "raw", base, dst)
    assert_one_line_error(status, err, str(dst), "No space left on device")
    assert not dst.exists()


def test_convert_failure_keeps_preexisting_destination(chain, tmp_path, monkeypatch, capsys):
    base, _ = chain
    dst = tmp_path / "old.raw"
    dst.write_bytes(b"old")
    from pyqcow import fastcopy

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fastcopy, "copy_runs", full)
    # (host data is copied by the C helper over the source's mapping: fail there too)
    from pyqcow.ops.convert_common import SourceMaps

    monkeypatch.setattr(SourceMaps, "copy_nonzero", full)
    status, _, err = run(capsys, "convert", "-O", "raw", base, dst)
    assert_one_line_error(status, err, str(dst), "No space left on device")
    assert dst.exists()  # it was not ours to remove
    assert "incomplete" in err


def test_create_through_dangling_symlink_creates_target(tmp_path, monkeypatch, capsys):
    """As qemu-img: the link's target is created; after a failure the target (ours) is
    removed and the link (not ours) is kept."""
    import pyqcow.image as image_mod

    link = tmp_path / "link.qcow2"
    target = tmp_path / "target.qcow2"
    link.symlink_to(target.name)
    real = image_mod.QcowImage.resize

    def full(self, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(image_mod.QcowImage, "resize", full)
    status, _, err = run(capsys, "create", link, "1M")
    assert_one_line_error(status, err, str(link), "No space left on device", "removed")
    assert link.is_symlink() and not target.exists()
    monkeypatch.setattr(image_mod.QcowImage, "resize", real)
    assert run(capsys, "create", link, "1M") == (0, "", "")
    assert link.is_symlink() and target.is_file()
    with pyqcow.open(link) as img:
        assert img.virtual_size == MiB


def test_create_enospc_removes_new_file(tmp_path, monkeypatch, capsys):
    import pyqcow.image as image_mod

    def full(self, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(image_mod.QcowImage, "resize", full)
    p = tmp_path / "n.qcow2"
    status, _, err = run(capsys, "create", p, "1M")
    assert_one_line_error(status, err, str(p), "No space left on device")
    assert not p.exists()


# -- item 22: convert -l -------------------------------------------------------------------
def test_convert_missing_snapshot_is_clear_error(chain, tmp_path, capsys):
    base, _ = chain
    dst = tmp_path / "x.raw"
    status, _, err = run(capsys, "convert", "-l", "nope", "-O", "raw", base, dst)
    assert_one_line_error(status, err, str(base), "nope")
    assert not dst.exists()
    status, _, err = run(capsys, "convert", "-l", "snapshot.bogus=1", "-O", "raw", base, dst)
    assert_one_line_error(status, err, "snapshot.bogus")
    assert not dst.exists()


def test_convert_snapshot_pyqcow_made(tmp_path, capsys):
    from pyqcow.ops.snapshot import create_snapshot

    p = tmp_path / "s.qcow2"
    create(p, 1 * MiB)
    write(p, 0, b"\x01" * CS)
    with pyqcow.open(p, "r+") as img:
        create_snapshot(img, "first")
    write(p, 0, b"\x02" * CS)
    for spec in ("first", "1", "snapshot.name=first", "snapshot.id=1",
                 "snapshot.id=1,snapshot.name=first"):
        dst = tmp_path / "o.raw"
        assert run(capsys, "convert", "-l", spec, "-O", "raw", p, dst)[0] == 0
        assert dst.read_bytes()[:CS] == b"\x01" * CS, spec
        dst.unlink()
    status, _, err = run(capsys, "convert", "-l", "snapshot.id=1,snapshot.name=other",
                         "-O", "raw", p, tmp_path / "o.raw")
    assert_one_line_error(status, err, "snapshot")


# -- item 24: zstd output is capped at one cluster -------------------------------------------
def _zstd_bomb(out_size: int) -> bytes:
    import zstandard

    c = zstandard.ZstdCompressor().compressobj()
    chunk = bytes(MiB)
    parts = [c.compress(chunk) for _ in range(out_size // MiB)]
    parts.append(c.flush())
    return b"".join(parts)


def test_zstd_cluster_decompressing_past_cluster_refused(tmp_path):
    p = tmp_path / "z.qcow2"
    create(p, 1 * MiB, compression_type="zstd")
    bomb = _zstd_bomb(256 * MiB)
    assert len(bomb) < CS
    with pyqcow.open(p, "r+") as img:
        img.write_compressed(0, bomb)
        img.flush()
    with pyqcow.open(p) as img:
        tracemalloc.start()
        try:
            with pytest.raises(CorruptImageError, match=r"z\.qcow2.*more than"):
                img.read(0, 4096)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 8 * MiB, peak


def test_zstd_normal_clusters_still_read(tmp_path):
    from pyqcow.ops.convert import compressor

    p = tmp_path / "z.qcow2"
    create(p, 1 * MiB, compression_type="zstd")
    data = (b"pyqcow" * 20000)[:CS]
    with pyqcow.open(p, "r+") as img:
        img.write_compressed(0, compressor("zstd")(data))
        img.flush()
    assert read(p, 0, CS) == data


# -- item 25: a write that writes nothing is an error, not a loop ---------------------------
class _ZeroWrites:
    def __init__(self, real):
        self.real = real
        self.calls = 0

    def __call__(self, fd, data, *rest):
        self.calls += 1
        if self.calls > 1000:
            raise AssertionError("looping on 0-byte writes")
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return 0
        return self.real(fd, data, *rest)


def test_convert_zero_byte_pwrite_is_an_error(tmp_path, monkeypatch):
    from pyqcow.ops import convert_raw as convert_mod

    p = tmp_path / "d.raw"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        monkeypatch.setattr(os, "pwrite", _ZeroWrites(os.pwrite))
        with pytest.raises(OSError, match="d.raw") as e:
            convert_mod._pwrite_all(fd, memoryview(b"abc"), 0, str(p))
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_orphans_extract_zero_byte_write_is_an_error(tmp_path, monkeypatch, capsys):
    img = _image_with_orphan(tmp_path / "e.qcow2")
    out = tmp_path / "out"
    monkeypatch.setattr(os, "write", _ZeroWrites(os.write))
    status, _, err = run(capsys, "orphans", "--extract", out, img)
    monkeypatch.undo()
    assert_one_line_error(status, err, str(out / "orphan-"), "wrote nothing")


# -- item 26: raw writes stay inside the disk ------------------------------------------------
def test_raw_write_beyond_virtual_size_refused(tmp_path):
    p = tmp_path / "r.raw"
    p.write_bytes(bytes(4096))
    with pyqcow.open(p, "r+", format="raw") as img:
        with pytest.raises(OperationError, match="outside the disk"):
            img.write(4000, b"x" * 200)
        with pytest.raises(OperationError, match="outside the disk"):
            img.write(8192, b"x")
        img.write(4095, b"y")
    assert p.stat().st_size == 4096
    assert p.read_bytes()[-1:] == b"y"


# -- item 28: convert -O raw makes its new name durable ----------------------------------------
def test_convert_raw_fsyncs_directory(chain, tmp_path, monkeypatch):
    from pyqcow.ops.convert import convert_to_raw

    base, _ = chain
    dst = tmp_path / "sub" / "out.raw"
    dst.parent.mkdir()
    synced = []
    real = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced.append((os.readlink(f"/proc/self/fd/{fd}"), dst.exists()))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pyqcow.open(base) as src:
        convert_to_raw(src, dst)
    assert (str(dst.parent), True) in synced
