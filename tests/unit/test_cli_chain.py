"""The chain commands through the CLI, in-process: create, commit, stream, rebase,
merge, xml sync -- exit status, output, one-line errors on bad input, ``-p``
and ``-q``, and the ``--domain-xml`` plumbing (plan before, write after).

Images are made with pyqcow's own API (no qemu needed); tests/interop has the
differential and libvirt-schema checks.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import pyqcow
from pyqcow.cli.main import main
from pyqcow.cli.progress import ProgressBar
from pyqcow.newimage import create
from pyqcow.ops.plan import unallocated_ranges

KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB
CS = 64 * KiB


# -- helpers -------------------------------------------------------------------------------
def write(path: Path, offset: int, data: bytes) -> None:
    with pyqcow.open(path, "r+") as img:
        img.write(offset, data)
        img.flush()


def read(path: Path, offset: int = 0, length: int = SIZE) -> bytes:
    with pyqcow.open(path) as img:
        return img.read(offset, length)


def backing_of(path: Path) -> str | None:
    with pyqcow.open(path, backing_root=None) as img:
        return img.header.backing_file or None


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    """base.qcow2 (2 MiB of 0xb0 data) <- top.qcow2 (128 KiB of 0x70 at 1 MiB)."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    create(base, SIZE)
    write(base, 0, b"\xb0" * (2 * MiB))
    create(top, backing="base.qcow2", backing_format="qcow2")
    write(top, MiB, b"\x70" * (128 * KiB))
    return base, top


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *needles: str) -> None:
    assert status == 1, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pyqcow: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], err


def expected_view(base: bytes, top_writes: dict[int, bytes]) -> bytes:
    buf = bytearray(base)
    for off, data in top_writes.items():
        buf[off : off + len(data)] = data
    return bytes(buf)


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
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def domain(tmp_path: Path, src: Path) -> Path:
    p = tmp_path / "dom.xml"
    p.write_text(DOMAIN.format(src=src))
    return p


# -- create ------------------------------------------------------------------------------------
def test_create_plain(tmp_path, capsys):
    img = tmp_path / "a.qcow2"
    status, out, err = run(capsys, "create", "-f", "qcow2", "-o", "cluster_size=4k", img, "1M")
    assert (status, out, err) == (0, "", "")
    with pyqcow.open(img) as i:
        assert i.virtual_size == MiB and i.cluster_size == 4096


def test_create_overlay_probes_with_notice(chain, capsys):
    base, _ = chain
    new = base.parent / "new.qcow2"
    status, out, err = run(capsys, "create", "-b", "base.qcow2", new)
    assert status == 0 and out == ""
    assert err.startswith("pyqcow: ") and "probed qcow2" in err and "-F qcow2" in err
    assert backing_of(new) == "base.qcow2"  # stored as given
    assert read(new) == read(base)


def test_create_overlay_quiet_and_explicit_format(chain, capsys):
    base, _ = chain
    assert run(capsys, "create", "-q", "-b", "base.qcow2", base.parent / "q.qcow2") == (0, "", "")
    status, out, err = run(capsys, "create", "-b", "base.qcow2", "-F", "qcow2",
                           base.parent / "f.qcow2")
    assert (status, out, err) == (0, "", "")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["create", "{d}/a.qcow2"], "size"),
        (["create", "{d}/a.qcow2", "12Q"], "invalid size"),
        (["create", "-b", "missing.qcow2", "{d}/a.qcow2"], "not found"),
        (["create", "-o", "bogus=1", "{d}/a.qcow2", "1M"], "bogus"),
        (["create", "-b", "base.qcow2", "{d}/base.qcow2"], "its own backing file"),
    ],
)
def test_create_bad_input(chain, capsys, argv, needle):
    base, _ = chain
    before = base.read_bytes()
    argv = [a.format(d=base.parent) for a in argv]
    status, _, err = run(capsys, *argv)
    assert_one_line_error(status, err, needle)
    assert base.read_bytes() == before
    assert not (base.parent / "a.qcow2").exists()


def test_create_dry_run_creates_nothing(chain, capsys):
    base, _ = chain
    status, out, _ = run(capsys, "create", "-b", "base.qcow2", "-F", "qcow2", "--dry-run",
                         base.parent / "n.qcow2")
    assert status == 0 and out.startswith("would create")
    assert not (base.parent / "n.qcow2").exists()


# -- commit -------------------------------------------------------------------------------------
def test_commit_empties_top(chain, capsys):
    base, top = chain
    want = read(top)
    status, out, err = run(capsys, "commit", top)
    assert (status, out, err) == (0, "", "")
    assert read(base) == want and read(top) == want
    # top is empty: it reads the base everywhere
    assert not allocates(top)


def allocates(path: Path) -> bool:
    """Whether the image itself (not its backing) allocates any guest range."""
    with pyqcow.open(path) as img:
        return unallocated_ranges(img) != [(0, img.virtual_size)]


def test_commit_keep_top_and_progress(chain, capsys):
    base, top = chain
    want = read(top)
    status, out, err = run(capsys, "commit", "-d", "-p", top)
    assert status == 0 and out == ""
    assert "100.0%" in err and "[####" in err
    assert read(base) == want
    assert allocates(top)


def test_commit_quiet_silences_progress(chain, capsys):
    _, top = chain
    assert run(capsys, "commit", "-p", "-q", top) == (0, "", "")


def test_commit_dry_run_touches_nothing(chain, capsys):
    base, top = chain
    b, t = base.read_bytes(), top.read_bytes()
    status, out, _ = run(capsys, "commit", "--dry-run", top)
    assert status == 0 and "would commit 128 KiB (131072 bytes)" in out
    assert base.read_bytes() == b and top.read_bytes() == t


def test_commit_base_not_in_chain(chain, capsys, tmp_path):
    base, top = chain
    other = tmp_path / "other.qcow2"
    create(other, SIZE)
    b = base.read_bytes()
    status, _, err = run(capsys, "commit", "-b", other, top)
    assert_one_line_error(status, err, "not in the backing chain")
    assert base.read_bytes() == b


def test_commit_base_relative_to_top(chain, capsys, tmp_path, monkeypatch):
    _base, top = chain
    monkeypatch.chdir("/")
    status, _, err = run(capsys, "commit", "-b", "base.qcow2", top)
    assert status == 0, err


def test_commit_missing_image(tmp_path, capsys):
    status, _, err = run(capsys, "commit", tmp_path / "nope.qcow2")
    assert_one_line_error(status, err, "nope.qcow2")


def test_commit_missing_base(chain, capsys):
    base, top = chain
    base.unlink()
    status, _, err = run(capsys, "commit", top)
    assert_one_line_error(status, err, "base.qcow2", "not found")


def test_commit_without_backing(tmp_path, capsys):
    img = tmp_path / "lone.qcow2"
    create(img, SIZE)
    status, _, err = run(capsys, "commit", img)
    assert_one_line_error(status, err, "no backing file")


# -- stream -------------------------------------------------------------------------------------
def test_stream_all(chain, capsys):
    _base, top = chain
    want = read(top)
    assert run(capsys, "stream", top) == (0, "", "")
    assert backing_of(top) is None
    assert read(top) == want


@pytest.mark.parametrize("base", [False, True])
def test_stream_plans_once(chain, capsys, monkeypatch, base):
    """The command plans the copy once, under the operation's locks (the first,
    read-only look at the chain plans only for --dry-run, as commit does)."""
    from pyqcow.ops import stream as stream_op

    calls = []
    real = stream_op.plan_stream
    monkeypatch.setattr(stream_op, "plan_stream", lambda *a: calls.append(a) or real(*a))
    from pyqcow.chain import open_image
    from pyqcow.ops.plan import data_bytes
    from pyqcow.units import format_size

    base_img, top = chain
    want = read(top)
    args = ("-b", base_img) if base else ()
    with open_image(top, "r") as img:
        nbytes = data_bytes(real(img, img.backing if base else None))
    assert (nbytes > 0) != base
    calls.clear()
    status, out, _err = run(capsys, "stream", "--dry-run", *args, top)
    assert status == 0 and out.startswith(f"would stream {format_size(nbytes)} ({nbytes} bytes)")
    assert len(calls) <= 1
    calls.clear()
    assert run(capsys, "stream", *args, top) == (0, "", "")
    assert len(calls) == 1
    assert read(top) == want


def test_stream_keep_base(tmp_path, chain, capsys):
    base, _top = chain
    mid = tmp_path / "mid.qcow2"
    create(mid, backing="base.qcow2", backing_format="qcow2")
    write(mid, 3 * MiB, b"\x3d" * CS)
    create(tmp_path / "t3.qcow2", backing="mid.qcow2", backing_format="qcow2")
    t3 = tmp_path / "t3.qcow2"
    want = read(t3)
    status, out, err = run(capsys, "stream", "-b", base, "-p", t3)
    assert status == 0 and out == "" and "100.0%" in err
    assert backing_of(t3) == "base.qcow2"
    assert read(t3) == want


def test_stream_base_not_in_chain(chain, capsys, tmp_path):
    _, top = chain
    other = tmp_path / "other.qcow2"
    create(other, SIZE)
    t = top.read_bytes()
    status, _, err = run(capsys, "stream", "-b", other, top)
    assert_one_line_error(status, err, "not in the backing chain")
    assert top.read_bytes() == t


def test_stream_missing_image(tmp_path, capsys):
    status, _, err = run(capsys, "stream", tmp_path / "nope.qcow2")
    assert_one_line_error(status, err, "nope.qcow2")


# -- rebase ----------------------------------------------------------------------------------------
def test_rebase_unsafe_remove_backing(chain, capsys):
    _, top = chain
    assert run(capsys, "rebase", "-u", "-b", "", top) == (0, "", "")
    assert backing_of(top) is None


def test_rebase_safe_keeps_content(chain, capsys, tmp_path):
    _base, top = chain
    want = read(top)
    other = tmp_path / "other.qcow2"
    create(other, SIZE)
    write(other, 0, b"\x0f" * MiB)
    status, out, err = run(capsys, "rebase", "-b", "other.qcow2", "-F", "qcow2", "-p", top)
    assert status == 0 and out == "" and "100.0%" in err
    assert backing_of(top) == "other.qcow2"
    assert read(top) == want


def test_rebase_name_too_long(chain, capsys):
    _, top = chain
    t = top.read_bytes()
    status, _, err = run(capsys, "rebase", "-u", "-b", "x" * 1024, "-F", "qcow2", top)
    assert_one_line_error(status, err, "too long", "1023")
    assert top.read_bytes() == t


def test_rebase_missing_image_and_backing(chain, capsys, tmp_path):
    _, top = chain
    status, _, err = run(capsys, "rebase", "-b", "", tmp_path / "nope.qcow2")
    assert_one_line_error(status, err, "nope.qcow2")
    status, _, err = run(capsys, "rebase", "-b", "missing.qcow2", top)
    assert_one_line_error(status, err, "missing.qcow2", "not found")


def test_rebase_needs_b(chain, capsys):
    _, top = chain
    status, _, err = run(capsys, "rebase", top)
    assert status == 1 and "-b" in err and "Traceback" not in err


# -- merge ----------------------------------------------------------------------------------------
def test_merge_dry_run_human_and_json(chain, capsys):
    base, top = chain
    b, t = base.read_bytes(), top.read_bytes()
    status, out, _ = run(capsys, "merge", "--dry-run", top)
    assert status == 0
    assert "commit:  128 KiB (131072 bytes)" in out
    assert "stream:  1.88 MiB (1966080 bytes)" in out
    assert "via:     commit (the cheaper direction)" in out
    status, out, _ = run(capsys, "merge", "--dry-run", "--output", "json", "--keep", "top", top)
    doc = json.loads(out)
    assert doc["commit_bytes"] == 131072 and doc["stream_bytes"] == 1966080
    assert doc["keep"] == "top" and doc["via"] == "commit" and doc["done"] is False
    assert base.read_bytes() == b and top.read_bytes() == t


@pytest.mark.parametrize("keep", ["base", "top"])
@pytest.mark.parametrize("via", ["commit", "stream"])
def test_merge(chain, capsys, keep, via):
    base, top = chain
    want = read(top)
    status, out, err = run(capsys, "merge", "--keep", keep, "--via", via, top)
    assert (status, out, err) == (0, "", "")
    kept, gone = (base, top) if keep == "base" else (top, base)
    assert not gone.exists()
    assert read(kept) == want
    assert backing_of(kept) is None


def test_merge_json_after(chain, capsys):
    _base, top = chain
    status, out, _ = run(capsys, "merge", "--output", "json", top)
    assert status == 0 and json.loads(out)["done"] is True


def test_merge_without_backing(tmp_path, capsys):
    img = tmp_path / "lone.qcow2"
    create(img, SIZE)
    status, _, err = run(capsys, "merge", img)
    assert_one_line_error(status, err, "no backing file")


def test_merge_missing_image(tmp_path, capsys):
    status, _, err = run(capsys, "merge", tmp_path / "nope.qcow2")
    assert_one_line_error(status, err, "nope.qcow2")


def test_merge_shared_base_refused_without_force(chain, capsys, tmp_path):
    _base, top = chain
    create(tmp_path / "sibling.qcow2", backing="base.qcow2", backing_format="qcow2")
    status, _, err = run(capsys, "merge", top)
    assert_one_line_error(status, err, "sibling.qcow2", "--force")
    assert top.exists()


def test_commit_shared_base_warns(chain, capsys, tmp_path):
    _, top = chain
    create(tmp_path / "sibling.qcow2", backing="base.qcow2", backing_format="qcow2")
    status, _, err = run(capsys, "commit", top)
    assert status == 0
    assert err.startswith("pyqcow: warning: ") and len(err.splitlines()) == 1
    assert run(capsys, "commit", "-q", top) == (0, "", "")


# -- --domain-xml plumbing --------------------------------------------------------------------------
def test_create_with_domain_xml(chain, capsys):
    base, _ = chain
    dom = domain(base.parent, base)
    new = base.parent / "new.qcow2"
    status, out, err = run(capsys, "create", "-b", "base.qcow2", "-F", "qcow2", new,
                           "--domain-xml", dom, "--disk", "vda")
    assert (status, out, err) == (0, "", "")
    text = dom.read_text()
    assert f"<source file='{new}'/>" in text and f"<source file='{base}'/>" in text
    assert "<backingStore/>" in text


def test_domain_xml_unknown_disk_touches_nothing(chain, capsys):
    base, top = chain
    dom = domain(base.parent, top)
    x, b, t = dom.read_bytes(), base.read_bytes(), top.read_bytes()
    for argv in (
        ["create", "-b", "top.qcow2", "-F", "qcow2", base.parent / "n.qcow2"],
        ["commit", top], ["stream", top], ["rebase", "-b", "", top], ["merge", top],
    ):
        status, _, err = run(capsys, *argv, "--domain-xml", dom, "--disk", "vdz")
        assert_one_line_error(status, err, "vdz", "dom.xml")
        assert dom.read_bytes() == x and base.read_bytes() == b and top.read_bytes() == t
    assert not (base.parent / "n.qcow2").exists()


def test_domain_xml_unreadable_touches_nothing(chain, capsys):
    base, top = chain
    b, t = base.read_bytes(), top.read_bytes()
    status, _, err = run(capsys, "merge", top, "--domain-xml", base.parent / "no.xml",
                         "--disk", "vda")
    assert_one_line_error(status, err, "no.xml")
    (base.parent / "bad.xml").write_text("<domain><devices>")
    status, _, err = run(capsys, "commit", top, "--domain-xml", base.parent / "bad.xml",
                         "--disk", "vda")
    assert_one_line_error(status, err, "bad.xml", "not well-formed")
    assert base.read_bytes() == b and top.read_bytes() == t


def test_domain_xml_disk_names_other_image(chain, capsys):
    base, top = chain
    dom = domain(base.parent, base)  # the disk names base, not top
    x, t = dom.read_bytes(), top.read_bytes()
    status, _, err = run(capsys, "merge", top, "--domain-xml", dom, "--disk", "vda")
    assert_one_line_error(status, err, "names")
    assert dom.read_bytes() == x and top.read_bytes() == t


def test_disk_needs_domain_xml(chain, capsys):
    _, top = chain
    status, _, err = run(capsys, "commit", top, "--disk", "vda")
    assert_one_line_error(status, err, "--domain-xml")
    status, _, err = run(capsys, "commit", top, "--domain-xml", "x.xml")
    assert_one_line_error(status, err, "--disk")


def test_merge_with_domain_xml_dry_run_then_real(chain, capsys):
    base, top = chain
    dom = domain(base.parent, top)
    x = dom.read_bytes()
    status, out, _ = run(capsys, "merge", "--dry-run", top, "--domain-xml", dom, "--disk", "vda")
    assert status == 0
    assert f"-      <source file='{top}'/>" in out and f"+      <source file='{base}'/>" in out
    assert dom.read_bytes() == x and top.exists()
    status, out, err = run(capsys, "merge", top, "--domain-xml", dom, "--disk", "vda")
    assert (status, out, err) == (0, "", "")
    assert f"<source file='{base}'/>" in dom.read_text()


# -- xml sync --------------------------------------------------------------------------------------
def test_xml_sync(chain, capsys):
    base, top = chain
    dom = domain(base.parent, top)
    x = dom.read_bytes()
    status, out, _ = run(capsys, "xml", "sync", dom, "--disk", "vda", "--dry-run")
    assert status == 0 and out.startswith("--- ") and "+      <backingStore type='file'>" in out
    assert dom.read_bytes() == x
    assert run(capsys, "xml", "sync", dom, "--disk", "vda") == (0, "", "")
    text = dom.read_text()
    assert f"<source file='{base}'/>" in text and "<format type='qcow2'/>" in text
    status, out, _ = run(capsys, "xml", "sync", dom, "--disk", "vda", "--dry-run")
    assert status == 0 and "already names this chain" in out


def test_xml_sync_errors(chain, capsys, tmp_path):
    _base, _top = chain
    dom = domain(tmp_path, tmp_path / "gone.qcow2")
    x = dom.read_bytes()
    status, _, err = run(capsys, "xml", "sync", dom, "--disk", "vda")
    assert_one_line_error(status, err, "gone.qcow2")
    status, _, err = run(capsys, "xml", "sync", dom, "--disk", "vdq")
    assert_one_line_error(status, err, "vdq")
    assert dom.read_bytes() == x
    status, _, err = run(capsys, "xml", "sync", dom)
    assert status == 1 and "--disk" in err


# -- the progress bar ---------------------------------------------------------------------------------
def test_progress_bar_render():
    bar = ProgressBar(True, io.StringIO())
    text = bar.render(32 * MiB, 64 * MiB, 2.0)
    assert text.startswith(" 50.0% [#############.............]")
    assert "32 MiB / 64 MiB" in text and "16 MiB/s" in text and "0:02 left" in text
    assert bar.render(64 * MiB, 64 * MiB, 4.0).endswith("0:04 total")
    assert "100.0%" in bar.render(0, 0, 0.0)


def test_progress_bar_draws_and_finishes():
    stream = io.StringIO()
    ticks = iter(range(100))
    bar = ProgressBar(True, stream, clock=lambda: float(next(ticks)))
    bar(MiB, 4 * MiB)
    bar(4 * MiB, 4 * MiB)
    bar.finish()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and "100.0%" in text
    quiet = io.StringIO()
    off = ProgressBar(False, quiet)
    off(1, 2)
    off.finish()
    assert quiet.getvalue() == ""
    empty = io.StringIO()
    nothing = ProgressBar(True, empty)
    nothing.finish()
    assert "100.0%" in empty.getvalue() and "0 B / 0 B" in empty.getvalue()


def test_no_traceback_on_help(capsys):
    for cmd in ("create", "commit", "stream", "rebase", "merge", "xml"):
        assert main([cmd, "--help"]) == 0
    out, err = capsys.readouterr()
    assert "--domain-xml" in out and "Traceback" not in err


def test_create_dry_run_checks_input(tmp_path, capsys):
    status, _, err = run(capsys, "create", "--dry-run", tmp_path / "a.qcow2")
    assert_one_line_error(status, err, "size")
    status, _, err = run(capsys, "create", "--dry-run", "-b", "nope.qcow2", tmp_path / "a.qcow2")
    assert_one_line_error(status, err, "not found")
    assert not (tmp_path / "a.qcow2").exists()


def test_merge_dry_run_notes_other_users(chain, capsys, tmp_path):
    _, top = chain
    create(tmp_path / "sibling.qcow2", backing="base.qcow2", backing_format="qcow2")
    # the dry run shows the refusal and exits as the real run would (issue 11, item 15)
    status, out, err = run(capsys, "merge", "--dry-run", top)
    assert status == 1 and "sibling.qcow2" in out and "--force" in out and "refused:" in out
    assert "sibling.qcow2" in err
    status, out, _ = run(capsys, "merge", "--dry-run", "--force", top)
    assert status == 0 and "forced:" in out
    status, out, err = run(capsys, "merge", "--force", top)
    assert status == 0 and out == ""
    assert err.startswith("pyqcow: warning: ") and "sibling.qcow2" in err


@pytest.mark.parametrize(
    "xml, needle",
    [
        (("<domain type='kvm'><devices><disk type='network' device='disk'>"
         "<source protocol='nbd' name='x'/><target dev='vda'/></disk></devices></domain>"),
         "not type='file'"),
        (("<!DOCTYPE domain [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>"
         "<domain type='kvm'><name>&e;</name><devices/></domain>"), "entities"),
        ("<domain type='kvm'><devices>", "not well-formed"),
    ],
)
def test_bad_domain_xml_touches_nothing(chain, capsys, xml, needle):
    base, top = chain
    dom = base.parent / "dom.xml"
    dom.write_text(xml)
    x, b, t = dom.read_bytes(), base.read_bytes(), top.read_bytes()
    for argv in (["merge", top], ["commit", top], ["xml", "sync", dom]):
        status, _, err = run(capsys, *argv, *([] if argv[0] == "xml" else ["--domain-xml", dom]),
                             "--disk", "vda")
        assert_one_line_error(status, err, needle)
    assert dom.read_bytes() == x and base.read_bytes() == b and top.read_bytes() == t
