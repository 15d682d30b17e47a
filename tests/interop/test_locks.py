"""QEMU-compatible image locks, both directions, against real qemu-io/qemu-img processes.

qemu takes OFD locks on bytes 100+i (permission i used) and 200+i (permission i
not shared); pyqcow does the same (hostfile.py).  A qemu-io kept running with
its stdin on a pipe stands in for a VM holding the image.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import qemu
from qemu import create, qemu_io

import pyqcow

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    qemu.require_tool("qemu-img")
    qemu.require_tool("qemu-io")


@contextmanager
def running_qemu_io(path: Path, *flags: str) -> Iterator[subprocess.Popen]:
    """qemu-io holding ``path`` open (interactive, commands on stdin)."""
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", *flags, os.fspath(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, LC_ALL="C"),
    )
    try:
        # a round trip proves the image is open (and locked) before we go on
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert "read 512/512" in line, line
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _qemu(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=60,
        env=dict(os.environ, LC_ALL="C"), stdin=subprocess.DEVNULL, check=False,
    )


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = create(tmp_path / "locked.qcow2", 4 * MiB)
    qemu_io(p, "write -P 0x3c 0 64k")
    return p


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_qemu_writer_blocks_pyqcow(image: Path) -> None:
    with running_qemu_io(image):
        before = _sha(image)
        with pytest.raises(pyqcow.ImageLockedError, match="in use") as exc:
            pyqcow.open(image, "r+")
        assert str(image) in str(exc.value)
        with pytest.raises(pyqcow.ImageLockedError) as exc:
            pyqcow.open(image)  # read-only, without force_share
        assert str(image) in str(exc.value)
        assert "force_share" in str(exc.value) or "-U" in str(exc.value)
        with pyqcow.open(image, force_share=True) as img:
            assert img.read(0, 64 * KiB) == b"\x3c" * 64 * KiB
        assert _sha(image) == before
    # qemu-io gone: the locks went with it
    with pyqcow.open(image, "r+") as img:
        img.write(0, b"free")


def test_qemu_reader_blocks_pyqcow_writer_not_reader(image: Path) -> None:
    with running_qemu_io(image, "-r"):
        with pytest.raises(pyqcow.ImageLockedError, match=str(image)):
            pyqcow.open(image, "r+")
        with pyqcow.open(image) as img:  # readers share
            assert img.read(0, 4) == b"\x3c" * 4


def test_pyqcow_writer_blocks_qemu(image: Path) -> None:
    with pyqcow.open(image, "r+") as img:
        img.write(64 * KiB, b"p" * 4096)
        img.flush()
        w = _qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4k", os.fspath(image))
        assert w.returncode != 0
        assert 'Failed to get "write" lock' in w.stderr + w.stdout, w
        info = _qemu("qemu-img", "info", os.fspath(image))
        assert info.returncode != 0
        assert 'Failed to get shared "write" lock' in info.stderr, info
        info_u = _qemu("qemu-img", "info", "-U", os.fspath(image))
        assert info_u.returncode == 0, info_u.stderr
        # another pyqcow writer is refused too
        with pytest.raises(pyqcow.ImageLockedError):
            pyqcow.open(image, "r+")
    assert _qemu("qemu-img", "info", os.fspath(image)).returncode == 0


def test_pyqcow_reader_lets_qemu_read_not_write(image: Path) -> None:
    with pyqcow.open(image) as img:
        assert img.read(0, 2) == b"\x3c\x3c"
        info_u = _qemu("qemu-img", "info", "-U", os.fspath(image))
        assert info_u.returncode == 0, info_u.stderr
        info = _qemu("qemu-img", "info", os.fspath(image))
        assert info.returncode == 0, info.stderr
        r = _qemu("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x3c 0 4k", os.fspath(image))
        assert r.returncode == 0, r.stderr
        w = _qemu("qemu-io", "-f", "qcow2", "-c", "write 0 4k", os.fspath(image))
        assert w.returncode != 0
        assert 'Failed to get "write" lock' in w.stderr + w.stdout, w


def test_locks_released_on_failed_open(tmp_path: Path) -> None:
    """An open that fails after locking (bad header) leaves no lock behind."""
    p = create(tmp_path / "bad.qcow2", 1 * MiB)
    with open(p, "r+b") as f:
        f.seek(72)
        f.write((1 << 9).to_bytes(8, "big"))  # unknown incompatible bit
    with pytest.raises(pyqcow.UnsupportedFeatureError):
        pyqcow.open(p, "r+")
    r = _qemu("qemu-io", "-f", "qcow2", "-c", "read 0 512", os.fspath(p))
    assert "Failed to get" not in r.stderr + r.stdout, r


@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
def test_convert_refuses_destination_in_use(image: Path, tmp_path: Path, out_fmt: str) -> None:
    """convert never truncates an image a running qemu holds."""
    from pyqcow.cli.main import main as cli

    dst = create(tmp_path / "busy.qcow2", 1 * MiB)
    before = _sha(dst)
    with running_qemu_io(dst):
        assert cli(["convert", "-O", out_fmt, str(image), str(dst)]) == 1
    assert _sha(dst) == before
    assert cli(["convert", "-O", out_fmt, str(image), str(dst)]) == 0
