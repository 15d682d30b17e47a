"""libyal's pyqcow API (libqcow-python) served by this package: pyqcow/libyal.py.

libyal's own binding tests (tests/pyqcow_test_file.py, tests/pyqcow_test_support.py
from the libqcow-python sdist, fetched at run time, never kept here) run against
this package on v2, v3, chained, zstd, extended-L2 and external-data-file images
made by qemu-img; the bytes read through every libyal entry point are compared
with ``qemu-img convert``.  libyal's real binding, loaded beside ours, shows
that libqcow refuses the zstd and extended-L2 images.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from libyal_fetch import FetchError, binding_tests, load_binding
from qemu import convert_raw, create, need, qemu_img, qemu_io, require_tool

import pyqcow

SIZE = (1 << 20) + 3 * 4096 + 512  # a partial last cluster too


def _fetch_failed(what: str, e: Exception):
    msg = f"cannot fetch {what}: {e}"
    need(False, msg)


def _fill(path: Path, *cmds: str) -> None:
    qemu_io(path, *cmds)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """name -> image (top of its chain); the expected bytes are next to it as NAME.raw."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    d = tmp_path_factory.mktemp("libyal")
    out: dict[str, Path] = {}
    pattern = ("write -P 0x5a 0 100k", "write -P 0xa5 700k 64k", "write -z 64k 8k",
               f"write -P 0x3c {SIZE - 1536} 1536")
    for name, opts in (("v2", ("compat=0.10",)), ("v3", ("compat=1.1",)),
                       ("extl2", ("compat=1.1", "extended_l2=on", "cluster_size=64k"))):
        p = create(d / f"{name}.qcow2", SIZE, *opts)
        _fill(p, *pattern, "write -P 0x77 200k 3k")  # partial subclusters on extl2
        out[name] = p
    # chain: base <- child with a relative backing name (libyal's tests join it
    # with the image's directory, as dfvfs does)
    base = create(d / "base.qcow2", SIZE, "compat=1.1")
    _fill(base, *pattern)
    child = create(d / "child.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    _fill(child, "write -P 0x11 50k 8k", "write -z 700k 4k")
    out["chain"] = child
    # zstd: compressed clusters written by qemu-img convert -c
    raw = d / "zsrc.raw"
    raw.write_bytes(b"".join(bytes([i % 251]) * 4096 for i in range(SIZE // 4096))
                    + b"\xee" * (SIZE % 4096))
    zstd = d / "zstd.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
             "compression_type=zstd", raw, zstd)
    out["zstd"] = zstd
    # external data file (qemu resolves a relative name against its cwd: absolute)
    df = create(d / "datafile.qcow2", SIZE, "compat=1.1", f"data_file={d / 'datafile.data'}")
    _fill(df, *pattern)
    out["datafile"] = df
    for name, p in [*out.items(), ("base", base)]:
        convert_raw(p, d / f"{name}.raw")
    return out


def _expected(img: Path, name: str) -> bytes:
    return (img.parent / f"{name}.raw").read_bytes()


SHAPES = ("v2", "v3", "chain", "zstd", "extl2", "datafile")


@pytest.fixture(scope="module")
def libyal_tests(tmp_path_factory) -> Path:
    try:
        return binding_tests()
    except FetchError as e:
        _fetch_failed("libyal's binding tests (pip download libqcow-python)", e)


@pytest.mark.parametrize("script", ["pyqcow_test_file.py", "pyqcow_test_support.py"])
@pytest.mark.parametrize("shape", SHAPES)
def test_libyal_binding_tests_pass(libyal_tests, images, shape, script):
    """libyal's own unittest scripts, run as its build does: `python SCRIPT SOURCE`."""
    proc = subprocess.run(
        [sys.executable, str(libyal_tests / script), str(images[shape])],
        capture_output=True, text=True, timeout=120, cwd=images[shape].parent,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"^Ran (\d+) tests", out, re.M), out
    assert re.search(r"^OK$", out, re.M) and "skipped" not in out, out


def _parent_for(f, img: Path):
    name = f.backing_filename
    if not name:
        return None
    parent = pyqcow.file()
    parent.open(str(img.parent / name))
    f.set_parent(parent)
    return parent


@pytest.mark.parametrize("shape", SHAPES)
def test_libyal_file_reads_what_qemu_reads(images, shape):
    img = images[shape]
    want = _expected(img, shape)
    f = pyqcow.file()
    f.open(str(img))
    parent = _parent_for(f, img)
    assert f.get_media_size() == f.media_size == len(want)
    # whole disk in odd-sized steps through read_buffer, and random spots at offsets
    f.seek_offset(0)
    got = bytearray()
    while chunk := f.read_buffer(12345):
        got += chunk
    assert bytes(got) == want
    for off, n in ((0, 1), (4095, 2), (65535, 70000), (len(want) - 8, 4096), (200 * 1024, 3072)):
        assert f.read_buffer_at_offset(n, off) == want[off : off + n]
        assert f.get_offset() == min(off + n, len(want))
    f.close()
    if parent is not None:
        # the parent is not owned: still open and readable after the child closed
        assert parent.read_buffer_at_offset(SIZE, 0) == _expected(img, "base")
        parent.close()


class _DfvfsLike:
    """A file-like object as dfvfs passes: read/seek/get_size, no fileno, no tell."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self.reads = 0
        self.closed = False

    def read(self, size=None):
        self.reads += 1
        end = len(self._data) if size is None else self._pos + min(size, 7000)  # short reads
        data = self._data[self._pos : end]
        self._pos += len(data)
        return data

    def seek(self, offset, whence=os.SEEK_SET):
        self._pos = offset if whence == os.SEEK_SET else (
            self._pos + offset if whence == os.SEEK_CUR else len(self._data) + offset)

    def get_size(self):
        return len(self._data)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("shape", SHAPES)
def test_open_file_object_reads_what_qemu_reads(images, shape):
    """File-object hosts: an in-memory object (no descriptor, short reads) holds the image."""
    img = images[shape]
    want = _expected(img, shape)
    fobj = _DfvfsLike(img.read_bytes())
    f = pyqcow.open_file_object(fobj)
    parent_obj = None
    if f.backing_filename:
        parent_obj = _DfvfsLike((img.parent / f.backing_filename).read_bytes())
        parent = pyqcow.open_file_object(parent_obj)
        f.set_parent(parent)
    assert f.read_buffer_at_offset(len(want), 0) == want
    assert f.read_buffer_at_offset(100, len(want) - 50) == want[-50:]
    assert fobj.reads > 0
    f.close()
    assert not fobj.closed  # the caller's object stays open
    if parent_obj is not None:
        assert parent.read_buffer_at_offset(SIZE, 0) == _expected(img, "base")
        parent.close()
        assert not parent_obj.closed


def test_open_file_object_with_seek_to_end_size(images):
    """No get_size: the size comes from seek(0, SEEK_END) + tell (a plain BytesIO)."""
    img = images["v3"]
    f = pyqcow.file()
    f.open_file_object(io.BytesIO(img.read_bytes()))
    assert f.read_buffer_at_offset(SIZE, 0) == _expected(img, "v3")
    f.close()


@pytest.mark.parametrize("shape", SHAPES)
def test_our_image_object_serves_libyal_methods(images, shape):
    """The name clash: pyqcow.open returns our image; libyal's reading methods work on it."""
    img = images[shape]
    want = _expected(img, shape)
    with pyqcow.open(img) as im:  # our open: the backing chain is opened too
        assert im.get_media_size() == im.media_size == len(want)
        assert im.read(0, 4096) == want[:4096]  # ours: read(offset, length)
        im.seek_offset(10)
        assert im.read(5) == want[10:15]  # libyal: read(size) at the current offset
        assert im.tell() == im.get_offset() == 15
        im.seek(-3, os.SEEK_END)
        assert im.read_buffer() == want[-3:] and im.read() == b""
        assert im.read_buffer_at_offset(5000, 123) == want[123:5123]
        assert im.get_backing_filename() == ("base.qcow2" if shape == "chain" else None)
        assert im.is_locked() is False
    with pytest.raises(OSError, match="not open"):
        im.read_buffer(1)


def test_set_parent_on_our_image_replaces_the_chain_and_keeps_the_parent(images):
    img = images["chain"]
    parent = pyqcow.file()
    parent.open(str(img.parent / "base.qcow2"))
    with pyqcow.open(img) as im:
        im.set_parent(parent)
        assert im.read_buffer_at_offset(SIZE, 0) == _expected(img, "chain")
    assert parent.read_buffer_at_offset(4, 0) == b"\x5a" * 4  # not closed with the child
    parent.close()


def test_get_version_is_a_libyal_date():
    v = pyqcow.get_version()
    assert re.fullmatch(r"\d{8}", v) and v >= "20201213"  # plaso's and dfvfs's minimum


def test_libyal_errors(images, tmp_path):
    img = str(images["v3"])
    f = pyqcow.file()
    with pytest.raises(OSError, match="not open"):
        f.close()
    with pytest.raises(OSError, match="not open"):
        f.read_buffer(1)
    with pytest.raises(OSError, match="not open"):
        f.get_media_size()
    with pytest.raises(TypeError, match="unsupported string object type"):
        f.open(None)
    with pytest.raises(ValueError, match="unsupported mode: w"):
        f.open(img, mode="w")
    with pytest.raises(TypeError, match="missing read attribute"):
        f.open_file_object(None)
    with pytest.raises(TypeError, match="missing seek attribute"):
        f.open_file_object(type("R", (), {"read": lambda self, n: b""})())
    with pytest.raises(ValueError, match="unsupported mode"):
        f.open_file_object(io.BytesIO(b""), mode="w")
    f.open(img)
    with pytest.raises(OSError, match="already set"):
        f.open(img)
    with pytest.raises(ValueError, match="less than zero"):
        f.read_buffer(-1)
    with pytest.raises(ValueError, match="read size value less than zero"):
        f.read_buffer_at_offset(-1, 0)
    with pytest.raises(ValueError, match="read offset value less than zero"):
        f.read_buffer_at_offset(1, -1)
    with pytest.raises(TypeError, match="integer"):
        f.read_buffer("12")
    with pytest.raises(OSError, match="out of bounds"):
        f.seek_offset(-1)
    with pytest.raises(OSError, match="out of bounds"):
        f.seek_offset(-1 - SIZE, os.SEEK_END)
    with pytest.raises(OSError, match="whence"):
        f.seek_offset(0, 7)
    with pytest.raises(TypeError, match="must be pyqcow.file"):
        f.set_parent(42)
    with pytest.raises(TypeError, match="must be str"):
        f.set_password(None)
    f.seek_offset(SIZE + 16)
    assert f.get_offset() == SIZE + 16 and f.read_buffer(10) == b""
    assert f.read_buffer_at_offset(10, SIZE + 8) == b"" and f.read_buffer(0) == b""
    f.close()
    with pytest.raises(OSError, match="not open"):
        f.read_buffer_at_offset(1, 0)
    # not a QCOW image: IOError, with the file named
    raw = tmp_path / "plain.raw"
    raw.write_bytes(bytes(4096))
    with pytest.raises(OSError, match=r"plain.raw: not a QCOW image"):
        pyqcow.file().open(str(raw))
    with pytest.raises(OSError, match="not a qcow2 image|bad magic|magic"):
        pyqcow.open_file_object(io.BytesIO(bytes(4096)))
    with pytest.raises(OSError, match="no such file"):
        pyqcow.file().open(str(tmp_path / "missing.qcow2"))
    # module functions
    assert pyqcow.check_file_signature(img) is True
    assert pyqcow.check_file_signature(str(raw)) is False
    with open(img, "rb") as fo:
        assert pyqcow.check_file_signature_file_object(fo) is True
    with pytest.raises(TypeError, match="unsupported string object type"):
        pyqcow.check_file_signature(None)
    with pytest.raises(OSError, match="unable to open"):
        pyqcow.check_file_signature(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="unsupported file object"):
        pyqcow.check_file_signature_file_object(None)
    with pytest.raises(TypeError):
        pyqcow.open(None)
    with pytest.raises(ValueError, match="mode"):
        pyqcow.open(img, mode="w")
    assert pyqcow.encryption_types.NONE == 0 and pyqcow.encryption_types.AES_128_CBC == 1


@pytest.fixture(scope="module")
def libqcow_binding():
    try:
        return load_binding()
    except FetchError as e:
        _fetch_failed("libyal's libqcow-python wheel", e)


def test_libqcow_itself_refuses_zstd_and_extended_l2(libqcow_binding, images):
    """What libqcow 20260703 cannot read and this package can (the v3 image it reads)."""
    lq = libqcow_binding
    assert lq is not pyqcow and lq.__file__.endswith(".so")
    f = lq.file()
    f.open(str(images["v3"]))
    assert f.read_buffer_at_offset(SIZE, 0) == _expected(images["v3"], "v3")
    f.close()
    for shape in ("zstd", "extl2"):
        with pytest.raises(OSError):
            lq.file().open(str(images[shape]))
        ours = pyqcow.file()
        ours.open(str(images[shape]))
        assert ours.read_buffer_at_offset(SIZE, 0) == _expected(images[shape], shape)
        ours.close()


@pytest.mark.parametrize("shape", ["v2", "zstd", "extl2", "datafile"])
def test_our_open_takes_a_file_object(images, shape):
    """pyqcow.open(file-like object): our image object over a file-object host."""
    img = images[shape]
    want = _expected(img, shape)
    with open(img, "rb") as fo:  # a real file object, read via read/seek (no fd use)
        with pyqcow.open(fo) as im:
            assert im.virtual_size == len(want)
            assert im.read(0, len(want)) == want
            assert im.reader().read() == want
            assert im.read_buffer_at_offset(4096, 70000) == want[70000:74096]
        assert not fo.closed
    with pytest.raises(ValueError, match="read-only"):
        pyqcow.open(io.BytesIO(img.read_bytes()), "r+")


def test_file_object_errors_are_oserrors_naming_the_object(images):
    class Failing(_DfvfsLike):
        armed = False

        def read(self, size=None):
            if self.armed:
                raise OSError(5, "device gone")
            return super().read(size)

    fo = Failing(images["v3"].read_bytes())
    f = pyqcow.open_file_object(fo)
    fo.armed = True
    with pytest.raises(OSError, match=r"pyqcow: <file object>: cannot read .*device gone"):
        f.read_buffer_at_offset(SIZE, 0)
    f.close()


def test_the_libyal_fast_path_knows_the_engines_unallocated_marker():
    import pyqcow.image
    import pyqcow.libyal_methods

    assert pyqcow.libyal_methods._UNALLOCATED == pyqcow.image._UNALLOCATED
