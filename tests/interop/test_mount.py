"""``pyqcow mount``: a read-only FUSE mount (pyqcow/fuse.py, pyqcow/cli/mount.py).

Mounted files are compared byte for byte with ``qemu-img convert``; the guest
ext2 file system on disk.raw is mounted with ``mount -o ro,loop`` and a file in
it is read.  Needs root, /dev/fuse and mfusepy: skipped with the reason where
FUSE is absent; under CI, a machine that could mount (root, /dev/fuse) but lacks
a tool fails instead.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from qemu import QemuError, convert_raw, need, qemu_img, qemu_io, require_tool

from pyqcow.cli.main import main

FS_SIZE = 8 << 20
PYQCOW = [sys.executable, "-m", "pyqcow.cli.main"]


def _need_fuse() -> None:
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not root")
    if not os.path.exists("/dev/fuse"):
        reasons.append("no /dev/fuse")
    need(not reasons, "FUSE is absent here: " + ", ".join(reasons))
    _need_mfusepy()
    for tool in ("mount", "umount", "fusermount3", "mkfs.ext2", "qemu-img", "qemu-io"):
        require_tool(tool)


def _mkfs_ext2(raw: Path, root: Path) -> None:
    with open(raw, "wb") as f:
        f.truncate(FS_SIZE)
    subprocess.run(["mkfs.ext2", "-q", "-F", "-b", "1024", "-d", str(root), str(raw)],
                   check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def evidence(tmp_path_factory) -> dict:
    """base (zstd-compressed ext2) <- top (overlay, one internal snapshot) + expectations."""
    _need_fuse()
    d = tmp_path_factory.mktemp("mount")
    r1, r2 = d / "r1", d / "r2"
    r1.mkdir()
    (r1 / "hello.txt").write_bytes(b"hello from the guest file system\n")
    (r1 / "big.bin").write_bytes(os.urandom(1 << 20))
    _mkfs_ext2(d / "v1.raw", r1)
    r2.mkdir()
    for p in r1.iterdir():
        (r2 / p.name).write_bytes(p.read_bytes())
    (r2 / "evidence.txt").write_bytes(b"written in the overlay\n" * 100)
    _mkfs_ext2(d / "v2.raw", r2)
    zstd = ("-c", "-O", "qcow2", "-o", "compression_type=zstd")
    qemu_img("convert", "-q", "-f", "raw", *zstd, "v1.raw", "base.qcow2", cwd=d)
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2",
             "v2.raw", "top.qcow2", cwd=d)
    qemu_img("snapshot", "-c", "before tail", d / "top.qcow2")
    qemu_io(d / "top.qcow2", f"write -P 0xe7 {FS_SIZE - 65536} 64k")  # after the snapshot
    exp = d / "expected"
    exp.mkdir()
    convert_raw(d / "top.qcow2", exp / "disk.raw")
    convert_raw(d / "top.qcow2", exp / "snap.raw", snapshot="before tail")
    for name in ("top", "base"):  # each layer alone: qemu with the backing cut off
        spec = {"driver": "qcow2", "backing": None,
                "file": {"driver": "file", "filename": str(d / f"{name}.qcow2")}}
        qemu_img("convert", "-O", "raw", "json:" + json.dumps(spec), exp / f"{name}.raw")
    # the evidence's times: atime older than mtime, so a plain read would update it
    for name in ("top.qcow2", "base.qcow2"):
        st = os.stat(d / name)
        os.utime(d / name, ns=(st.st_mtime_ns - 3600 * 10**9, st.st_mtime_ns))
    return {"dir": d, "top": d / "top.qcow2", "base": d / "base.qcow2", "exp": exp}


class Mounted:
    def __init__(self, image: Path, mnt: Path, *args: str) -> None:
        mnt.mkdir(exist_ok=True)
        self.mnt = mnt
        self.proc = subprocess.Popen([*PYQCOW, "mount", *args, str(image), str(mnt)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                out, err = self.proc.communicate()
                raise AssertionError(f"pyqcow mount did not mount: rc={self.proc.returncode} {err}")
            time.sleep(0.02)

    def wait(self, timeout: float = 30) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def cleanup(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _read_chunks(path: Path, step: int = 1 << 20) -> bytes:
    out = bytearray()
    with open(path, "rb") as f:
        while chunk := f.read(step):
            out += chunk
    return bytes(out)


def test_mount_serves_disk_snapshots_layers_and_the_guest_fs(evidence, tmp_path):
    d, exp = evidence["dir"], evidence["exp"]
    times = {n: os.stat(d / n) for n in ("top.qcow2", "base.qcow2")}
    m = Mounted(evidence["top"], tmp_path / "mnt", "--snapshots", "--layers")
    guest = tmp_path / "guest"
    guest.mkdir()
    try:
        mnt = m.mnt
        assert sorted(os.listdir(mnt)) == ["disk.raw", "layers", "snapshots"]
        assert os.listdir(mnt / "snapshots") == ["before tail.raw"]
        assert sorted(os.listdir(mnt / "layers")) == ["0-top.qcow2.raw", "1-base.qcow2.raw"]
        st = os.stat(mnt / "disk.raw")
        assert st.st_size == FS_SIZE and st.st_mode & 0o777 == 0o444
        assert st.st_mtime_ns == times["top.qcow2"].st_mtime_ns
        # byte for byte against qemu-img convert
        assert _read_chunks(mnt / "disk.raw") == (exp / "disk.raw").read_bytes()
        assert _read_chunks(mnt / "snapshots" / "before tail.raw") == (exp / "snap.raw").read_bytes()
        assert _read_chunks(mnt / "layers" / "0-top.qcow2.raw") == (exp / "top.raw").read_bytes()
        assert _read_chunks(mnt / "layers" / "1-base.qcow2.raw") == (exp / "base.raw").read_bytes()
        # read-only: no writing, no truncating, no new files
        with pytest.raises(OSError) as ei:
            open(mnt / "disk.raw", "r+b")
        assert ei.value.errno == errno.EROFS
        with pytest.raises(OSError) as ei:
            open(mnt / "new.raw", "wb")
        assert ei.value.errno == errno.EROFS
        # concurrent readers: threads and another process at random offsets
        want = (exp / "disk.raw").read_bytes()
        errors = []

        def reader(seed: int) -> None:
            rnd = random.Random(seed)
            with open(mnt / "disk.raw", "rb", buffering=0) as f:
                for _ in range(200):
                    off = rnd.randrange(FS_SIZE)
                    n = rnd.randrange(1, 300000)
                    if os.pread(f.fileno(), n, off) != want[off : off + n]:
                        errors.append((off, n))

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        other = subprocess.Popen(["sha256sum", str(mnt / "disk.raw")], stdout=subprocess.PIPE)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        import hashlib

        assert other.communicate(timeout=60)[0].split()[0].decode() == hashlib.sha256(want).hexdigest()
        # QEMU's locks: a writer is refused while the image is mounted
        with pytest.raises(QemuError, match="lock"):
            qemu_io(evidence["top"], "write 0 512")
        # the guest file system, mounted read-only from disk.raw
        subprocess.run(["mount", "-o", "ro,loop", str(mnt / "disk.raw"), str(guest)],
                       check=True, capture_output=True, timeout=60)
        try:
            assert (guest / "hello.txt").read_bytes() == b"hello from the guest file system\n"
            assert (guest / "evidence.txt").read_bytes() == b"written in the overlay\n" * 100
        finally:
            subprocess.run(["umount", str(guest)], check=True, timeout=60)
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True, timeout=60)
        rc, err = m.wait()
        assert rc == 0, err
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(guest):
            subprocess.run(["umount", "-l", str(guest)], check=False)
        m.cleanup()
    # the evidence is unchanged: no write, same atime and mtime
    for n, before in times.items():
        after = os.stat(d / n)
        assert (after.st_atime_ns, after.st_mtime_ns, after.st_size) == (
            before.st_atime_ns, before.st_mtime_ns, before.st_size), n
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", exp / "disk.raw", evidence["top"])


def test_ctrl_c_unmounts_cleanly(evidence, tmp_path):
    m = Mounted(evidence["top"], tmp_path / "mnt")
    try:
        assert (m.mnt / "disk.raw").stat().st_size == FS_SIZE
        m.proc.send_signal(signal.SIGINT)
        rc, err = m.wait()
        assert rc == 0, err
        assert not os.path.ismount(m.mnt)
        assert "Traceback" not in err
    finally:
        m.cleanup()
    # no stale mount and no lock left: a writer may open the image again
    qemu_io(evidence["top"], "read 0 512")


def test_daemon_mode_with_page_cache_returns_and_fusermount_unmounts(evidence, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([*PYQCOW, "mount", "-d", "--page-cache", str(evidence["top"]),
                           str(mnt)], capture_output=True, text=True, timeout=60)
    try:
        assert proc.returncode == 0, proc.stderr
        assert os.path.ismount(mnt)
        want = (evidence["exp"] / "disk.raw").read_bytes()
        assert _read_chunks(mnt / "disk.raw", 12345) == want
        with open(mnt / "disk.raw", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[FS_SIZE - 70000 :] == want[FS_SIZE - 70000 :]  # mmap needs the page cache
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, capture_output=True,
                       timeout=60)
        deadline = time.monotonic() + 10
        while os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- refusals: checked before anything is mounted (in-process, no FUSE needed) --------
def _need_mfusepy() -> None:
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        need(False, f"mfusepy / libfuse3 not usable ({e}); tools/_setup.sh installs them")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_mount_refuses_a_missing_mountpoint(capsys, tmp_path):
    _need_mfusepy()
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    status, out, err = _run(capsys, "mount", str(img), str(tmp_path / "nowhere"))
    assert status == 1 and out == ""
    assert err == f"pyqcow: {tmp_path / 'nowhere'}: mount point does not exist\n"
    status, out, err = _run(capsys, "mount", str(img), str(img))
    assert err == f"pyqcow: {img}: mount point is not a directory\n"


def test_mount_refuses_a_missing_image(capsys, tmp_path):
    _need_mfusepy()
    need(os.path.exists("/dev/fuse"), "FUSE is absent here: no /dev/fuse")
    status, out, err = _run(capsys, "mount", str(tmp_path / "missing.qcow2"), str(tmp_path))
    assert status == 1 and out == ""
    assert err.startswith(f"pyqcow: {tmp_path / 'missing.qcow2'}: ") and "no such file" in err
    assert not os.path.ismount(tmp_path)


def test_mount_without_mfusepy_says_what_to_install(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mfusepy", None)  # import mfusepy -> ImportError
    status, out, err = _run(capsys, "mount", "x.qcow2", str(tmp_path))
    assert status == 1
    assert err.startswith("pyqcow: pyqcow mount needs mfusepy: pip install 'pyqcow[fuse]'")


def test_a_corrupt_cluster_reads_as_eio_and_the_mount_lives_on(tmp_path):
    _need_fuse()
    import pyqcow

    img = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x61 0 64k", "write -P 0x62 1M 64k")
    with pyqcow.open(img) as im:
        l2 = im.l1[0] & ((1 << 56) - 1) & ~511
    with open(img, "r+b") as f:  # the second cluster's L2 entry points far past the end
        f.seek(l2 + 8 * (1 << 20) // 65536)
        f.write((1 << 63 | 1 << 40).to_bytes(8, "big"))
    m = Mounted(img, tmp_path / "mnt")
    try:
        fd = os.open(m.mnt / "disk.raw", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == b"\x61" * 4096
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, 1 << 20)
            assert ei.value.errno == errno.EIO
            assert os.pread(fd, 4096, 8192) == b"\x61" * 4096  # still serving
        finally:
            os.close(fd)
        subprocess.run(["umount", str(m.mnt)], check=True, timeout=60)
        rc, err = m.wait()
        assert rc == 0 and "Traceback" not in err
    finally:
        m.cleanup()
