"""``pyqcow domain``: offline external snapshots, merges, reverts and sync against
libvirt's real QEMU driver (an isolated ``qemu:///embed`` instance per test
worker, see libvirt_embed.py).  The invariant checked after every step: each
remaining snapshot's frozen disks read exactly what the guest had when it was
taken, the current disks read what they read before, and every file the
metadata names exists."""

from __future__ import annotations

import os
import uuid as uuidlib
from pathlib import Path

import pytest
import qemu
from libvirt_embed import (
    domain_xml,
    make_root,
    pyqcow_cli,
    remove_root,
    require_libvirt,
    uri,
    virsh,
)

MiB = 1024 * 1024
SIZE = 4 * MiB

pytestmark = pytest.mark.usefixtures("qemu_img_path", "qemu_io_path")


@pytest.fixture(scope="module")
def lv():
    """One in-process connection per worker and module (its root is this process's)."""
    require_libvirt()
    from pyqcow import domain as dm

    root = make_root()
    conn = dm.connect(uri(root))
    try:
        yield conn
    finally:
        conn.close()
        # the embedded driver keeps the root until the process exits; files go now
        remove_root(root)


def read_chain(path: str, fmt: str | None = None) -> bytes:
    import pyqcow

    with pyqcow.open(path) as img:
        return img.read(0, img.virtual_size)


class Guest:
    """A shut-off 2-disk domain: vda qcow2, vdb raw; writes and expected contents."""

    def __init__(self, conn, d: Path, name: str) -> None:
        self.conn, self.dir, self.name = conn, d, name
        d.mkdir(parents=True, exist_ok=True)
        qemu.create(d / "vda.qcow2", SIZE)
        qemu.create(d / "vdb.raw", SIZE, fmt="raw")
        conn.defineXML(domain_xml(name, [("vda", str(d / "vda.qcow2"), "qcow2"),
                                         ("vdb", str(d / "vdb.raw"), "raw")],
                                  uuid=str(uuidlib.uuid4())))
        self.dom = conn.lookupByName(name)
        self.frozen: dict[str, dict[str, bytes]] = {}  # snapshot -> disk -> content
        self.n = 0

    def sources(self) -> dict[str, str]:
        from pyqcow import domain as dm

        return {d.target: d.source for d in dm.Domain(self.conn, self.name).disks()}

    def write(self) -> None:
        from pyqcow import domain as dm

        self.n += 1
        for d in dm.Domain(self.conn, self.name).disks():
            path, fmt = d.source, d.format
            off = (self.n * 256 * 1024) % SIZE
            qemu.qemu_io(path, f"write -P {0x10 + self.n} {off} 256k", fmt=fmt)

    def current(self) -> dict[str, bytes]:
        return {t: read_chain(p) for t, p in self.sources().items()}

    def snapshot_taken(self, name: str) -> None:
        """Call right after a snapshot: the frozen content is the current content."""
        self.frozen[name] = self.current()

    def check(self) -> None:
        from pyqcow import domain as dm

        d = dm.Domain(self.conn, self.name)
        for f in dm._all_files(d):
            assert os.path.exists(f), f"metadata names missing file {f}"
        names = set()
        for s in d.snapshots():
            names.add(s.name)
            for target, (path, _fmt) in s.frozen.items():
                assert read_chain(path) == self.frozen[s.name][target], (s.name, target)
        assert names == set(self.frozen), (names, set(self.frozen))


def test_three_snapshots_two_disks_merge_middle_and_leaf(lv, tmp_path):
    """The issue's scenario: a 3-snapshot chain on a 2-disk domain (qcow2 + raw),
    snapshots made by pyqcow and by libvirt itself; a middle and a leaf snapshot are
    merged with both --keep values; the invariant holds after each step."""
    import libvirt

    from pyqcow import domain as dm

    for keep_mid, keep_leaf in (("base", "top"), ("top", "base")):
        g = Guest(lv, tmp_path / f"g-{keep_mid}", f"g3-{keep_mid}")
        g.write()
        dm.snapshot(lv, g.name, "s1")
        g.snapshot_taken("s1")
        g.write()
        # libvirt makes the second one itself
        g.dom.snapshotCreateXML("<domainsnapshot><name>s2</name></domainsnapshot>",
                                libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY)
        g.snapshot_taken("s2")
        g.write()
        dm.snapshot(lv, g.name, "s3")
        g.snapshot_taken("s3")
        g.write()
        cur = g.current()
        g.check()
        assert g.sources()["vda"].endswith("vda.s3") and g.sources()["vdb"].endswith("vdb.s3")
        # the middle one
        plan = dm.merge(lv, g.name, "s2", keep=keep_mid)
        assert plan.done
        del g.frozen["s2"]
        assert g.current() == cur
        g.check()
        snaps = {s.name: s for s in dm.Domain(lv, g.name).snapshots()}
        assert snaps["s3"].parent == "s1"
        # then the leaf
        dm.merge(lv, g.name, "s3", keep=keep_leaf)
        del g.frozen["s3"]
        assert g.current() == cur
        g.check()
        # the raw disk's base stays raw at its name when it is kept
        fmts = {d.target: d.format for d in dm.Domain(lv, g.name).disks()}
        assert fmts["vda"] == "qcow2"
        for f in os.listdir(g.dir):
            assert not f.endswith(".json"), f"intent record left: {f}"
        # reverting to the remaining snapshot gives exactly its content
        dm.revert(lv, g.name, "s1")
        assert g.current() == g.frozen["s1"]
        g.check()


def test_libvirt_snapshot_merged_by_pyqcow_keep_top(lv, tmp_path):
    import libvirt

    from pyqcow import domain as dm

    g = Guest(lv, tmp_path / "g", "lv-made")
    g.write()
    g.dom.snapshotCreateXML("<domainsnapshot><name>a</name></domainsnapshot>",
                            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY)
    g.write()
    cur = g.current()
    before = g.sources()
    dm.merge(lv, g.name, "a", keep="top")
    assert g.sources() == before  # the overlay names survive
    assert g.current() == cur
    assert dm.Domain(lv, g.name).snapshots() == []
    for path in before.values():
        assert qemu.info_json(path).get("backing-filename") is None


def test_dry_run_shows_diffs_and_changes_nothing(lv, tmp_path):
    from pyqcow import domain as dm

    g = Guest(lv, tmp_path / "g", "dry")
    g.write()
    dm.snapshot(lv, g.name, "s1")
    g.write()
    files = sorted(os.listdir(g.dir))
    xml = dm.Domain(lv, g.name).xml()
    plan = dm.merge(lv, g.name, "s1", dry_run=True)
    text = plan.human()
    assert "vda.s1" in text and "-" in text and "domain" in text
    assert sorted(os.listdir(g.dir)) == files and dm.Domain(lv, g.name).xml() == xml
    plan = dm.snapshot(lv, g.name, "s2", dry_run=True)
    assert "vda.s2" in plan.human()
    assert sorted(os.listdir(g.dir)) == files


def test_keep_name_snapshot(lv, tmp_path):
    """--keep-name: the disks keep their file names; the content moves to base.NAME."""
    from pyqcow import domain as dm

    g = Guest(lv, tmp_path / "g", "keepname")
    g.write()
    before = g.sources()
    dm.snapshot(lv, g.name, "k1", keep_name=True)
    g.snapshot_taken("k1")
    assert g.sources() == before
    assert os.path.exists(g.dir / "vda.k1") and os.path.exists(g.dir / "vdb.k1")
    s = dm.Domain(lv, g.name).snapshot("k1")
    assert s.overlays["vda"] == before["vda"] and s.frozen["vda"][0] == str(g.dir / "vda.k1")
    g.write()
    g.check()
    cur = g.current()
    dm.merge(lv, g.name, "k1", keep="top")
    assert g.sources() == before and g.current() == cur
    assert not os.path.exists(g.dir / "vda.k1")


def test_refusals_change_nothing(lv, tmp_path):
    from pyqcow import domain as dm
    from pyqcow.errors import QcowError

    g = Guest(lv, tmp_path / "g", "refuse")
    dm.snapshot(lv, g.name, "s1")
    with pytest.raises(QcowError, match="already exists"):
        dm.snapshot(lv, g.name, "s1")
    with pytest.raises(QcowError, match="no snapshot named"):
        dm.merge(lv, g.name, "nope")
    with pytest.raises(QcowError, match="no such domain"):
        dm.merge(lv, "nodomain", "s1")
    with pytest.raises(QcowError, match="no disk vdz"):
        dm.snapshot(lv, g.name, "s2", disks=["vdz"])


def test_sync_finishes_after_metadata_step_failed(lv, tmp_path, monkeypatch):
    from pyqcow import domain as dm

    g = Guest(lv, tmp_path / "g", "syncme")
    g.write()
    dm.snapshot(lv, g.name, "s1")
    g.snapshot_taken("s1")
    g.write()
    dm.snapshot(lv, g.name, "s2")
    g.snapshot_taken("s2")
    g.write()
    cur = g.current()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dm.merging, "_apply_metadata", boom)
    with pytest.raises(KeyboardInterrupt):
        dm.merge(lv, g.name, "s1", keep="base")
    monkeypatch.undo()
    # images merged, metadata stale: snapshot s1 still listed, s2's frozen file gone
    assert not os.path.exists(g.dir / "vda.s1")
    plan = dm.sync(lv, g.name, dry_run=True)
    assert plan.delete_snapshot == "s1"
    dm.sync(lv, g.name)
    del g.frozen["s1"]
    g.check()
    assert g.current() == cur
    again = dm.sync(lv, g.name)  # idempotent
    assert not again.changes


def test_active_domain_refused(lv, tmp_path):
    """A running domain (TCG, no OS) is refused before anything changes."""
    from pyqcow import domain as dm
    from pyqcow.errors import QcowError

    g = Guest(lv, tmp_path / "g", "running")
    dm.snapshot(lv, g.name, "s1")
    files = {p: p.read_bytes() for p in g.dir.iterdir()}
    g.dom.create()
    try:
        with pytest.raises(QcowError, match="running"):
            dm.merge(lv, g.name, "s1")
        with pytest.raises(QcowError, match="running"):
            dm.snapshot(lv, g.name, "s2")
    finally:
        g.dom.destroy()
    assert {p: p.read_bytes() for p in g.dir.iterdir()} == files
    assert [s.name for s in dm.Domain(lv, g.name).snapshots()] == ["s1"]


def test_pyqcow_snapshot_deleted_by_virsh(tmp_path):
    """Interop the other way: a snapshot pyqcow made, deleted by libvirt's own
    `virsh snapshot-delete` (which starts a paused QEMU and block-commits)."""
    require_libvirt()
    root = make_root()
    try:
        d = tmp_path / "g"
        d.mkdir()
        qemu.create(d / "vda.qcow2", SIZE)
        qemu.qemu_io(d / "vda.qcow2", "write -P 0x21 0 1M")
        xml = tmp_path / "dom.xml"
        xml.write_text(domain_xml("vi", [("vda", str(d / "vda.qcow2"), "qcow2")]))
        virsh(root, "define", str(xml))
        pyqcow_cli("domain", "snapshot", "--connect", uri(root), "vi", "p1")
        qemu.qemu_io(d / "vda.p1", "write -P 0x22 512k 512k")
        expect = read_chain(str(d / "vda.p1"))
        assert "p1" in virsh(root, "snapshot-list", "vi", "--name").stdout
        virsh(root, "snapshot-delete", "vi", "p1")
        assert virsh(root, "snapshot-list", "vi", "--name").stdout.strip() == ""
        src = virsh(root, "domblklist", "vi").stdout
        assert str(d / "vda.qcow2") in src
        assert read_chain(str(d / "vda.qcow2")) == expect
        # and pyqcow shows the result
        r = pyqcow_cli("domain", "show", "--connect", uri(root), "--output", "json", "vi")
        assert '"snapshots": []' in r.stdout
    finally:
        remove_root(root)


def test_create_freeze_to(tmp_path):
    """File mode of --keep-name: `pyqcow create --freeze-to FROZEN IMAGE`."""
    from pyqcow.cli.main import main

    img = qemu.create(tmp_path / "disk.qcow2", SIZE)
    qemu.qemu_io(img, "write -P 0x33 0 1M")
    os.chmod(img, 0o640)
    before = read_chain(str(img))
    rc = main(["create", "--freeze-to", str(tmp_path / "disk.frozen"), str(img)])
    assert rc == 0
    info = qemu.info_json(img)
    assert info["backing-filename"] == "disk.frozen"
    assert read_chain(str(img)) == before
    assert oct(os.stat(img).st_mode & 0o777) == oct(0o640)
    res, rc = qemu.check_json(img)
    assert rc == 0
