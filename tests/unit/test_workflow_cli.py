"""Issue 11 (trustworthy workflow): rebase loops, ``-f FMT``, the XML pre-flight
and ``xml sync`` after a merge, ``write_atomic`` without umask changes.

In-process CLI tests (``pyqcow.cli.main.main``), images made with pyqcow's API.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import pyqcow
from pyqcow.cli.main import main
from pyqcow.newimage import create

KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB


def write(path: Path, offset: int, data: bytes) -> None:
    with pyqcow.open(path, "r+") as img:
        img.write(offset, data)
        img.flush()


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def snapshot_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    """base.qcow2 (data) <- top.qcow2 (data)."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    create(base, SIZE)
    write(base, 0, b"\xb0" * (256 * KiB))
    create(top, backing="base.qcow2", backing_format="qcow2")
    write(top, MiB, b"\x70" * (128 * KiB))
    return base, top


# -- item 18: a rebase that would make a loop --------------------------------------------
@pytest.mark.parametrize("unsafe", [False, True], ids=["safe", "unsafe"])
def test_rebase_onto_own_overlay_refused_as_loop(chain, capsys, unsafe):
    base, top = chain
    before = snapshot_files(base.parent)
    argv = ["rebase", *(["-u"] if unsafe else []), "-F", "qcow2", "-b", "top.qcow2", base]
    status, _, err = run(capsys, *argv)
    assert status == 1, err
    assert len(err.splitlines()) == 1, err
    assert "loop" in err and "holds the image" not in err, err
    # the message names the chain: base -> top -> base
    assert "base.qcow2 -> " in err and "top.qcow2 -> " in err, err
    assert snapshot_files(base.parent) == before


@pytest.mark.parametrize("unsafe", [False, True], ids=["safe", "unsafe"])
def test_rebase_onto_itself_refused_as_loop(chain, capsys, unsafe):
    base, top = chain
    before = snapshot_files(base.parent)
    argv = ["rebase", *(["-u"] if unsafe else []), "-F", "qcow2", "-b", "top.qcow2", top]
    status, _, err = run(capsys, *argv)
    assert status == 1, err
    assert "loop" in err and "holds the image" not in err, err
    assert snapshot_files(base.parent) == before


def test_rebase_loop_api(chain):
    from pyqcow.errors import BackingChainError
    from pyqcow.ops.rebase import rebase

    base, top = chain
    with pytest.raises(BackingChainError, match=r"loop.*base\.qcow2 -> .*top\.qcow2 -> .*base"):
        rebase(base, "top.qcow2", backing_format="qcow2")
    with pytest.raises(BackingChainError, match="loop"):
        rebase(base, "top.qcow2", backing_format="qcow2", unsafe=True)


def test_rebase_onto_sibling_still_works(chain, capsys):
    base, top = chain
    other = base.parent / "other.qcow2"
    create(other, SIZE)
    status, _, err = run(capsys, "rebase", "-F", "qcow2", "-b", "other.qcow2", top)
    assert status == 0, err
    with pyqcow.open(top) as img:
        assert img.read(0, 256 * KiB) == b"\xb0" * (256 * KiB)
        assert img.read(MiB, 128 * KiB) == b"\x70" * (128 * KiB)


# -- item 21: -f FMT wherever qemu-img takes it ---------------------------------------------
@pytest.fixture
def raw_file(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(b"\x5a" * (64 * KiB))
    return p


def test_check_raw_exits_63_like_qemu_img(raw_file, chain, capsys):
    import subprocess

    from qemu import require_tool

    qemu_img = require_tool("qemu-img")
    base, _ = chain
    for argv in ([raw_file], ["-f", "raw", raw_file], ["-f", "raw", base]):
        q = subprocess.run([qemu_img, "check", *map(str, argv)], capture_output=True, text=True,
                           check=False)
        assert q.returncode == 63 and "This image format does not support checks" in q.stderr
        status, out, err = run(capsys, "check", *argv)
        assert status == 63, err
        assert out == ""
        assert err == f"pyqcow: {argv[-1]}: This image format does not support checks\n"


def test_check_f_raw_missing_file_is_an_error(tmp_path, capsys):
    status, _, err = run(capsys, "check", "-f", "raw", tmp_path / "missing.raw")
    assert status == 1 and "no such file" in err, err


def test_check_f_qcow2(raw_file, chain, capsys):
    base, _ = chain
    status, out, err = run(capsys, "check", "-f", "qcow2", base)
    assert status == 0, err
    assert "No errors were found on the image." in out
    status, out, err = run(capsys, "check", "-f", "qcow2", raw_file)
    assert status == 1 and len(err.splitlines()) == 1, err
    assert f"pyqcow: {raw_file}: not a qcow2 image" in err


def test_commit_f(raw_file, chain, capsys):
    base, top = chain
    status, _, err = run(capsys, "commit", "-f", "qcow2", "-d", top)
    assert status == 0, err
    with pyqcow.open(base) as img:
        assert img.read(MiB, 128 * KiB) == b"\x70" * (128 * KiB)
    # the given format is used, never probed: TOP read as raw has no backing file
    before = snapshot_files(base.parent)
    status, _, err = run(capsys, "commit", "-f", "raw", top)
    assert status == 1 and "no backing file" in err, err
    status, _, err = run(capsys, "commit", "-f", "qcow2", raw_file)
    assert status == 1 and "not a qcow2 image" in err, err
    assert snapshot_files(base.parent) == before


def test_rebase_f(raw_file, chain, capsys):
    base, top = chain
    before = snapshot_files(base.parent)
    status, _, err = run(capsys, "rebase", "-f", "raw", "-u", "-b", "", top)
    assert status == 1 and "opened as raw (-f raw)" in err, err
    status, _, err = run(capsys, "rebase", "-f", "qcow2", "-u", "-b", "", raw_file)
    assert status == 1 and "not a qcow2 image" in err, err
    assert snapshot_files(base.parent) == before
    status, _, err = run(capsys, "rebase", "-f", "qcow2", "-u", "-b", "", top)
    assert status == 0, err


@pytest.mark.parametrize("command", ["info", "map"])
def test_info_map_f_uses_the_given_format(raw_file, chain, capsys, command):
    base, _ = chain
    status, out, err = run(capsys, command, "-f", "raw", "--output", "json", base)
    assert status == 0, err
    if command == "info":
        import json

        assert json.loads(out)["format"] == "raw"
        assert json.loads(out)["virtual-size"] == base.stat().st_size
    status, _, err = run(capsys, command, "-f", "qcow2", raw_file)
    assert status == 1 and "not a qcow2 image" in err, err


def test_compare_f_and_F(raw_file, chain, capsys):
    base, _ = chain
    status, out, err = run(capsys, "compare", "-f", "raw", "-F", "raw", base, base)
    assert status == 0 and "identical" in out, err
    status, _, err = run(capsys, "compare", "-f", "qcow2", raw_file, base)
    assert status == 2 and "not a qcow2 image" in err, err


# -- item 27: write_atomic never touches the process-wide umask ------------------------------
def test_write_atomic_never_changes_umask(tmp_path: Path, monkeypatch) -> None:
    import stat

    from pyqcow.libvirt import write_atomic

    mask = os.umask(0o027)
    os.umask(mask)

    def no_umask(*_):
        raise AssertionError("os.umask called: it changes the umask of every thread")

    monkeypatch.setattr(os, "umask", no_umask)
    new = tmp_path / "new.xml"
    write_atomic(new, b"<domain/>")
    assert new.read_bytes() == b"<domain/>"
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~mask
    old = tmp_path / "old.xml"
    old.write_bytes(b"old")
    for mode in (0o640, 0o604, 0o600):
        old.chmod(mode)
        write_atomic(old, b"<domain/>")
        assert old.read_bytes() == b"<domain/>"
        assert stat.S_IMODE(old.stat().st_mode) == mode
    if os.geteuid() == 0:
        os.chown(old, 4321, 4322)
        write_atomic(old, b"<domain type='kvm'/>")
        assert (old.stat().st_uid, old.stat().st_gid) == (4321, 4322)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.xml", "old.xml"]


# -- item 10: the domain XML is pre-flighted before any image is touched ----------------------
DOMAIN = """<domain type='kvm'>
  <name>t</name>
  <memory unit='KiB'>65536</memory>
  <os>
    <type arch='x86_64'>hvm</type>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{src}'/>
      <target dev='vda' bus='virtio'/>{chain}
    </disk>
  </devices>
</domain>
"""


def domain(d: Path, src: Path, chain: str = "") -> Path:
    d.mkdir(exist_ok=True)
    p = d / "dom.xml"
    p.write_text(DOMAIN.format(src=src, chain=chain))
    return p


@contextlib.contextmanager
def read_only_dir(d: Path):
    """Make directory ``d`` unwritable, also for root (chmod does not stop root):
    a read-only bind mount of it onto itself, else the immutable attribute."""
    if os.geteuid() != 0:
        d.chmod(0o555)
        try:
            yield
        finally:
            d.chmod(0o755)
        return
    ok = subprocess.run(["mount", "--bind", d, d], capture_output=True, check=False)
    if ok.returncode == 0:
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", d], check=True, capture_output=True)
            yield
        finally:
            subprocess.run(["umount", d], check=True, capture_output=True)
        return
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", d], capture_output=True).returncode == 0:
        try:
            yield
        finally:
            subprocess.run([chattr, "-i", d], check=True, capture_output=True)
        return
    pytest.skip("cannot make a directory read-only for root here (no bind mount, no chattr)")


def _assert_read_only(d: Path) -> None:
    with pytest.raises(OSError):
        (d / "probe").write_bytes(b"")


@pytest.mark.parametrize("command", ["create", "commit", "rebase", "stream", "merge"])
def test_unwritable_xml_directory_refused_before_any_image_changes(chain, capsys, command):
    base, top = chain
    xml_dir = base.parent / "xml"
    dom = domain(xml_dir, top)
    argv = {
        "create": ["create", "-b", "top.qcow2", "-F", "qcow2", base.parent / "new.qcow2"],
        "commit": ["commit", top],
        "rebase": ["rebase", "-b", "", top],
        "stream": ["stream", top],
        "merge": ["merge", top],
    }[command]
    before = snapshot_files(base.parent)
    with read_only_dir(xml_dir):
        _assert_read_only(xml_dir)
        status, out, err = run(capsys, *argv, "--domain-xml", dom, "--disk", "vda")
        dry = run(capsys, *argv, "--domain-xml", dom, "--disk", "vda", "--dry-run")
    assert status == 1, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"pyqcow: {dom}: cannot write a file in its directory {xml_dir}"), err
    assert snapshot_files(base.parent) == before  # nothing created, nothing written
    assert dom.read_text() == DOMAIN.format(src=top, chain="")
    assert dry[0] == 1 and "cannot write a file in its directory" in dry[2]  # dry run: same refusal
    assert sorted(p.name for p in xml_dir.iterdir()) == ["dom.xml"]


# -- item 10: xml sync when the disk's <source> no longer exists -----------------------------
def xml_chain_text(*elements: tuple[Path, str]) -> str:
    """<backingStore> elements naming ``elements`` (below the source), terminated."""
    text = ""
    for path, fmt in reversed(elements):
        text = (f"<backingStore type='file'><format type='{fmt}'/><source file='{path}'/>"
                f"{text or '<backingStore/>'}</backingStore>")
    return "\n      " + (text or "<backingStore/>")


def test_xml_sync_after_plain_merge_uses_the_remaining_file(chain, capsys):
    base, top = chain
    dom = domain(base.parent / "xml", top, xml_chain_text((base, "qcow2")))
    status, _, err = run(capsys, "merge", top)  # no --domain-xml: the XML names a deleted top
    assert status == 0 and not top.exists(), err
    status, out, err = run(capsys, "xml", "sync", dom, "--disk", "vda")
    assert status == 0, err
    assert err.startswith(f"pyqcow: warning: {dom}: disk 'vda' names {top}, which no longer "
                          f"exists; using {base}"), err
    text = dom.read_text()
    assert f"<source file='{base}'/>" in text and str(top) not in text
    assert run(capsys, "xml", "sync", dom, "--disk", "vda") == (0, "", "")  # now in sync


def test_xml_sync_missing_source_picks_the_head_of_the_remaining_chain(tmp_path, capsys):
    base, mid, top = (tmp_path / n for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    create(base, SIZE)
    create(mid, backing="base.qcow2", backing_format="qcow2")
    dom = domain(tmp_path / "xml", top, xml_chain_text((mid, "qcow2"), (base, "qcow2")))
    status, _, err = run(capsys, "xml", "sync", "-q", dom, "--disk", "vda")
    assert (status, err) == (0, ""), err
    text = dom.read_text()
    assert f"<source file='{mid}'/>" in text and f"<source file='{base}'/>" in text
    assert str(top) not in text


def test_xml_sync_missing_source_ambiguous_or_nothing_left_refused(tmp_path, capsys):
    base, mid, top = (tmp_path / n for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    create(base, SIZE)
    create(mid, SIZE)  # not backed by base any more: two unrelated heads
    dom = domain(tmp_path / "xml", top, xml_chain_text((mid, "qcow2"), (base, "qcow2")))
    xml = dom.read_bytes()
    status, _, err = run(capsys, "xml", "sync", dom, "--disk", "vda")
    assert status == 1 and len(err.splitlines()) == 1, err
    assert f"names {top}, which no longer exists" in err and "--source FILE" in err
    assert f"{mid}" in err and f"{base}" in err
    assert dom.read_bytes() == xml
    mid.unlink()
    base.unlink()
    status, _, err = run(capsys, "xml", "sync", dom, "--disk", "vda")
    assert status == 1 and "no file of its chain in the XML exists" in err, err
    assert dom.read_bytes() == xml


def test_xml_sync_source_option(tmp_path, capsys):
    base, mid, top = (tmp_path / n for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    create(base, SIZE)
    create(mid, SIZE)
    dom = domain(tmp_path / "xml", top, xml_chain_text((mid, "qcow2"), (base, "qcow2")))
    xml = dom.read_bytes()
    # a file of the XML's chain
    status, _, err = run(capsys, "xml", "sync", dom, "--disk", "vda", "--source", base)
    assert status == 0, err
    assert f"<source file='{base}'/>" in dom.read_text() and str(mid) not in dom.read_text()
    # an image whose chain contains one of the XML's files (a new overlay of base)
    new = tmp_path / "new.qcow2"
    create(new, backing="base.qcow2", backing_format="qcow2")
    status, _, err = run(capsys, "xml", "sync", dom, "--disk", "vda", "--source", new)
    assert status == 0, err
    text = dom.read_text()
    assert f"<source file='{new}'/>" in text and f"<source file='{base}'/>" in text
    # an unrelated image, or a missing file: refused, XML untouched
    dom.write_bytes(xml)
    other = tmp_path / "other.qcow2"
    create(other, SIZE)
    status, _, err = run(capsys, "xml", "sync", dom, "--disk", "vda", "--source", other)
    assert status == 1 and "its backing chain contains none of them" in err, err
    status, _, err = run(capsys, "xml", "sync", dom, "--disk", "vda", "--source", top)
    assert status == 1 and "--source: no such file" in err, err
    assert dom.read_bytes() == xml


def test_pending_operation_none_without_records(tmp_path: Path):
    from pyqcow.cli.xml import _pending_operation

    assert _pending_operation(str(tmp_path / "dom.xml"), "vda") == []


# -- item 20: the copier works in short, reported slices ---------------------------------------
def test_slicer_copies_exactly_the_runs_in_short_reported_calls(tmp_path: Path, monkeypatch):
    from pyqcow import fastcopy
    from pyqcow.ops import copier

    src_data = os.urandom(3 * MiB)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(src_data)
    dst.write_bytes(bytes(4 * MiB))
    runs = [(0, MiB, 1536 * KiB), (2 * MiB, 0, 512 * KiB), (1536 * KiB, 3 * MiB, 700 * KiB)]
    calls: list[int] = []
    real = fastcopy.copy_runs

    def counting(s, d, part, **kw):
        calls.append(sum(r[2] for r in part))
        return real(s, d, part, **kw)

    monkeypatch.setattr(fastcopy, "copy_runs", counting)
    monkeypatch.setattr(copier, "SLICE_START", 256 * KiB)
    monkeypatch.setattr(copier, "SLICE_MAX", 256 * KiB)
    monkeypatch.setattr(copier, "SLICE_MIN", 64 * KiB)
    reported: list[int] = []
    slicer = copier.Slicer()
    with open(src, "rb") as s, open(dst, "r+b") as d:
        slicer.copy_runs(s.fileno(), d.fileno(), runs, report=reported.append)
    total = sum(r[2] for r in runs)
    assert max(calls) <= 256 * KiB and sum(calls) == total
    assert reported == calls
    expect = bytearray(4 * MiB)
    for so, do, n in runs:
        expect[do : do + n] = src_data[so : so + n]
    assert dst.read_bytes() == bytes(expect)
