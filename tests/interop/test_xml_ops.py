"""Chain operations keep a libvirt domain XML true to the images (issue 5).

Golden tests: for each operation, ``tests/data/xml/ops/<case>-in.xml`` is the
domain before and ``<case>-out.xml`` after; ``@DIR@`` stands for the directory
of the images, which are real (qemu-img/qemu-io in tmp_path).  Every output
passes ``virt-xml-validate FILE domain`` (the snapshot document:
``domainsnapshot``), and names exactly the chain the images' headers give.

Failures: an operation that fails, an unknown ``--disk`` target or an
unreadable XML leave the XML byte-identical and create no image.

Regenerate the golden outputs (then review the diff!) with
``PYQCOW_REGEN_GOLDEN=1 tools/test tests/interop/test_xml_ops.py``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu import qemu_img, qemu_io, require_tool

import pyqcow
from pyqcow.cli.main import main
from pyqcow.cli.xml import image_chain
from pyqcow.libvirt import disk_chain

OPS_DIR = Path(__file__).resolve().parent.parent / "data" / "xml" / "ops"
MiB = 1024 * 1024
SIZE = 4 * MiB


# -- image set-ups (cwd = the images' directory; backing names relative) -----------------------
def _qcow2(name: str, backing: str | None = None, fmt: str = "qcow2") -> None:
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", backing, "-F", fmt]
    qemu_img(*args, name, *([] if backing else [str(SIZE)]))


def _data(name: str, pattern: int, offset: int, length: int, fmt: str = "qcow2") -> None:
    qemu_io(name, f"write -P {pattern:#x} {offset} {length}", fmt=fmt)


def setup_base() -> None:
    _qcow2("base.qcow2")
    _data("base.qcow2", 0xB0, 0, 2 * MiB)


def setup_create() -> None:
    setup_base()
    Path("data.img").write_bytes(b"")
    os.truncate("data.img", MiB)


def setup_two() -> None:
    setup_base()
    _qcow2("top.qcow2", "base.qcow2")
    _data("top.qcow2", 0x70, MiB, 256 * 1024)


def setup_three() -> None:
    setup_two()
    os.rename("top.qcow2", "mid.qcow2")
    qemu_img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
    _qcow2("top.qcow2", "mid.qcow2")
    _data("top.qcow2", 0x7E, 3 * MiB, 64 * 1024)


def setup_rebase() -> None:
    setup_two()
    # other.raw holds the same guest data as base.qcow2, as a raw file
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "base.qcow2", "other.raw")


def setup_root() -> None:
    _qcow2("root.qcow2")
    _data("root.qcow2", 0x50, 0, 3 * MiB)
    _qcow2("base.qcow2", "root.qcow2")
    _data("base.qcow2", 0xB0, 0, MiB)
    _qcow2("top.qcow2", "base.qcow2")
    _data("top.qcow2", 0x70, 2 * MiB, 128 * 1024)


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[], None]
    argv: tuple[str, ...]
    top: str  # the file the disk names afterwards
    gone: tuple[str, ...] = ()


CASES = [
    Case("create", setup_create,
         ("create", "-b", "base.qcow2", "-F", "qcow2", "@DIR@/new.qcow2"), "new.qcow2"),
    Case("commit", setup_two, ("commit", "-p", "top.qcow2"), "top.qcow2"),
    Case("stream", setup_three, ("stream", "-b", "@DIR@/base.qcow2", "top.qcow2"), "top.qcow2"),
    Case("rebase", setup_rebase, ("rebase", "-b", "other.raw", "-F", "raw", "top.qcow2"),
         "top.qcow2"),
    Case("merge-keep-base", setup_root, ("merge", "--keep", "base", "top.qcow2"), "base.qcow2",
         ("top.qcow2",)),
    Case("merge-keep-top", setup_root, ("merge", "--keep", "top", "top.qcow2"), "top.qcow2",
         ("base.qcow2",)),
]
VIAS = {"merge-keep-base": ("commit", "stream"), "merge-keep-top": ("commit", "stream")}


def _params():
    for case in CASES:
        for via in VIAS.get(case.name, (None,)):
            yield pytest.param(case, via, id=case.name + (f"-via-{via}" if via else ""))


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture
def images(tmp_path: Path, monkeypatch) -> Path:
    require_tool("qemu-img")
    require_tool("qemu-io")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def validate(path: Path, schema: str) -> None:
    tool = require_tool("virt-xml-validate")
    require_tool("xmllint")
    proc = subprocess.run([tool, str(path), schema], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, f"{path.name}: {proc.stdout}{proc.stderr}"


def subst(text: str, d: Path) -> str:
    return text.replace("@DIR@", str(d))


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def guest(path: str) -> bytes:
    with pyqcow.open(path, force_share=True) as img:
        return img.read(0, img.virtual_size)


# -- golden ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "via"), list(_params()))
def test_golden(images: Path, capsys, case: Case, via: str | None) -> None:
    case.setup()
    dom = images / "dom.xml"
    dom.write_text(subst((OPS_DIR / f"{case.name}-in.xml").read_text(), images))
    validate(dom, "domain")
    before = dom.read_bytes()
    source = disk_chain(before, "vda")[0].path
    want = guest(source) if os.path.exists(source) else None
    argv = [subst(a, images) for a in case.argv]
    if via is not None:
        argv += ["--via", via]

    # --dry-run: the diff, nothing touched
    files = {p.name: p.read_bytes() for p in images.iterdir()}
    status, out, err = cli(capsys, *argv, "--domain-xml", str(dom), "--disk", "vda", "--dry-run")
    assert status == 0, err
    assert out.count(f"--- {dom}") == 1
    assert {p.name: p.read_bytes() for p in images.iterdir()} == files

    status, out, err = cli(capsys, *argv, "--domain-xml", str(dom), "--disk", "vda")
    assert status == 0, err
    assert out == ""
    for name in case.gone:
        assert not (images / name).exists()

    golden = OPS_DIR / f"{case.name}-out.xml"
    got = dom.read_text()
    if os.environ.get("PYQCOW_REGEN_GOLDEN"):
        golden.write_text(got.replace(str(images), "@DIR@"))
    assert got == subst(golden.read_text(), images)
    validate(dom, "domain")
    # the XML names exactly the chain the images' headers give
    named = disk_chain(dom.read_bytes(), "vda")
    assert named[0].path == str(images / case.top)
    assert named == image_chain(named[0].path, named[0].format)
    # and the guest content did not change
    if want is not None:
        assert guest(named[0].path) == want
    # qemu agrees the images are sound
    for element in named:
        if element.format == "qcow2":
            qemu_img("check", "-q", element.path)
    # idempotent: sync has nothing to do
    status, out, _ = cli(capsys, "xml", "sync", str(dom), "--disk", "vda", "--dry-run")
    assert status == 0 and "already names this chain" in out


def test_in_files_have_out_files() -> None:
    ins = sorted(p.name[: -len("-in.xml")] for p in OPS_DIR.glob("*-in.xml"))
    outs = sorted(p.name[: -len("-out.xml")] for p in OPS_DIR.glob("*-out.xml"))
    assert ins == outs == sorted(c.name for c in CASES)


def test_snapshot_xml(images: Path, capsys) -> None:
    setup_create()
    dom = images / "dom.xml"
    dom.write_text(subst((OPS_DIR / "create-in.xml").read_text(), images))
    pre = dom.read_bytes()
    snap = images / "snap1.xml"
    status, _, err = cli(capsys, "create", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2",
                         "--domain-xml", str(dom), "--disk", "vda",
                         "--snapshot-xml", str(snap), "--snapshot-name", "snap1")
    assert status == 0, err
    validate(snap, "domainsnapshot")
    text = snap.read_text()
    assert "<name>snap1</name>" in text and "<state>disk-snapshot</state>" in text
    assert "<disk name='vda' snapshot='external' type='file'>" in text
    assert f"<source file='{images}/new.qcow2'/>" in text
    assert "<disk name='vdb' snapshot='no'/>" in text
    # the embedded domain is the pre-snapshot one: vda still names base.qcow2
    assert f'<source file="{images}/base.qcow2"/>' in text
    assert dom.read_bytes() != pre


def test_snapshot_xml_without_domain(images: Path, capsys) -> None:
    setup_base()
    snap = images / "s.xml"
    status, _, err = cli(capsys, "create", "-q", "-b", "base.qcow2", "-F", "qcow2",
                         "new.qcow2", "--disk", "vda", "--snapshot-xml", str(snap))
    assert status == 0, err
    validate(snap, "domainsnapshot")


# -- failures leave everything as it was ------------------------------------------------------------
def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_unknown_target_touches_nothing(images: Path, capsys, case: Case) -> None:
    case.setup()
    dom = images / "dom.xml"
    dom.write_text(subst((OPS_DIR / f"{case.name}-in.xml").read_text(), images))
    files = _snapshot(images)
    argv = [subst(a, images) for a in case.argv]
    status, _, err = cli(capsys, *argv, "--domain-xml", str(dom), "--disk", "vdx")
    assert status == 1
    assert err.count("\n") == 1 and "vdx" in err and "Traceback" not in err
    assert _snapshot(images) == files  # XML byte-identical, no image created or changed


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_unreadable_xml_touches_nothing(images: Path, capsys, case: Case) -> None:
    case.setup()
    dom = images / "dom.xml"
    dom.write_text("<domain type='kvm'><devices><disk type='file'>")  # not well-formed
    files = _snapshot(images)
    argv = [subst(a, images) for a in case.argv]
    status, _, err = cli(capsys, *argv, "--domain-xml", str(dom), "--disk", "vda")
    assert status == 1 and "not well-formed" in err
    assert _snapshot(images) == files
    status, _, err = cli(capsys, *argv, "--domain-xml", str(images / "absent.xml"),
                         "--disk", "vda")
    assert status == 1 and "absent.xml" in err
    assert _snapshot(images) == files


def test_merge_with_missing_base_leaves_xml(images: Path, capsys) -> None:
    setup_root()
    dom = images / "dom.xml"
    dom.write_text(subst((OPS_DIR / "merge-keep-base-in.xml").read_text(), images))
    os.unlink("base.qcow2")
    files = _snapshot(images)
    status, _, err = cli(capsys, "merge", "top.qcow2", "--domain-xml", str(dom), "--disk", "vda")
    assert status == 1 and "base.qcow2" in err and err.count("\n") == 1
    assert _snapshot(images) == files


def test_commit_into_locked_base_leaves_xml(images: Path, capsys) -> None:
    """The operation itself fails (BASE is open read-write elsewhere): XML unchanged."""
    setup_two()
    dom = images / "dom.xml"
    dom.write_text(subst((OPS_DIR / "commit-in.xml").read_text(), images))
    files = _snapshot(images)
    with pyqcow.open("base.qcow2", "r+"):
        status, _, err = cli(capsys, "commit", "top.qcow2", "--domain-xml", str(dom),
                             "--disk", "vda")
    assert status == 1 and "in use" in err and err.count("\n") == 1
    assert _snapshot(images) == files


@contextlib.contextmanager
def _read_only(path: Path):
    """``path`` unwritable, also for root: chmod 444, and as root a read-only bind
    mount of the file over itself (root writes through mode bits, not through a
    read-only mount)."""
    os.chmod(path, 0o444)
    if os.geteuid() != 0:
        yield
        return
    for argv in (["mount", "--bind", str(path), str(path)],
                 ["mount", "-o", "remount,bind,ro", str(path)]):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["umount", str(path)], capture_output=True)
            pytest.fail(f"cannot make {path} read-only as root: {r.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_commit_into_read_only_base_leaves_xml(images: Path, capsys) -> None:
    setup_two()
    dom = images / "dom.xml"
    dom.write_text(subst((OPS_DIR / "commit-in.xml").read_text(), images))
    with _read_only(images / "base.qcow2"):
        files = _snapshot(images)
        status, _, err = cli(capsys, "commit", "top.qcow2", "--domain-xml", str(dom),
                             "--disk", "vda")
        assert status == 1 and err.count("\n") == 1, err
        assert _snapshot(images) == files


def test_create_with_wrong_backing_format_creates_nothing(images: Path, capsys) -> None:
    setup_create()
    dom = images / "dom.xml"
    dom.write_text(subst((OPS_DIR / "create-in.xml").read_text(), images))
    files = _snapshot(images)
    status, _, err = cli(capsys, "create", "-b", "base.qcow2", "-F", "raw", "new.qcow2",
                         "--domain-xml", str(dom), "--disk", "vda",
                         "--snapshot-xml", str(images / "snap.xml"))
    assert status == 1 and err.count("\n") == 1
    assert _snapshot(images) == files


def test_rebase_name_too_long_leaves_xml(images: Path, capsys) -> None:
    setup_rebase()
    dom = images / "dom.xml"
    dom.write_text(subst((OPS_DIR / "rebase-in.xml").read_text(), images))
    files = _snapshot(images)
    status, _, err = cli(capsys, "rebase", "-u", "-F", "raw", "-b", "o" * 1100, "top.qcow2",
                         "--domain-xml", str(dom), "--disk", "vda")
    assert status == 1 and "too long" in err
    assert _snapshot(images) == files


def test_xml_sync_golden(images: Path, capsys) -> None:
    """`xml sync` turns the commit case's bare disk into the full chain."""
    setup_two()
    dom = images / "dom.xml"
    dom.write_text(subst((OPS_DIR / "commit-in.xml").read_text(), images))
    status, _, err = cli(capsys, "xml", "sync", str(dom), "--disk", "vda")
    assert status == 0, err
    assert dom.read_text() == subst((OPS_DIR / "commit-out.xml").read_text(), images)
    validate(dom, "domain")
