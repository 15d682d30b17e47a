"""merge's promise (issue: trustworthy workflow): everything checked before the first
write, QEMU's locks held to the commit point, names computed as QEMU resolves them,
the kept name reads exactly TOP's content, and an interrupted merge is finished by
``pyqcow recover`` from its intent record.  qemu-img/qemu-io are the oracle."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import qemu

from pyqcow.chain import backing_name, host_path, resolve_backing
from pyqcow.cli.main import main
from pyqcow.errors import QcowError
from pyqcow.ops import intent
from pyqcow.ops import merge as merge_mod
from pyqcow.ops.merge import merge, plan_merge

KiB = 1024
MiB = 1024 * KiB

pytestmark = pytest.mark.usefixtures("qemu_img_path", "qemu_io_path")


def raw(path, tmp: Path, name: str = "r.raw") -> bytes:
    out = tmp / name
    qemu.convert_raw(path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def chain(d: Path, *, base_size=4 * MiB, top_size=None, base_fmt="qcow2", top_name="top.qcow2",
          base_name=None, backing_name_=None) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    base_name = base_name or ("base.qcow2" if base_fmt == "qcow2" else "base.raw")
    base = qemu.create(d / base_name, base_size, fmt=base_fmt)
    qemu.qemu_io(base, "write -P 0x11 0 1M", f"write -P 0x12 {base_size - 64 * KiB} 64k",
                 fmt=base_fmt)
    top = qemu.create(d / top_name, top_size, backing=backing_name_ or base_name,
                      backing_fmt=base_fmt, cwd=d)
    qemu.qemu_io(top, "write -P 0x22 512k 128k")
    return base, top


def snapshot_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------- 3. name limits
def test_long_paths_keep_relative_backing_names(tmp_path):
    """TOP and BASE in different directories: the kept image's backing name stays
    relative (computed from the kept file's directory) and fits, where the old
    absolute name was over 1023 bytes and unreadable."""
    deep = tmp_path
    for i in range(6):
        deep = deep / (f"{i}" + "d" * 200)
    (deep / "a").mkdir(parents=True)
    (deep / "b").mkdir()
    bb = qemu.create(deep / "a" / "bb.qcow2", 2 * MiB)
    qemu.qemu_io(bb, "write -P 0x01 0 2M")
    base = qemu.create(deep / "a" / "base.qcow2", None, backing="bb.qcow2", backing_fmt="qcow2",
                       cwd=deep / "a")
    qemu.qemu_io(base, "write -P 0x02 0 64k")
    top = qemu.create(deep / "b" / "top.qcow2", None, backing="../a/base.qcow2",
                      backing_fmt="qcow2", cwd=deep / "b")
    qemu.qemu_io(top, "write -P 0x03 1M 64k")
    assert len(str(bb).encode()) > 1023
    before = raw(top, tmp_path)
    merge(top, keep="top", via="commit")
    info = qemu.info_json(top)
    assert info["backing-filename"] == "../a/bb.qcow2"
    assert raw(top, tmp_path) == before


def test_backing_name_too_long_refused_before_any_write(tmp_path, capsys):
    """A name that cannot fit is a refusal of the plan (dry run and real run alike):
    TOP names BASE with an 820-byte relative name and BASE names its backing file
    with a 219-byte one; from TOP's directory the combined name is over 1023 bytes."""
    a = tmp_path / "a0"
    for i in range(4):
        a = a / (f"{i}" + "e" * 200)
    sub = a / ("s" * 210)
    sub.mkdir(parents=True)
    b = tmp_path / "b"
    b.mkdir()
    bb = qemu.create(sub / "bb.qcow2", 1 * MiB)
    base = qemu.create(a / "base.qcow2", None, backing=f"{sub.name}/bb.qcow2", backing_fmt="qcow2",
                       cwd=a)
    top = qemu.create(b / "top.qcow2", None, backing=os.path.relpath(base, b), backing_fmt="qcow2",
                      cwd=b)
    qemu.qemu_io(top, "write -P 0x03 0 64k")
    before = {p: p.read_bytes() for p in (bb, base, top)}
    rc, out, err = run_cli(capsys, "merge", "--dry-run", "--keep", "top", "--via", "stream",
                           str(top))
    assert rc == 1 and "too long" in err and "refused:" in out
    rc, out, err = run_cli(capsys, "merge", "--keep", "top", "--via", "stream", str(top))
    assert rc == 1 and "too long" in err, err
    assert {p: p.read_bytes() for p in (bb, base, top)} == before


def test_set_backing_validates_names(tmp_path):
    base, top = chain(tmp_path)
    from pyqcow.image import QcowImage

    before = top.read_bytes()
    with QcowImage(top, "r+") as img:
        with pytest.raises(QcowError, match="too long"):
            img.set_backing("x" * 1024, "qcow2")
        with pytest.raises(QcowError, match="protocol"):
            img.set_backing("file:base.qcow2", "qcow2")
    assert top.read_bytes() == before


# --------------------------------------------------------------------- 5. locks to the commit point
@pytest.mark.parametrize(("keep", "via"), [("base", "commit"), ("base", "stream"),
                                           ("top", "commit"), ("top", "stream")])
def test_locks_held_at_commit_point(tmp_path, monkeypatch, keep, via):
    """At the rename/unlink, a qemu-io that tries to write either file is refused by
    QEMU's own locks (the merge still holds them)."""
    base, top = chain(tmp_path)
    seen = []

    def probe(name):
        for p in (top, base):
            if os.path.exists(p):
                out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 512", str(p)],
                                     capture_output=True, text=True)
                seen.append((p.name, out.returncode, out.stderr + out.stdout))

    real_replace, real_unlink = os.replace, os.unlink

    def replace(a, b, *args, **kw):
        probe(a)
        return real_replace(a, b, *args, **kw)

    def unlink(a, *args, **kw):
        if str(a).endswith(".qcow2"):
            probe(a)
        return real_unlink(a, *args, **kw)

    monkeypatch.setattr(merge_mod.os, "replace", replace)
    monkeypatch.setattr(merge_mod.os, "unlink", unlink)
    merge(top, keep=keep, via=via)
    assert seen, "no commit point observed"
    for name, rc, text in seen:
        assert rc != 0 and "lock" in text, (name, text)


# --------------------------------------------------------------------- 6. sizes
@pytest.mark.parametrize(("keep", "via"), [("base", "commit"), ("top", "commit"),
                                           ("base", "stream"), ("top", "stream"),
                                           ("base", "auto")])
def test_base_larger_than_top(tmp_path, keep, via):
    base, top = chain(tmp_path, base_size=8 * MiB, top_size=2 * MiB)
    before = raw(top, tmp_path)
    assert len(before) == 2 * MiB
    plan = merge(top, keep=keep, via=via)
    kept = base if keep == "base" else top
    info = qemu.info_json(kept)
    assert info["virtual-size"] == 2 * MiB
    assert raw(kept, tmp_path) == before
    res, rc = qemu.check_json(kept)
    assert rc == 0 and not res.get("leaks"), res
    assert plan.top_size == 2 * MiB


def test_base_larger_raw_base_commit(tmp_path):
    base, top = chain(tmp_path, base_size=8 * MiB, top_size=2 * MiB, base_fmt="raw")
    before = raw(top, tmp_path)
    merge(top, keep="base", via="commit")
    assert base.read_bytes() == before


def test_shrink_then_grow_reads_zeros(tmp_path):
    """The partial last cluster is zeroed past the new end (a later grow reads zeros)."""
    base, top = chain(tmp_path, base_size=8 * MiB, top_size=2 * MiB + 4 * KiB)
    qemu.qemu_io(base, "write -P 0x77 2M 64k")
    merge(top, keep="base", via="commit")
    qemu.qemu_img("resize", base, "8M")
    data = raw(base, tmp_path)
    assert data[2 * MiB + 4 * KiB:] == bytes(len(data) - 2 * MiB - 4 * KiB)


# --------------------------------------------------------------------- 7. symlinks and ..
def test_host_path_follows_links(tmp_path):
    real = tmp_path / "real" / "sub"
    real.mkdir(parents=True)
    (tmp_path / "real" / "f").write_bytes(b"x")
    (tmp_path / "link").symlink_to(real)
    p = host_path(str(tmp_path / "link" / ".." / "f"))
    assert os.path.samefile(p, tmp_path / "real" / "f")
    assert host_path(str(tmp_path / "a" / "." / "b")) == str(tmp_path / "a" / "b")


def test_backing_name_through_symlinked_directory(tmp_path):
    """A name computed for a file reached through a link to a directory resolves, as
    QEMU resolves it, to the intended file (os.path.relpath alone would not)."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "link").symlink_to(tmp_path / "real" / "sub")
    target = tmp_path / "real" / "bb.qcow2"
    target.write_bytes(b"")
    image = str(tmp_path / "vm" / "link" / "img.qcow2")
    name = backing_name(image, str(target))
    assert os.path.samefile(resolve_backing(image, name), target)


def test_merge_through_symlinked_directory(tmp_path):
    """BASE reached as link/../base: the kept image's backing name must name a file
    that exists (qemu-img opens the whole chain)."""
    root = tmp_path
    (root / "pool" / "inner").mkdir(parents=True)
    (root / "vm").mkdir()
    (root / "vm" / "lnk").symlink_to(root / "pool" / "inner")
    bb = qemu.create(root / "pool" / "bb.qcow2", 2 * MiB)
    qemu.qemu_io(bb, "write -P 0x05 0 2M")
    base = qemu.create(root / "pool" / "base.qcow2", None, backing="bb.qcow2",
                       backing_fmt="qcow2", cwd=root / "pool")
    qemu.qemu_io(base, "write -P 0x06 0 64k")
    top = qemu.create(root / "vm" / "top.qcow2", None, backing="lnk/../base.qcow2",
                      backing_fmt="qcow2", cwd=root / "vm")
    qemu.qemu_io(top, "write -P 0x07 64k 64k")
    before = raw(top, tmp_path)
    merge(top, keep="top", via="commit")
    chain_info = qemu.info_json(top, backing_chain=True)
    assert len(chain_info) == 2
    assert raw(top, tmp_path) == before


# --------------------------------------------------------------------- 8. file: names
def test_file_prefix_reads_what_qemu_reads(tmp_path, monkeypatch):
    """``file:b.qcow2`` is b.qcow2 in the current directory, as QEMU reads it."""
    img_dir, cwd = tmp_path / "img", tmp_path / "cwd"
    img_dir.mkdir()
    cwd.mkdir()
    for d, pat in ((img_dir, "0x11"), (cwd, "0x22")):
        b = qemu.create(d / "b.qcow2", 1 * MiB)
        qemu.qemu_io(b, f"write -P {pat} 0 1M")
    top = qemu.create(img_dir / "t.qcow2", 1 * MiB, backing="file:b.qcow2", backing_fmt="qcow2",
                      unsafe=True)
    monkeypatch.chdir(cwd)
    ref = tmp_path / "ref.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(ref)], check=True, cwd=cwd)
    import pyqcow

    with pyqcow.open(str(top)) as img:
        assert img.read(0, 1 * MiB) == ref.read_bytes()[: 1 * MiB]
        assert img.read(0, 1)[0] == 0x22


def test_merge_never_writes_file_prefix(tmp_path, monkeypatch):
    d = tmp_path / "vm"
    d.mkdir()
    bb = qemu.create(d / "bb.qcow2", 1 * MiB)
    qemu.qemu_io(bb, "write -P 0x31 0 1M")
    base = qemu.create(d / "base.qcow2", 1 * MiB, backing=f"file:{bb}", backing_fmt="qcow2",
                       unsafe=True)
    top = qemu.create(d / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qemu.qemu_io(top, "write -P 0x32 0 64k")
    before = raw(top, tmp_path)
    merge(top, keep="base", via="stream")
    name = qemu.info_json(base)["backing-filename"]
    assert not name.startswith("file:") and os.path.samefile(resolve_backing(str(base), name), bb)
    assert raw(base, tmp_path) == before


# --------------------------------------------------------------------- 9. formats
def test_raw_base_format_kept_at_each_name(tmp_path, capsys):
    base, top = chain(tmp_path, base_fmt="raw")
    # auto picks the direction that keeps each name's format
    assert plan_merge(top, keep="base").via == "commit"
    assert plan_merge(top, keep="top").via == "stream"
    before = snapshot_of(tmp_path)
    for keep, via in (("base", "stream"), ("top", "commit")):
        rc, out, err = run_cli(capsys, "merge", "--dry-run", "--keep", keep, "--via", via, str(top))
        assert rc == 1 and "refused:" in out and "raw" in err, (keep, via, out, err)
        rc, out, err = run_cli(capsys, "merge", "--keep", keep, "--via", via, str(top))
        assert rc == 1 and "--force" in err
    assert snapshot_of(tmp_path) == before
    content = raw(top, tmp_path)
    rc, out, err = run_cli(capsys, "merge", "--force", "--keep", "base", "--via", "stream", str(top))
    assert rc == 0, err
    assert qemu.info_json(base)["format"] == "qcow2"
    assert raw(base, tmp_path) == content


# --------------------------------------------------------------------- 12. permissions
@pytest.mark.parametrize(("keep", "via"), [("base", "stream"), ("top", "commit")])
def test_kept_name_keeps_mode_and_owner(tmp_path, keep, via):
    base, top = chain(tmp_path)
    kept = base if keep == "base" else top
    os.chmod(kept, 0o444)
    if os.geteuid() == 0:
        os.chown(kept, 1234, 4321)
    before = os.stat(kept)
    content = raw(top, tmp_path)
    merge(top, keep=keep, via=via)
    after = os.stat(kept)
    assert stat.S_IMODE(after.st_mode) == 0o444
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert raw(kept, tmp_path) == content


@pytest.fixture
def world_dir():
    """A directory every user can enter (pytest's base temp dir is 0700)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="pyqcow-perm-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _load_every_module() -> None:
    """Import every pyqcow module (and so what each imports at its top) while root:
    this Python lives under /root, which nobody cannot read, so a module first
    imported during the call as nobody would fail to load (start-up imports
    lazily: a command loads only what it needs, when it needs it)."""
    import importlib
    import pkgutil

    import pyqcow

    for mod in pkgutil.walk_packages(pyqcow.__path__, "pyqcow."):
        try:
            importlib.import_module(mod.name)
        except ImportError:  # an optional dependency (fuse, libvirt): not on this path
            pass


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_permission_refusal_shown_in_dry_run(world_dir, capsys):
    """As an unprivileged user who cannot write BASE, the dry run shows the refusal
    and exits 1, and the real run refuses before any write (root's effective ids
    are switched to nobody's for the call: chmod does not stop root)."""
    d = world_dir / "vm"
    base, top = chain(d)
    os.chmod(d, 0o755)
    for p in (d, top):
        os.chown(p, 65534, 65534)
    os.chmod(base, 0o644)  # root's, not writable by nobody
    os.chmod(top, 0o644)
    before = snapshot_of(d)
    results = []
    _load_every_module()
    os.setegid(65534)
    os.seteuid(65534)
    try:
        for argv in (["merge", "--dry-run", "--keep", "base", "--via", "commit", str(top)],
                     ["merge", "--keep", "base", "--via", "commit", str(top)]):
            results.append(run_cli(capsys, *argv))
    finally:
        os.seteuid(0)
        os.setegid(0)
    for rc, out, err in results:
        assert rc == 1 and "not writable" in err, (rc, out, err)
    assert snapshot_of(d) == before


# --------------------------------------------------------------------- 13. file systems
@pytest.fixture
def other_fs(tmp_path):
    mnt = tmp_path / "otherfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs under CI: {r.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_cross_filesystem_picks_direction_without_rename(tmp_path, other_fs, capsys):
    base = qemu.create(other_fs / "base.qcow2", 4 * MiB)
    qemu.qemu_io(base, "write -P 0x11 0 4M")
    d = tmp_path / "vm"
    d.mkdir()
    top = qemu.create(d / "top.qcow2", None, backing=str(base), backing_fmt="qcow2")
    qemu.qemu_io(top, "write -P 0x22 0 3M")
    # keep=top: commit would need a rename across file systems; auto streams
    plan = plan_merge(top, keep="top")
    assert plan.via == "stream"
    before = {p: p.read_bytes() for p in (base, top)}
    rc, out, err = run_cli(capsys, "merge", "--dry-run", "--keep", "top", "--via", "commit",
                           str(top))
    assert rc == 1 and "file system" in err
    rc, out, err = run_cli(capsys, "merge", "--keep", "top", "--via", "commit", str(top))
    assert rc == 1 and "file system" in err
    assert {p: p.read_bytes() for p in (base, top)} == before
    content = raw(top, tmp_path)
    merge(top, keep="top")
    assert not base.exists() and raw(top, tmp_path) == content


# --------------------------------------------------------------------- 14. data files
def test_removed_base_takes_its_data_file(tmp_path, capsys, monkeypatch):
    d = tmp_path
    monkeypatch.chdir(d)  # qemu 7.2 resolves a relative data file name in the current directory
    base = qemu.create(d / "base.qcow2", 2 * MiB, "data_file=base.data", cwd=d)
    qemu.qemu_io(base, "write -P 0x41 0 2M")
    top = qemu.create(d / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qemu.qemu_io(top, "write -P 0x42 0 64k")
    content = raw(top, tmp_path)
    rc, out, err = run_cli(capsys, "merge", "--dry-run", "--keep", "top", "--via", "stream",
                           str(top))
    assert rc == 0 and "base.data" in out
    merge(top, keep="top", via="stream")
    assert not (d / "base.data").exists() and not base.exists()
    assert raw(top, tmp_path) == content


def test_kept_base_keeps_its_data_file(tmp_path, monkeypatch):
    d = tmp_path
    monkeypatch.chdir(d)
    base = qemu.create(d / "base.qcow2", 2 * MiB, "data_file=base.data", cwd=d)
    qemu.qemu_io(base, "write -P 0x41 0 2M")
    top = qemu.create(d / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qemu.qemu_io(top, "write -P 0x42 0 64k")
    content = raw(top, tmp_path)
    merge(top, keep="base", via="commit")
    assert (d / "base.data").exists()
    assert raw(base, tmp_path) == content


# --------------------------------------------------------------------- 15/16. links, dry run
@pytest.mark.parametrize("which", ["top", "base"])
@pytest.mark.parametrize(("keep", "via"), [("base", "commit"), ("base", "stream"),
                                           ("top", "commit"), ("top", "stream")])
def test_symlinked_images_merge_without_force(tmp_path, which, keep, via):
    """Symlinks into a storage pool: the data goes to the link's target, the link at the
    kept name keeps working, a link at the removed name goes with its file."""
    d = tmp_path / "vm"
    base, top = chain(d)
    pool = tmp_path / "pool"
    pool.mkdir()
    link = top if which == "top" else base
    real = pool / ("real-" + link.name)
    shutil.move(link, real)
    link.symlink_to(real)
    content = raw(top, tmp_path)
    merge(top, keep=keep, via=via)
    kept, gone = (base, top) if keep == "base" else (top, base)
    assert raw(kept, tmp_path) == content
    assert not os.path.lexists(gone)
    if link == kept:
        assert kept.is_symlink() and os.path.samefile(kept, real)
    else:
        assert not real.exists()
    res, rc = qemu.check_json(kept)
    assert rc == 0 and not res.get("leaks"), res


@pytest.mark.parametrize("which", ["top", "base"])
def test_hard_links_refused_unless_force(tmp_path, capsys, which):
    base, top = chain(tmp_path)
    target = top if which == "top" else base
    os.link(target, tmp_path / "other-name")
    before = snapshot_of(tmp_path)
    rc, out, err = run_cli(capsys, "merge", "--dry-run", str(top))
    assert rc == 1 and "hard link" in err and "refused:" in out
    rc, out, err = run_cli(capsys, "merge", str(top))
    assert rc == 1 and "hard link" in err and "--force" in err
    assert snapshot_of(tmp_path) == before
    content = raw(top, tmp_path)
    rc, out, err = run_cli(capsys, "merge", "--force", str(top))
    assert rc == 0, err
    assert raw(base, tmp_path) == content


def test_dry_run_lists_every_refusal_and_exits_like_the_run(tmp_path, capsys):
    base, top = chain(tmp_path)
    qemu.snapshot_create(top, "s1")
    other = qemu.create(tmp_path / "other.qcow2", None, backing="base.qcow2", backing_fmt="qcow2",
                        cwd=tmp_path)
    rc, out, err = run_cli(capsys, "merge", "--dry-run", "--output", "json", str(top))
    assert rc == 1
    doc = json.loads(out)
    reasons = " | ".join(r["reason"] for r in doc["refusals"])
    assert "internal snapshot" in reasons and str(other) in reasons
    rc2, out2, err2 = run_cli(capsys, "merge", str(top))
    assert rc2 == rc and err2.splitlines()[0] == err.splitlines()[0]


def _qemu_lock_held(path) -> bool:
    """Some process holds a lock on QEMU's lock bytes of ``path`` (offsets 100 to
    299: permissions from 100, shared-permission bits from 200).  Asked with
    F_OFD_GETLK, which takes no lock itself."""
    import fcntl
    import struct

    fmt = "hhqqi4x"  # struct flock on Linux x86-64/aarch64: type, whence, start, len, pid
    fd = os.open(path, os.O_RDONLY)
    try:
        res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                          struct.pack(fmt, fcntl.F_WRLCK, os.SEEK_SET, 100, 200, 0))
        return struct.unpack(fmt, res)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_dry_run_shows_lock_held_by_qemu(tmp_path, capsys):
    base, top = chain(tmp_path)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "-k", str(sock), "-f", "qcow2", str(base)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import time

        # wait until qemu-nbd holds its lock, up to 60 s: the old 4 s wait for
        # the socket was too short on a loaded machine (the merge then ran before
        # the lock), and a probe with qemu-img took a lock of its own, which made
        # qemu-nbd fail to start when they met (CI: "never held the lock (exit 1)");
        # F_OFD_GETLK only asks
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if _qemu_lock_held(base):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"qemu-nbd never held the lock (exit {proc.poll()}: "
                                 f"{proc.stderr.read().decode(errors='replace').strip()})")
        rc, out, err = run_cli(capsys, "merge", "--dry-run", str(top))
        assert rc == 1 and "in use" in err
        rc, out, err = run_cli(capsys, "merge", str(top))
        assert rc == 1 and "in use" in err
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------- 10. intent record
def _xml(tmp: Path, source: Path) -> Path:
    p = tmp / "dom.xml"
    p.write_text(
        "<domain type='kvm'>\n  <name>vm</name>\n  <memory>1024</memory>\n  <os><type>hvm</type></os>\n"
        "  <devices>\n    <disk type='file' device='disk'>\n"
        "      <driver name='qemu' type='qcow2'/>\n"
        f"      <source file='{source}'/>\n"
        "      <target dev='vda' bus='virtio'/>\n    </disk>\n  </devices>\n</domain>\n")
    return p


def test_xml_failure_after_merge_is_finished_by_recover(tmp_path, capsys, monkeypatch):
    d = tmp_path / "vm"
    base, top = chain(d)
    xml = _xml(tmp_path, top)
    content = raw(top, tmp_path)
    from pyqcow.cli import xml as cli_xml

    def boom(self, *a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(cli_xml.DomainXmlUpdate, "apply", boom)
    rc, out, err = run_cli(capsys, "merge", str(top), "--domain-xml", str(xml), "--disk", "vda")
    assert rc == 1 and "Read-only" in err
    monkeypatch.undo()
    assert not top.exists() and str(top) in xml.read_text()
    records = intent.find(str(d))
    assert len(records) == 1
    rc, out, err = run_cli(capsys, "recover", "--dry-run", str(xml))
    assert rc == 0 and "would rewrite" in out and str(top) in xml.read_text()
    rc, out, err = run_cli(capsys, "recover", str(xml))
    assert rc == 0, err
    assert f"file='{base}'" in xml.read_text() and str(top) not in xml.read_text()
    assert intent.find(str(d)) == []
    assert raw(base, tmp_path) == content
    rc, out, err = run_cli(capsys, "recover", str(xml))
    assert rc == 0 and "nothing to recover" in out


@pytest.mark.parametrize(("keep", "via"), [("base", "commit"), ("base", "stream"),
                                           ("top", "commit"), ("top", "stream")])
@pytest.mark.parametrize("when", ["before", "after"])
def test_interrupted_merge_finished_by_recover(tmp_path, capsys, monkeypatch, keep, via, when):
    """A merge interrupted just before or just after its commit point (the rename or the
    removal) is finished by ``pyqcow recover``; the XML then names the kept file."""
    d = tmp_path / "vm"
    bb = qemu.create(d / "bb.qcow2", 4 * MiB) if d.mkdir() is None else None
    qemu.qemu_io(bb, "write -P 0x10 0 4M")
    base = qemu.create(d / "base.qcow2", None, backing="bb.qcow2", backing_fmt="qcow2", cwd=d)
    qemu.qemu_io(base, "write -P 0x11 0 1M")
    top = qemu.create(d / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qemu.qemu_io(top, "write -P 0x22 512k 128k")
    xml = _xml(tmp_path, top)
    content = raw(top, tmp_path)
    kept = base if keep == "base" else top
    point = "_rename" if (keep == "base") == (via == "stream") else "_remove"
    real = getattr(merge_mod, point)

    def crash(*a, **k):
        if when == "after":
            real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_mod, point, crash)
    rc, out, err = run_cli(capsys, "merge", "--keep", keep, "--via", via, str(top),
                           "--domain-xml", str(xml), "--disk", "vda")
    assert rc == 130
    monkeypatch.undo()
    # at every instant: TOP's name (while it exists) or the kept name reads TOP's content
    assert raw(top if top.exists() else kept, tmp_path) == content
    rc, out, err = run_cli(capsys, "recover", str(xml))
    assert rc == 0, err
    assert raw(kept, tmp_path) == content
    gone = top if keep == "base" else base
    assert not gone.exists()
    assert f"file='{kept}'" in xml.read_text()
    assert qemu.info_json(kept)["backing-filename"] == "bb.qcow2"
    res, rc = qemu.check_json(kept)
    assert rc == 0, res
    assert intent.find(str(d)) == []


def test_stream_b_name_through_symlinked_directory(tmp_path):
    """`stream -b` on a top named through a link to a deeper directory: the stored name
    must resolve (from the top's name, as QEMU resolves it) to BASE."""
    from pyqcow.ops.stream import stream

    deep = tmp_path / "pool" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "lnk").symlink_to(deep)
    bb = qemu.create(tmp_path / "pool" / "bb.qcow2", 2 * MiB)
    qemu.qemu_io(bb, "write -P 0x01 0 2M")
    mid = qemu.create(deep / "mid.qcow2", None, backing="../../../bb.qcow2", backing_fmt="qcow2",
                      cwd=deep)
    qemu.qemu_io(mid, "write -P 0x02 0 64k")
    top = qemu.create(deep / "top.qcow2", None, backing="mid.qcow2", backing_fmt="qcow2", cwd=deep)
    via_link = tmp_path / "vm" / "lnk" / "top.qcow2"
    before = raw(via_link, tmp_path)
    stream(str(via_link), str(bb))
    name = qemu.info_json(top)["backing-filename"]
    assert os.path.samefile(resolve_backing(str(via_link), name), bb), name
    assert raw(via_link, tmp_path) == before


def test_create_domain_xml_names_the_real_file(tmp_path, capsys):
    """`create -b ... --domain-xml` with IMAGE given as link/../new.qcow2: the XML names a
    file that exists (os.path.abspath would flatten link/.. lexically)."""
    (tmp_path / "pool" / "a").mkdir(parents=True)
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "lnk").symlink_to(tmp_path / "pool" / "a")
    base = qemu.create(tmp_path / "pool" / "base.qcow2", 1 * MiB)
    xml = _xml(tmp_path, base)
    image = str(tmp_path / "vm" / "lnk" / ".." / "new.qcow2")
    rc, out, err = run_cli(capsys, "create", "-b", "base.qcow2", "-F", "qcow2", image,
                           "--domain-xml", str(xml), "--disk", "vda")
    assert rc == 0, err
    import re

    src = re.search(r"<source file='([^']+)'", xml.read_text()).group(1)
    assert os.path.exists(src) and os.path.samefile(src, tmp_path / "pool" / "new.qcow2")


def test_xml_sync_finishes_an_interrupted_merge(tmp_path, capsys, monkeypatch):
    """`pyqcow xml sync` runs the recovery first (no need to know about `recover`)."""
    d = tmp_path / "vm"
    base, top = chain(d)
    xml = _xml(tmp_path, top)
    content = raw(top, tmp_path)
    real = merge_mod._remove

    def crash(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_mod, "_remove", crash)
    rc, out, err = run_cli(capsys, "merge", str(top), "--domain-xml", str(xml), "--disk", "vda")
    assert rc == 130
    monkeypatch.undo()
    assert not top.exists() and str(top) in xml.read_text()
    rc, out, err = run_cli(capsys, "xml", "sync", str(xml), "--disk", "vda")
    assert rc == 0, err
    assert f"file='{base}'" in xml.read_text() and intent.find(str(d)) == []
    assert raw(base, tmp_path) == content


@pytest.mark.parametrize("fail", ["crash", "error"])
def test_create_xml_record(tmp_path, capsys, monkeypatch, fail):
    """create -b --domain-xml writes a record first: after a crash between the image
    and the XML, recover points the XML at the new overlay; after a clean error the
    record is dropped and the XML is left alone."""
    d = tmp_path / "vm"
    d.mkdir()
    base = qemu.create(d / "base.qcow2", 1 * MiB)
    xml = _xml(tmp_path, base)
    from pyqcow.cli import xml as cli_xml

    if fail == "crash":
        def boom(self, *a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(cli_xml.DomainXmlUpdate, "apply", boom)
        rc, out, err = run_cli(capsys, "create", "-b", "base.qcow2", "-F", "qcow2",
                               str(d / "new.qcow2"), "--domain-xml", str(xml), "--disk", "vda")
        assert rc == 130
        monkeypatch.undo()
        assert str(d / "new.qcow2") not in xml.read_text()
        rc, out, err = run_cli(capsys, "recover", str(xml))
        assert rc == 0, err
        assert f"file='{d / 'new.qcow2'}'" in xml.read_text()
    else:
        (d / "new.qcow2").mkdir()  # create fails cleanly: a directory is in the way
        rc, out, err = run_cli(capsys, "create", "-b", "base.qcow2", "-F", "qcow2",
                               str(d / "new.qcow2"), "--domain-xml", str(xml), "--disk", "vda")
        assert rc == 1
        assert f"file='{base}'" in xml.read_text()
    assert intent.find(str(d)) == []
