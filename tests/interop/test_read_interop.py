"""Differential tests of the read side against qemu-img 7.2, on every shape.

For each image shape in interop/shapes.py: ``pyqcow info`` (JSON and human,
with and without ``--backing-chain``) and ``pyqcow map`` print exactly what
qemu-img prints, ``pyqcow convert -O raw`` writes the same bytes as
``qemu-img convert -O raw``, and ``pyqcow compare`` agrees with
``qemu-img compare`` (exit status and message) on pairs of images.
The CLI runs in-process (``main([...])`` with capsys).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from interop.shapes import SHAPES, Shape, shapes_without
from qemu import _run, convert_raw, qemu_img, qemu_io, require_tool

import pyqcow
from pyqcow.cli.main import main

NAMES = sorted(SHAPES)


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="module")
def built(shapes_dir: Path) -> dict[str, Shape]:
    return {}


def get_shape(built: dict[str, Shape], shapes_dir: Path, name: str) -> Shape:
    if name not in built:
        built[name] = SHAPES[name](shapes_dir)
    return built[name]


@pytest.fixture(params=NAMES)
def shape(request: pytest.FixtureRequest, built: dict[str, Shape], shapes_dir: Path) -> Shape:
    return get_shape(built, shapes_dir, request.param)


# a raw file of 16 TiB does not fit ext4: the raw-conversion tests leave out "huge"
RAW_NAMES = shapes_without("huge")


@pytest.fixture(params=RAW_NAMES)
def raw_shape(request: pytest.FixtureRequest, built: dict[str, Shape], shapes_dir: Path) -> Shape:
    return get_shape(built, shapes_dir, request.param)


def pyqcow_cli(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def qemu_cli(*argv: str | os.PathLike, ok=(0,)) -> tuple[int, str, str]:
    proc = _run(["qemu-img", *map(os.fspath, argv)], ok=ok)
    return proc.returncode, proc.stdout, proc.stderr


# -- info ------------------------------------------------------------------------------
@pytest.mark.parametrize("chain", [False, True], ids=["top", "backing-chain"])
def test_info_json_equals_qemu(shape: Shape, chain: bool, capsys) -> None:
    extra = ["--backing-chain"] if chain else []
    theirs = qemu_img("info", "--output=json", *extra, shape.path)
    status, ours, err = pyqcow_cli(capsys, "info", "--output=json", *extra, shape.path)
    assert status == 0, err
    assert json.loads(ours) == json.loads(theirs)
    assert ours == theirs  # same key order and layout too


@pytest.mark.parametrize("chain", [False, True], ids=["top", "backing-chain"])
def test_info_human_equals_qemu(shape: Shape, chain: bool, capsys) -> None:
    extra = ["--backing-chain"] if chain else []
    theirs = qemu_img("info", *extra, shape.path)
    status, ours, err = pyqcow_cli(capsys, "info", *extra, shape.path)
    assert status == 0, err
    assert ours == theirs


def test_info_relative_names(built, shapes_dir, capsys, monkeypatch) -> None:
    """Relative image and backing names print as qemu prints them (path_combine)."""
    shape = get_shape(built, shapes_dir, "chain_3deep_relative")
    for cwd, name in ((shape.path.parent, "top.qcow2"), (shape.path.parent.parent,
                                                         "chain_3deep_relative/top.qcow2"),
                      (shape.path.parent / "sub", "../top.qcow2")):
        monkeypatch.chdir(cwd)
        theirs = qemu_img("info", "--output=json", "--backing-chain", name)
        status, ours, err = pyqcow_cli(capsys, "info", "--output=json", "--backing-chain", name)
        assert status == 0, err
        assert ours == theirs


# -- map -------------------------------------------------------------------------------
def test_map_json_equals_qemu(shape: Shape, capsys) -> None:
    theirs = qemu_img("map", "--output=json", shape.path)
    status, ours, err = pyqcow_cli(capsys, "map", "--output=json", shape.path)
    assert status == 0, err
    assert ours == theirs


def test_map_json_ranges_equal_qemu(shape: Shape, capsys) -> None:
    size = pyqcow_info_size(shape.path)
    for start, length in ((size // 3 // 512 * 512, size // 4), (1000, 70000), (0, 1),
                          (size - 512, 4096), (size + 4096, 512)):
        args = ["--start-offset", str(start), "--max-length", str(length)]
        theirs = qemu_img("map", "--output=json", *args, shape.path)
        status, ours, err = pyqcow_cli(capsys, "map", "--output=json", *args, shape.path)
        assert status == 0, err
        assert ours == theirs, args


def test_map_human_equals_qemu(shape: Shape, capsys) -> None:
    q_status, theirs, q_err = qemu_cli("map", shape.path, ok=(0, 1))
    status, ours, err = pyqcow_cli(capsys, "map", shape.path)
    assert status == q_status, (err, q_err)
    assert ours == theirs
    if status:  # compressed clusters have no host offset to print
        assert "compressed" in q_err and "compressed" in err


def first_difference(a: Path, b: Path, chunk: int = 8 << 20) -> int | None:
    """Offset of the first differing chunk of two files, None if equal."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return offset
            if not x:
                return None
            offset += len(x)


def pyqcow_info_size(path: Path) -> int:
    with pyqcow.open(path) as img:
        return img.virtual_size


# -- reads and convert -------------------------------------------------------------------
def test_api_reads_expected_contents(shape: Shape) -> None:
    with pyqcow.open(shape.path) as img:
        for offset, length, byte in shape.expect:
            assert img.read(offset, length) == bytes([byte]) * length, (offset, length)


def test_convert_raw_equals_qemu(raw_shape: Shape, tmp_path: Path, capsys) -> None:
    theirs = convert_raw(raw_shape.path, tmp_path / "qemu.raw")
    ours = tmp_path / "pyqcow.raw"
    status, out, err = pyqcow_cli(capsys, "convert", "-O", "raw", raw_shape.path, ours)
    assert status == 0 and out == "" and err == "", err
    assert ours.stat().st_size == theirs.stat().st_size
    assert first_difference(ours, theirs) is None
    # sparse like qemu-img's own output (slack: ext4 extent-tree blocks)
    assert ours.stat().st_blocks * 512 <= theirs.stat().st_blocks * 512 + 64 * 1024


def test_convert_raw_matches_api_reads(raw_shape: Shape, tmp_path: Path, capsys) -> None:
    """Spot-check pyqcow's converted bytes against reads through the API."""
    ours = tmp_path / "pyqcow.raw"
    assert pyqcow_cli(capsys, "convert", raw_shape.path, ours)[0] == 0
    with pyqcow.open(raw_shape.path) as img, open(ours, "rb") as f:
        for off in range(0, img.virtual_size, max(4096, img.virtual_size // 64)):
            n = min(12345, img.virtual_size - off)
            assert img.read(off, n) == os.pread(f.fileno(), n, off)


# -- compare ------------------------------------------------------------------------------
def _compare_both(capsys, a: Path, b: Path, strict: bool) -> None:
    flag = ["-s"] if strict else []
    q_status, theirs, q_err = qemu_cli("compare", *flag, a, b, ok=(0, 1))
    status, ours, err = pyqcow_cli(capsys, "compare", *flag, a, b)
    assert (status, ours) == (q_status, theirs), (a, b, strict, err)


@pytest.mark.parametrize("strict", [False, True], ids=["normal", "strict"])
def test_compare_with_raw_copies(raw_shape: Shape, strict: bool, tmp_path: Path, capsys) -> None:
    raw = convert_raw(raw_shape.path, tmp_path / "same.raw")
    _compare_both(capsys, raw_shape.path, raw, strict)
    changed = convert_raw(raw_shape.path, tmp_path / "changed.raw")  # a sparse copy
    size = raw.stat().st_size
    for offset in (size // 2 + 100, 0, size - 1):
        qemu_io(changed, f"write -P 0xee {offset} 1", fmt="raw")
        _compare_both(capsys, raw_shape.path, changed, strict)
        _compare_both(capsys, changed, raw_shape.path, strict)


@pytest.mark.parametrize("other", ["default", "chain_qcow2", "extended_l2", "overlay_larger"])
@pytest.mark.parametrize("strict", [False, True], ids=["normal", "strict"])
def test_compare_shape_pairs(shape: Shape, other: str, strict: bool, built, shapes_dir,
                             capsys) -> None:
    b = get_shape(built, shapes_dir, other)
    _compare_both(capsys, shape.path, b.path, strict)


def test_compare_with_itself(shape: Shape, capsys) -> None:
    for strict in (False, True):
        _compare_both(capsys, shape.path, shape.path, strict)


def test_info_edge_cases_equal_qemu(tmp_path: Path, capsys) -> None:
    """A disabled bitmap (empty "flags" list), a raw image, an odd-sized raw backing."""
    bm = tmp_path / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", bm, "1M")
    qemu_img("bitmap", "--add", "--disable", bm, "off")
    raw = tmp_path / "odd.raw"
    raw.write_bytes(b"\1" * 1000)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "odd.raw", "-F", "raw", top, "1M")
    for argv in (["info", "--output=json", bm], ["info", bm], ["info", "--output=json", raw],
                 ["info", "--output=json", "--backing-chain", top], ["map", "--output=json", top],
                 ["map", top]):
        theirs = qemu_img(*argv)
        status, ours, err = pyqcow_cli(capsys, *argv)
        assert status == 0, err
        assert ours == theirs, argv


def test_odd_sized_raw_is_sector_rounded_like_qemu(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "odd.raw"
    raw.write_bytes(b"\1" * 1000)
    theirs = convert_raw(raw, tmp_path / "qemu.raw")
    status, _, err = pyqcow_cli(capsys, "convert", raw, tmp_path / "ours.raw")
    assert status == 0, err
    assert (tmp_path / "ours.raw").read_bytes() == theirs.read_bytes()  # 1024 bytes
    for strict in (False, True):
        _compare_both(capsys, raw, theirs, strict)
    with pyqcow.open(raw) as img:
        assert img.virtual_size == 1024
        assert img.read(0, 1024) == b"\1" * 1000 + bytes(24)
