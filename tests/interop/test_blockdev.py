"""qcow2 images on block devices (issue 15): loop devices stand in for LVM logical
volumes.  The device size comes from BLKGETSIZE64 (``fstat`` says 0), a device is
never truncated or punched, and an image that outgrows its device gets a clear
"no space left on block device" error naming it.  qemu-img / qemu-io read and
check the same device.

Needs root and ``losetup`` (skipped elsewhere; a failure under CI).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import qemu
from qemu import check_json, compare, create, info_json, need, qemu_img, qemu_io

import pyqcow
from pyqcow.cli.main import main as cli
from pyqcow.hostfile import HostFile

KiB = 1024
MiB = 1024 * KiB



@pytest.fixture(autouse=True)
def _tools() -> None:
    qemu.require_tool("qemu-img")
    qemu.require_tool("qemu-io")


@pytest.fixture
def loopdev(tmp_path: Path):
    """Factory: a loop device of ``size`` bytes over a file full of 0xaa (old data)."""
    need(os.geteuid() == 0, "loop devices need root")
    losetup = shutil.which("losetup")
    need(losetup is not None, "losetup is not installed")
    made: list[str] = []

    def make(size: int) -> Path:
        backing = tmp_path / f"lv{len(made)}.img"
        with open(backing, "wb") as f:
            f.write(b"\xaa" * size)
        proc = subprocess.run([losetup, "--find", "--show", str(backing)],
                              capture_output=True, text=True, check=False)
        need(proc.returncode == 0, f"cannot set up a loop device: {proc.stderr.strip()}")
        made.append(proc.stdout.strip())
        return Path(made[-1])

    yield make
    for dev in made:
        subprocess.run([losetup, "-d", dev], check=False)


def run(capsys, *argv) -> tuple[int, str, str]:
    status = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_hostfile_sizes_a_device_with_blkgetsize64(loopdev) -> None:
    dev = loopdev(8 * MiB)
    assert os.stat(dev).st_size == 0
    with HostFile(dev) as hf:
        assert hf.is_block_device and hf.size() == 8 * MiB
    with HostFile(dev, writable=True) as hf:
        hf.truncate(4 * MiB)  # never shrinks a device: a no-op
        assert hf.size() == 8 * MiB
        assert not hf.punch_hole(0, MiB)  # never discards a device's blocks
        with pytest.raises(pyqcow.QcowError, match=r"no space left on block device: the image "
                                                   r"needs 9437184 bytes, the device holds 8388608"):
            hf.truncate(9 * MiB)
        with pytest.raises(pyqcow.QcowError, match=f"{dev}: no space left on block device"):
            hf.pwrite(b"x" * 4096, 8 * MiB - 2048)


def test_chain_on_a_device(loopdev, tmp_path: Path, capsys) -> None:
    """create, write, commit into the device, stream from it, check; qemu reads along."""
    dev = loopdev(64 * MiB)
    status, _, err = run(capsys, "create", "-f", "qcow2", dev, "32M")
    assert (status, err) == (0, "")
    assert info_json(dev)["virtual-size"] == 32 * MiB
    with pyqcow.open(dev, "r+") as img:
        img.write(0, b"\x11" * (2 * MiB))
        img.write(8 * MiB, b"\x12" * MiB)
    qemu_io(dev, "read -P 0x11 0 2M", "read -P 0 2M 6M", "read -P 0x12 8M 1M",
            "read -P 0 9M 23M")
    assert check_json(dev)[1] == 0
    assert run(capsys, "check", dev)[0] == 0
    # an overlay file on the device; commit it into the device
    top = create(tmp_path / "top.qcow2", None, backing=dev, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x21 1M 2M", "write -P 0x22 20M 1M")
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", top, ref)
    status, _, err = run(capsys, "commit", top)
    assert (status, err) == (0, "")
    assert compare(ref, dev, fmt_a="raw") == 0
    assert check_json(dev)[1] == 0
    # stream from the device into a new overlay
    top2 = create(tmp_path / "top2.qcow2", None, backing=dev, backing_fmt="qcow2")
    qemu_io(top2, "write -P 0x31 5M 64k")
    qemu_img("convert", "-O", "raw", top2, ref)
    status, _, err = run(capsys, "stream", top2)
    assert (status, err) == (0, "")
    assert info_json(top2).get("backing-filename") is None
    assert compare(ref, top2, fmt_a="raw") == 0
    assert check_json(top2)[1] == 0
    # the device image is still clean, for both checkers, and the device kept its size
    assert check_json(dev)[1] == 0 and run(capsys, "check", dev)[0] == 0
    with HostFile(dev) as hf:
        assert hf.size() == 64 * MiB


def test_image_outgrowing_its_device(loopdev, tmp_path: Path, capsys) -> None:
    dev = loopdev(4 * MiB)
    qemu_img("create", "-q", "-f", "qcow2", dev, "64M")
    data = bytes(range(256)) * 4096  # 1 MiB, not zeros
    img = pyqcow.open(dev, "r+")
    img.write(0, data)
    img.flush()
    with pytest.raises(pyqcow.QcowError, match=f"{dev}: no space left on block device"):
        for i in range(1, 8):
            img.write(i * MiB, data)
            img.flush()
    # the allocation that did not fit cannot be flushed on close either; nothing of it
    # reached the device
    with pytest.raises(pyqcow.QcowError, match="no space left on block device"):
        img.close()
    with pyqcow.open(dev) as img:
        assert img.read(0, MiB) == data
    result, status = check_json(dev)
    assert status in (0, 3) and not result.get("corruptions")
    # the CLI says it in one line
    src = create(tmp_path / "big.qcow2", 64 * MiB)
    qemu_io(src, "write -P 0x5a 0 8M")
    status, out, err = run(capsys, "convert", "-n", "-O", "qcow2", src, dev)
    assert (status, out) == (1, "")
    assert err.startswith(f"pyqcow: {dev}: no space left on block device: the image needs ")
    assert err.endswith("the device holds 4194304 (grow the device, e.g. lvextend)\n")
    assert check_json(dev)[0].get("corruptions", 0) == 0


def test_convert_into_a_device(loopdev, tmp_path: Path, capsys) -> None:
    """convert -n -O raw / qcow2 onto a device (how images reach an LV)."""
    src = create(tmp_path / "src.qcow2", 8 * MiB)
    qemu_io(src, "write -P 0x41 0 1M", "write -P 0x42 6M 512k")
    raw_dev = loopdev(8 * MiB)
    status, _, err = run(capsys, "convert", "-n", "-O", "raw", src, raw_dev)
    assert (status, err) == (0, "")
    assert compare(src, raw_dev, fmt_b="raw") == 0  # the 0xaa garbage was zeroed
    qdev = loopdev(16 * MiB)
    qemu_img("create", "-q", "-f", "qcow2", qdev, "8M")
    status, _, err = run(capsys, "convert", "-n", "--target-is-zero", "-W", "-m", "4",
                         "-O", "qcow2", src, qdev)
    assert (status, err) == (0, "")
    assert compare(src, qdev) == 0 and check_json(qdev)[1] == 0
    digest = hashlib.sha256(raw_dev.read_bytes()[: 8 * MiB]).hexdigest()
    assert digest == hashlib.sha256(_raw(src, tmp_path)).hexdigest()


def _raw(src: Path, d: Path) -> bytes:
    out = d / "src.raw"
    qemu_img("convert", "-O", "raw", src, out)
    return out.read_bytes()


def test_merge_with_a_device(loopdev, tmp_path: Path, capsys) -> None:
    """merge --keep base into a device works (commit, no rename); anything that would
    remove or rename the device node is refused (a device is not a file to unlink)."""
    dev = loopdev(32 * MiB)
    qemu_img("create", "-q", "-f", "qcow2", dev, "16M")
    qemu_io(dev, "write -P 0x11 0 4M")
    top = create(tmp_path / "top.qcow2", None, backing=dev, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x22 1M 1M")
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", top, ref)
    for argv in (("--keep", "top"), ("--keep", "base", "--via", "stream")):
        status, out, err = run(capsys, "merge", "--dry-run", *argv, top)
        assert status == 1, argv
        assert f"{dev}: is a block device" in out + err
    status, out, err = run(capsys, "merge", "--keep", "top", top)
    assert status == 1 and dev.exists() and top.exists()
    status, _, err = run(capsys, "merge", "--keep", "base", top)
    assert (status, err) == (0, "")
    assert dev.exists() and not top.exists()
    assert compare(ref, dev, fmt_a="raw") == 0
    assert check_json(dev)[1] == 0
