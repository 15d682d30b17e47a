"""pyqcow bitmap (issue 15) against qemu-img bitmap: the same operations on two
copies; qemu reads the bitmaps back (qemu-nbd -B, then qemu-img map over the
dirty-bitmap context: tests/nbd_bitmap.py), qemu-img info lists the same
bitmaps with the same flags and granularity, qemu-img check finds no leak."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import qemu
from nbd_bitmap import assert_clean, bitmap_flags, qemu_dirty
from qemu import create, info_json, qemu_img, qemu_io

from pyqcow.cli.main import main as cli

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    qemu.require_tool("qemu-img")
    qemu.require_tool("qemu-io")
    qemu.require_tool("qemu-nbd")


def run(capsys, *argv) -> tuple[int, str, str]:
    status = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _bitmaps(p: Path) -> list[dict]:
    return info_json(p)["format-specific"]["data"].get("bitmaps", [])


def _same(q: Path, p: Path) -> None:
    assert _bitmaps(p) == _bitmaps(q)
    for name in bitmap_flags(q):
        assert qemu_dirty(p, name) == qemu_dirty(q, name), name
    assert_clean(p)


def _both(q: Path, p: Path, capsys, *argv) -> None:
    qemu_img("bitmap", *argv[:-1], q, argv[-1])
    status, out, err = run(capsys, "bitmap", *argv[:-1], p, argv[-1])
    assert (status, out, err) == (0, "", ""), argv


@pytest.mark.parametrize("cluster", ["512", "64k", "2M"])
def test_bitmap_operations_match_qemu(tmp_path: Path, cluster: str, capsys) -> None:
    q = create(tmp_path / "q.qcow2", 24 * MiB + 512, f"cluster_size={cluster}")
    p = tmp_path / "p.qcow2"
    shutil.copyfile(q, p)

    def write(*cmds: str) -> None:
        for img in (q, p):
            qemu_io(img, *cmds)

    _both(q, p, capsys, "--add", "b1")
    _both(q, p, capsys, "--add", "-g", "4k", "--disable", "b2")
    _both(q, p, capsys, "--add", "-g", "1M", "b3")
    write("write 1M 64k", "write 20M 3k", "write 24M 512")
    _same(q, p)
    _both(q, p, capsys, "--merge", "b1", "b2")  # into a disabled bitmap, other granularity
    _both(q, p, capsys, "--merge", "b2", "b3")
    _same(q, p)
    _both(q, p, capsys, "--enable", "--clear", "b2")
    write("write 5M 4k")
    _both(q, p, capsys, "--disable", "b1")
    write("write 7M 4k")
    _same(q, p)
    _both(q, p, capsys, "--remove", "b3")
    _same(q, p)
    # pyqcow's writes keep them up to date, qemu reads them
    import pyqcow

    with pyqcow.open(p, "r+") as img:
        img.write(9 * MiB, b"x" * 100)
    qemu_io(q, "write 9M 100")
    _same(q, p)
    _both(q, p, capsys, "--remove", "b1")
    _both(q, p, capsys, "--remove", "b2")
    assert _bitmaps(p) == [] and "bitmaps" not in info_json(p)["format-specific"]["data"]
    assert_clean(p)


def test_bitmap_merge_from_another_image(tmp_path: Path, capsys) -> None:
    src = create(tmp_path / "src.qcow2", 8 * MiB)
    qemu_img("bitmap", "--add", "-g", "512", src, "s")
    qemu_io(src, "write 1M 1k", "write 6M 64k")
    q = create(tmp_path / "q.qcow2", 8 * MiB)
    qemu_img("bitmap", "--add", q, "d")
    qemu_io(q, "write 3M 4k")
    p = tmp_path / "p.qcow2"
    shutil.copyfile(q, p)
    _both(q, p, capsys, "--merge", "s", "-b", str(src), "-F", "qcow2", "d")
    _same(q, p)
    # d (64 KiB granules) now covers its own write and both of s's
    assert qemu_dirty(p, "d") == [(MiB, 64 * KiB), (3 * MiB, 64 * KiB), (6 * MiB, 64 * KiB)]


def test_info_lists_bitmaps_as_qemu(tmp_path: Path, capsys) -> None:
    img = create(tmp_path / "a.qcow2", 8 * MiB)
    assert run(capsys, "bitmap", "--add", img, "one")[0] == 0
    assert run(capsys, "bitmap", "--add", "--disable", "-g", "512", img, "two")[0] == 0
    for fmt in ((), ("--output=json",)):
        theirs = qemu_img("info", *fmt, img)
        status, ours, _ = run(capsys, "info", *fmt, img)
        assert status == 0
        pick = (lambda t: t[t.index("bitmaps"):t.index("refcount bits")]) if not fmt else (
            lambda t: t[t.index('"bitmaps"'):t.index('"refcount-bits"')])
        assert pick(ours) == pick(theirs)


def test_bitmap_errors(tmp_path: Path, capsys) -> None:
    img = create(tmp_path / "a.qcow2", 8 * MiB)
    assert run(capsys, "bitmap", "--add", img, "b")[0] == 0
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    v2 = create(tmp_path / "v2.qcow2", MiB, "compat=0.10")
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    for argv, msg in (
        (("--add", img, "b"), f"pyqcow: {img}: operation add on bitmap b failed: bitmap already "
                              "exists: b"),
        (("--remove", img, "nope"), f"pyqcow: {img}: operation remove on bitmap nope failed: "
                                    "dirty bitmap 'nope' not found"),
        (("--merge", "nope", img, "b"), f"pyqcow: {img}: operation merge on bitmap b failed: "
                                        "dirty bitmap 'nope' not found"),
        (("--add", "-g", "1000", img, "c"), f"pyqcow: {img}: operation add on bitmap c failed: "
                                            "granularity must be a power of 2 between 512 bytes "
                                            "and 2 GiB"),
        (("--add", "-g", "4G", img, "c"), "granularity must be a power of 2"),
        ((img, "b"), f"pyqcow: {img}: need at least one of --add, --remove, --clear, --enable, "
                     "--disable, or --merge"),
        (("--clear", "-g", "4k", img, "b"), f"pyqcow: {img}: -g needs --add"),
        (("--add", "--add", img, "c"), "bitmap already exists: c"),
        (("--add", v2, "b"), f"pyqcow: {v2}: operation add on bitmap b failed: cannot store dirty "
                             "bitmaps in qcow2 v2 files"),
        (("--add", raw, "b"), f"pyqcow: {raw}: persistent bitmaps need a qcow2 image (this one "
                              "is raw)"),
    ):
        status, out, err = run(capsys, "bitmap", *argv)
        assert (status, out) == (1, ""), argv
        assert err.startswith("pyqcow: ") and err.count("\n") == 1, (argv, err)
        assert err.startswith(msg) if msg.startswith("pyqcow") else msg in err, (argv, err)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
    assert "bitmaps" not in info_json(v2)["format-specific"]["data"]


def test_convert_bitmaps_matches_qemu(tmp_path: Path, capsys) -> None:
    src = create(tmp_path / "src.qcow2", 8 * MiB)
    qemu_img("bitmap", "--add", src, "a")
    qemu_img("bitmap", "--add", "-g", "4k", "--disable", src, "b")
    qemu_io(src, "write -P 1 1M 64k", "write -P 2 5M 4k")
    qemu_img("bitmap", "--enable", src, "b")
    qemu_io(src, "write -P 3 7M 512")
    for extra in ((), ("-W", "-m", "3")):
        q, p = tmp_path / "q.qcow2", tmp_path / "p.qcow2"
        qemu_img("convert", "--bitmaps", "-O", "qcow2", src, q)
        status, out, err = run(capsys, "convert", "--bitmaps", *extra, "-O", "qcow2", src, p)
        assert (status, out, err) == (0, "", "")
        _same(q, p)
        assert qemu.compare(q, p) == 0
        q.unlink()
        p.unlink()
    # -n into an existing image: its own bitmaps stay, a name clash is refused first
    t = create(tmp_path / "t.qcow2", 8 * MiB)
    qemu_img("bitmap", "--add", t, "own")
    assert run(capsys, "convert", "-n", "--bitmaps", "-O", "qcow2", src, t)[0] == 0
    assert sorted(bitmap_flags(t)) == ["a", "b", "own"]
    assert qemu_dirty(t, "b") == qemu_dirty(src, "b")
    assert_clean(t)
    before = hashlib.sha256(t.read_bytes()).hexdigest()
    status, _, err = run(capsys, "convert", "-n", "--bitmaps", "-O", "qcow2", src, t)
    assert (status, err) == (1, f"pyqcow: {t}: --bitmaps: the target already has bitmap 'a'\n")
    assert hashlib.sha256(t.read_bytes()).hexdigest() == before
    status, _, err = run(capsys, "convert", "--bitmaps", "-O", "raw", src, tmp_path / "x.raw")
    assert (status, err) == (1, f"pyqcow: {tmp_path / 'x.raw'}: --bitmaps needs -O qcow2\n")
    status, _, err = run(capsys, "convert", "--bitmaps", "-O", "qcow2", "-o", "compat=0.10",
                         src, tmp_path / "v2.qcow2")
    assert status == 1 and "a v2 (compat=0.10) image cannot hold bitmaps" in err
    assert not (tmp_path / "v2.qcow2").exists()


# --- on the shape zoo -------------------------------------------------------------------------
from interop.shapes import SHAPE_TAGS, SHAPES  # noqa: E402

_built: dict = {}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bitmap_zoo")


@pytest.mark.parametrize(
    "name", sorted(n for n, t in SHAPE_TAGS.items() if not t & {"v2", "huge", "dirty"})
)
def test_bitmap_on_every_shape(name: str, zoo: Path, capsys) -> None:
    if name not in _built:
        _built[name] = SHAPES[name](zoo)
    shape = _built[name]
    q = shape.path.with_name("bm-q.qcow2")
    p = shape.path.with_name("bm-p.qcow2")
    shutil.copyfile(shape.path, q)
    shutil.copyfile(shape.path, p)
    if name == "bitmap":  # the shape's own bitmap first
        _both(q, p, capsys, "--clear", bitmap_flags(q) and next(iter(bitmap_flags(q))))
    _both(q, p, capsys, "--add", "-g", "512", "new1")
    _both(q, p, capsys, "--add", "--disable", "new2")
    for img in (q, p):
        qemu_io(img, "write -P 0x77 64k 3k")
    _both(q, p, capsys, "--merge", "new1", "new2")
    _same(q, p)
    _both(q, p, capsys, "--remove", "new1")
    _same(q, p)
