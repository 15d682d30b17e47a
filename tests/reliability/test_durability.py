"""Durability details: every write fsynced before an operation returns, a directory
fsync after every rename/unlink, close-on-exec on every file descriptor, no temp
files left behind after a failure (libvirt XML written atomically)."""

from __future__ import annotations

import errno
import os
import stat

import crashkit
import pytest
import scenarios
from test_crash_inject import fixed_chain

OPS = ["commit", "commit-b", "stream", "stream-b", "rebase", "rebase-u",
       "merge-base-commit", "merge-base-stream", "merge-top-commit", "merge-top-stream",
       "convert", "writes", "snapshot-create", "snapshot-delete"]


class _FdWatcher(crashkit.Injector):
    """At every fault point: each fd opened since the start must be close-on-exec."""

    def __init__(self, before: set[int]):
        super().__init__(mode="count", journal=True, stash=None)
        self.before = before
        self.leaky: list[str] = []

    def _point(self, kind: str) -> None:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in self.before:
                continue
            try:
                if os.get_inheritable(fd):
                    self.leaky.append(f"{kind}: fd {fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                pass
        super()._point(kind)


@pytest.mark.parametrize("name", OPS)
def test_everything_durable_and_cloexec(name, tmp_path):
    d = tmp_path / "chain"
    d.mkdir()
    ch = fixed_chain(str(d))
    sc = scenarios.build(name, ch)
    work = str(tmp_path / "work")
    crashkit.copy_dir(ch.directory, work)
    inj = _FdWatcher(set(int(n) for n in os.listdir("/proc/self/fd")))
    with inj:
        sc.op(work)
    assert not inj.leaky, inj.leaky
    # nothing written after its file's last fsync ...
    pending = {k: len(v) for k, v in inj.files.items() if v}
    if name == "convert":  # the raw output's dentry is new: see below
        pass
    assert not pending, f"{name}: un-fsynced writes at return: {pending}"
    # ... and no rename/unlink without an fsync of its directory afterwards
    assert not inj.dirops, f"{name}: directory not fsynced after {inj.dirops}"


def test_libvirt_write_atomic_durable(tmp_path):
    from pyqcow.libvirt import write_atomic

    target = tmp_path / "dom.xml"
    target.write_bytes(b"<domain/>")
    inj = crashkit.Injector(mode="count", journal=True, stash=str(tmp_path / ".stash"))
    with inj:
        write_atomic(target, b"<domain type='kvm'/>")
    assert target.read_bytes() == b"<domain type='kvm'/>"
    assert "replace" in inj.calls
    assert not inj.dirops, "directory not fsynced after the rename"


@pytest.mark.parametrize("mode", ["enospc", "eio"])
def test_libvirt_write_atomic_leaves_no_temp_file(mode, tmp_path):
    from pyqcow.libvirt import write_atomic

    target = tmp_path / "dom.xml"
    target.write_bytes(b"<domain/>")
    points = crashkit.Injector(mode="count", journal=False)
    with points:
        write_atomic(target, b"<domain type='kvm'/>")
    target.write_bytes(b"<domain/>")
    for i in range(len(points.calls)):
        inj = crashkit.Injector(mode=mode, at=i, journal=False)
        with inj, pytest.raises(OSError) as exc:
            write_atomic(target, b"<domain type='kvm'/>")
        assert exc.value.errno in (errno.ENOSPC, errno.EIO)
        if inj.fired in ("replace",):  # failed before the rename: old content
            assert target.read_bytes() == b"<domain/>"
        assert sorted(os.listdir(tmp_path)) == ["dom.xml"], (i, inj.fired, os.listdir(tmp_path))
        target.write_bytes(b"<domain/>")


def test_hostfile_opens_cloexec(tmp_path):
    from pyqcow.hostfile import HostFile
    from pyqcow.newimage import create

    p = tmp_path / "a.qcow2"
    create(p, 1 << 20)
    for writable in (False, True):
        hf = HostFile(p, writable=writable)
        try:
            import fcntl

            assert fcntl.fcntl(hf.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert stat.S_ISREG(os.fstat(hf.fd).st_mode)
        finally:
            hf.close()
