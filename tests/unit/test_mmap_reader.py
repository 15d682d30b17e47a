"""The mmap-backed C read path (pyqcow_map_* via pyqcow.guestmap.GuestMap).

Every test runs with the C helper and with the pure-Python fallback (the
``mode`` fixture of test_fastcopy); qemu-img convert is the oracle for the
bytes.  The shape zoo (tests/interop/test_forensic_interop.py) and the
hypothesis property (tests/property/test_read_props.py) run both backends too.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import qemu
from host_needs import require_native
from test_fastcopy import _NoNative

import pyqcow
from pyqcow import fastcopy
from pyqcow.errors import QcowError

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    qemu.require_tool("qemu-img")
    qemu.require_tool("qemu-io")


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """A qcow2 overlay (data, zeros, a compressed cluster, holes) over a qcow2
    base (data, zeros) that is shorter than the overlay."""
    base = qemu.create(tmp_path / "base.qcow2", 6 * MiB)
    qemu.qemu_io(base, "write -P 0x11 0 1M", "write -P 0x22 3M 2M", "write -z 3584k 64k",
                 "write -P 0x23 6140k 4k")
    top = qemu.create(tmp_path / "top.qcow2", 8 * MiB, backing="base.qcow2",
                      backing_fmt="qcow2", cwd=tmp_path)
    qemu.qemu_io(top, "write -P 0x33 512k 1M", "write -z 3200k 128k", "write -c -P 0x44 7M 64k",
                 "write -P 0x55 8188k 4k")
    return top


@pytest.fixture(params=["native", "python"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The C helper, then the pure-Python fallback (which must not touch C)."""
    if request.param == "native":
        require_native()
    else:
        fastcopy.native_available()
        monkeypatch.setattr(fastcopy, "_native", _NoNative())
    with fastcopy.backend(request.param):
        yield request.param


def _mapped(img) -> bool:
    return img.reader()._gmap is not None


def test_reader_maps_only_with_the_c_helper(chain: Path, mode: str) -> None:
    with pyqcow.open(chain) as img:
        assert _mapped(img) == (mode == "native")
        assert (img.backing.guest_map() is not None) == (mode == "native")


def test_no_native_env_reads_through_python(chain: Path, monkeypatch) -> None:
    monkeypatch.setenv(fastcopy.NO_NATIVE_ENV, "1")
    with pyqcow.open(chain) as img:
        assert img.guest_map() is None and not _mapped(img)


def test_chain_reads_equal_qemu(chain: Path, mode: str, tmp_path: Path) -> None:
    want = qemu.convert_raw(chain, tmp_path / "want.raw").read_bytes()
    rng = random.Random(14)
    with pyqcow.open(chain) as img:
        r = img.reader()
        assert r.read() == want
        r.seek(0)
        buf = bytearray(MiB)
        got = bytearray()
        while n := r.readinto(buf):
            got += buf[:n]
        assert got == want
        for _ in range(400):
            off = rng.randrange(len(want))
            n = rng.choice((1, 511, 4096, 65537, rng.randrange(1, 3 * MiB)))
            r.seek(off)
            if rng.random() < 0.5:
                assert r.read(n) == want[off : off + n], (off, n)
            else:
                b = bytearray(n)
                got_n = r.readinto(memoryview(b))
                assert b[:got_n] == want[off : off + got_n], (off, n)


def test_readinto_other_buffer_types(chain: Path, mode: str, tmp_path: Path) -> None:
    """array, a non-byte memoryview and a read-only buffer behave as before."""
    import array

    want = qemu.convert_raw(chain, tmp_path / "want.raw").read_bytes()
    with pyqcow.open(chain) as img:
        r = img.reader()
        a = array.array("I", bytes(64 * KiB))
        r.seek(512 * KiB - 4 * KiB)
        assert r.readinto(a) == 64 * KiB
        assert a.tobytes() == want[508 * KiB : 572 * KiB]
        r.seek(0)
        with pytest.raises(BufferError, match="not writable"):
            r.readinto(b"read-only")


def test_overlay_over_raw_backing_falls_back_for_the_backing(tmp_path: Path, mode: str) -> None:
    base = qemu.create(tmp_path / "base.raw", 2 * MiB, fmt="raw")
    qemu.qemu_io(base, "write -P 0x66 64k 1M", fmt="raw")
    top = qemu.create(tmp_path / "top.qcow2", 2 * MiB, backing="base.raw", backing_fmt="raw",
                      cwd=tmp_path)
    qemu.qemu_io(top, "write -P 0x77 512k 64k")
    want = qemu.convert_raw(top, tmp_path / "want.raw").read_bytes()
    with pyqcow.open(top) as img:
        r = img.reader()
        assert (r._gmap is not None) == (mode == "native")
        assert r.read() == want


def test_writable_image_is_not_mapped(chain: Path, mode: str) -> None:
    with pyqcow.open(chain, "r+") as img:
        assert img.guest_map() is None
        r = img.reader()
        img.write(0, b"\x99" * 4096)
        assert r.read(4096) == b"\x99" * 4096


@pytest.mark.parametrize("how", ["readinto", "read", "readall"])
def test_truncated_file_is_a_clean_qcow_error(chain: Path, mode: str, how: str) -> None:
    """The file shrinks while a reader has it open (and mapped): reading the
    lost data clusters raises QcowError, never SIGBUS."""
    with pyqcow.open(chain) as img:
        r = img.reader()
        r.seek(512 * KiB)
        assert r.read(4096) == b"\x33" * 4096  # the mapping is live
        size = os.path.getsize(chain)
        os.truncate(chain, 3 * 64 * KiB)
        r.seek(512 * KiB)
        with pytest.raises(QcowError, match=r"the file shrank to 196608 bytes while being read "
                                            rf"\(it had {size} bytes when opened\)"):
            if how == "readinto":
                r.readinto(bytearray(64 * KiB))
            elif how == "read":
                r.read(4096)
            else:
                r.readall()
        # the interpreter is still fine, and the reader still answers
        r.seek(0)
        assert r.tell() == 0


def test_closing_the_image_unmaps_and_the_reader_refuses(chain: Path, mode: str) -> None:
    img = pyqcow.open(chain)
    r = img.reader()
    gm = r._gmap
    img.close()
    if gm is not None:
        assert gm.ctx is None
        assert img.backing is not None
    r.seek(512 * KiB)
    with pytest.raises(OSError):
        r.read(4096)


def test_closing_the_backing_unmaps_its_overlays(chain: Path) -> None:
    """No C handle outlives the backing handle it reads through."""
    require_native()
    with fastcopy.backend("native"), pyqcow.open(chain) as img:
        top_map = img.guest_map()
        assert top_map is not None and top_map.ctx is not None
        img.backing.close()
        assert top_map.ctx is None
        assert img.reader()._gmap is None


def test_guest_map_readinto_checks_its_arguments(chain: Path) -> None:
    require_native()
    with fastcopy.backend("native"), pyqcow.open(chain) as img:
        gm = img.guest_map()
        buf = bytearray(4096)
        assert gm.readinto(buf, 512 * KiB) is True
        assert buf == b"\x33" * 4096
        assert gm.readinto(buf, 7 * MiB) is False  # compressed: the caller reads it
        assert gm.readinto(buf, 8 * MiB - 4096 + 1) is False  # past the end: the caller's job
        with pytest.raises(ValueError, match="offset must be >= 0"):
            gm.readinto(buf, -1)
        with pytest.raises(TypeError, match="writable"):
            gm.readinto(b"x" * 10, 0)


# -- pread / preadinto: the one-call API (pyqcow._mapread, or cffi without it) -------
@pytest.fixture(params=["mapread", "cffi", "python"])
def path_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The CPython shim pyqcow._mapread, the cffi stand-in (_CffiReader) and the
    pure-Python path (no map at all)."""
    from pyqcow import guestmap

    if request.param == "python":
        fastcopy.native_available()
        monkeypatch.setattr(fastcopy, "_native", _NoNative())
        with fastcopy.backend("python"):
            yield "python"
        return
    require_native()
    if request.param == "mapread":
        if guestmap._load_mapread() is None:
            message = "pyqcow._mapread is not built"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    else:
        monkeypatch.setattr(guestmap, "_mapread", None)
        monkeypatch.setattr(guestmap, "_mapread_tried", True)
    with fastcopy.backend("native"):
        yield request.param


def _fast_type(img) -> str:
    gm = img.reader()._gmap
    return "python" if gm is None else ("cffi" if type(gm.fast).__name__ == "_CffiReader"
                                         else "mapread")


def test_pread_and_preadinto_equal_qemu(chain: Path, path_kind: str, tmp_path: Path) -> None:
    """Random ranges (inside clusters, straddling them, over the compressed
    cluster, over the end of the base and of the disk): the bytes qemu reads;
    the position never moves."""
    want = qemu.convert_raw(chain, tmp_path / "want.raw").read_bytes()
    rng = random.Random(4096)
    with pyqcow.open(chain) as img:
        assert _fast_type(img) == path_kind
        r = img.reader()
        r.seek(1234)
        edges = [0, 64 * KiB - 100, 6 * MiB - 300, 7 * MiB - 10, 8 * MiB - 4096, 8 * MiB - 1]
        cases = [(off, n) for off in edges for n in (1, 200, 4096, 70000)]
        cases += [(rng.randrange(len(want)), rng.choice((512, 4096, 65536, 300000)))
                  for _ in range(300)]
        buf = bytearray(300000)
        for off, n in cases:
            assert r.pread(n, off) == want[off : off + n], (off, n)
            view = memoryview(buf)[:n]
            got = r.preadinto(view, off)
            assert got == min(n, len(want) - off) and view[:got] == want[off : off + got]
        assert r.tell() == 1234
        assert r.pread(4096, len(want)) == b"" and r.pread(0, 0) == b""
        assert r.preadinto(bytearray(10), len(want) + 5) == 0


def test_pread_checks_its_arguments(chain: Path, path_kind: str) -> None:
    with pyqcow.open(chain) as img:
        r = img.reader()
        with pytest.raises(ValueError, match="offset must be >= 0"):
            r.pread(10, -1)
        with pytest.raises(ValueError, match="size must be >= 0"):
            r.pread(-1, 0)
        with pytest.raises(ValueError, match="offset must be >= 0"):
            r.preadinto(bytearray(10), -1)
        with pytest.raises(TypeError):
            r.pread(10, 1.5)
        with pytest.raises((TypeError, BufferError)):
            r.preadinto(b"read-only", 512 * KiB)
        with pytest.raises(TypeError, match="C-contiguous"):
            r.preadinto(memoryview(bytearray(20))[::2], 512 * KiB)
        a = bytearray(8)
        r.close()
        with pytest.raises(ValueError, match="closed file"):
            r.pread(10, 0)
        with pytest.raises(ValueError, match="closed file"):
            r.preadinto(a, 0)
        with pytest.raises(ValueError, match="closed file"):
            r.readinto(a)


def test_seek_readinto_and_read_through_the_one_call_path(chain: Path, path_kind: str,
                                                          tmp_path: Path) -> None:
    want = qemu.convert_raw(chain, tmp_path / "want.raw").read_bytes()
    with pyqcow.open(chain) as img:
        r = img.reader()
        buf = bytearray(100000)
        got = bytearray()
        while n := r.readinto(buf):
            got += buf[:n]
        assert got == want and r.tell() == len(want)
        r.seek(7 * MiB - 5)
        assert r.read(70000) == want[7 * MiB - 5 : 7 * MiB - 5 + 70000]
        assert r.tell() == 7 * MiB - 5 + 70000


def test_the_image_closed_under_a_reader_refuses_pread(chain: Path, path_kind: str) -> None:
    img = pyqcow.open(chain)
    r = img.reader()
    img.close()
    with pytest.raises((OSError, ValueError)):
        r.pread(4096, 512 * KiB)
    with pytest.raises((OSError, ValueError)):
        r.preadinto(bytearray(4096), 512 * KiB)


def test_the_fast_reader_holds_the_image_weakly(chain: Path, path_kind: str) -> None:
    """GuestMap.fast reaches the image only through a weak reference, and a
    closed map sends every read to Python, which then says the file is closed."""
    import gc
    import weakref

    if path_kind == "python":
        return
    img = pyqcow.open(chain)
    fast = img.guest_map().fast
    assert fast.pread(4, 512 * KiB) == b"\x33" * 4
    ref = weakref.ref(img)
    img.close()
    assert fast.closed
    del img
    gc.collect()
    assert ref() is None
    with pytest.raises(ValueError, match="closed file"):
        fast.pread(10, 0)
    with pytest.raises(ValueError, match="closed file"):
        fast.preadinto(bytearray(10), 0)


_TRUNCATE_CHILD = r"""
import os, sys
import pyqcow
from pyqcow import fastcopy
from pyqcow.errors import QcowError
path, how = sys.argv[1], sys.argv[2]
with fastcopy.backend("native"), pyqcow.open(path) as img:
    r = img.reader()
    assert r._gmap is not None, "not mapped"
    assert r.pread(4096, 512 * 1024) == b"\x33" * 4096
    os.truncate(path, 3 * 65536)
    try:
        if how == "pread":
            r.pread(65536, 512 * 1024)
        elif how == "preadinto":
            r.preadinto(bytearray(65536), 512 * 1024)
        else:
            r.seek(512 * 1024)
            r.readinto(bytearray(65536))
    except QcowError as e:
        print("QcowError:", e)
    else:
        print("no error")
    r.seek(0)  # the interpreter and the reader still answer
    assert r.tell() == 0
    print("alive")
"""


@pytest.mark.parametrize("how", ["pread", "preadinto", "readinto"])
def test_truncated_file_in_a_subprocess_is_a_qcow_error_not_a_crash(chain: Path, how: str,
                                                                    tmp_path: Path) -> None:
    """The file shrinks under a live mapping, in a child process so that a
    SIGBUS that got through would show as the child's death, not ours."""
    import subprocess
    import sys

    require_native()
    child = tmp_path / "child.py"
    child.write_text(_TRUNCATE_CHILD)
    repo = Path(pyqcow.__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(child), str(chain), how], capture_output=True,
                          text=True, timeout=120, cwd=repo,
                          env=dict(os.environ, PYTHONPATH=str(repo)))
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "QcowError:" in proc.stdout and "the file shrank to 196608 bytes" in proc.stdout
    assert proc.stdout.rstrip().endswith("alive")


def test_pread_over_raw_images_and_internal_snapshots(tmp_path: Path) -> None:
    """Readers without a map (RawImage, SnapshotView) have pread/preadinto too."""
    raw = qemu.create(tmp_path / "d.raw", 1 * MiB, fmt="raw")
    qemu.qemu_io(raw, "write -P 0x61 4k 8k", fmt="raw")
    img_path = qemu.create(tmp_path / "s.qcow2", 1 * MiB)
    qemu.qemu_io(img_path, "write -P 0x62 0 64k")
    qemu.qemu_img("snapshot", "-c", "snap", img_path)
    qemu.qemu_io(img_path, "write -P 0x63 0 64k")
    with pyqcow.open(raw) as img:
        r = img.reader()
        assert r.pread(8, 4 * KiB - 4) == b"\0" * 4 + b"\x61" * 4
        buf = bytearray(6)
        assert r.preadinto(buf, MiB - 2) == 2 and buf[:2] == b"\0\0"
    with pyqcow.open(img_path) as img:
        assert img.reader().pread(3, 10) == b"\x63" * 3
        r = img.snapshot("snap").reader()
        assert r.pread(3, 10) == b"\x62" * 3
        assert r.pread(5, MiB - 2) == b"\0\0"
