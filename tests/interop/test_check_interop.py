"""pyqcow check against qemu-img check (7.2) as the oracle.

The JSON must be the same text (``qemu-img check --output=json``), the exit
status the same, and the repairs must leave images that qemu-img finds as
clean as pyqcow does, with the same guest data.

What qemu-img 7.2 does, and these tests pin down:

- optional keys appear only when non-zero (``has_x = x != 0`` in
  collect_image_check); filename, format and check-errors are always there;
- a lazy-refcounts image left dirty by qemu-io ``abort`` has refcount 0 on its
  new clusters: read-only check counts each as a corruption ("ERROR cluster N
  refcount=0 reference=1") plus one OFLAG_COPIED corruption per data cluster;
  ``-r leaks`` cannot fix refcount 0 ("ERROR need to rebuild refcount
  structures", no JSON, exit 1); ``-r all`` rebuilds the refcount structure;
- after a repair qemu-img checks again and prints that result with the
  ``leaks-fixed`` / ``corruptions-fixed`` of the repair;
- an L2 entry pointing past the end of the file, or a misaligned data cluster,
  is reported but not repaired (its COPIED flag is): ``-r all`` exits 2.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from interop.shapes import SHAPES, Shape
from qemu import QemuError, convert_raw, create, qemu_io, require_tool, snapshot_create

import pyqcow
from pyqcow.check_result import CheckFailed
from pyqcow.cli.check import human_report
from pyqcow.cli.output import qemu_json
from pyqcow.ops.check import check

KiB = 1024
MiB = 1024 * KiB
COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")


# --- running both checkers ---------------------------------------------------


def qemu_check(path: Path, repair: str | None = None) -> tuple[str | None, int, str]:
    """qemu-img check --output=json -> (stdout or None, exit status, stderr)."""
    argv = ["qemu-img", "check", "--output=json"]
    if repair:
        argv += ["-r", repair]
    proc = subprocess.run(
        [*argv, os.fspath(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, LC_ALL="C"),
        timeout=300,
        check=False,
    )
    assert proc.returncode in (0, 1, 2, 3), proc.stderr
    return (proc.stdout or None), proc.returncode, proc.stderr


def pyqcow_check(path: Path, repair: str | None = None) -> tuple[str | None, int, list[str]]:
    """pyqcow's check, rendered like qemu-img check --output=json."""
    messages: list[str] = []
    try:
        result = check(os.fspath(path), repair, log=messages.append)
    except CheckFailed:
        return None, 1, messages
    return qemu_json(result.as_qemu_json()) + "\n", result.exit_code, messages


def _norm(text: str | None, path: Path) -> str | None:
    if text is None:
        return None
    return text.replace(json.dumps(os.fspath(path)), '"IMAGE"')


def compare_check(path: Path, repair: str | None = None) -> tuple[Path, Path, int]:
    """Run both checkers (on separate copies when repairing); assert the same output.

    Returns the copies (qemu's, pyqcow's) and the exit status.
    """
    if repair is None:
        theirs = qemu_check(path)
        ours = pyqcow_check(path)
        q = p = path
    else:
        q = path.with_name(path.stem + ".q" + path.suffix)
        p = path.with_name(path.stem + ".p" + path.suffix)
        shutil.copyfile(path, q)
        shutil.copyfile(path, p)
        theirs = qemu_check(q, repair)
        ours = pyqcow_check(p, repair)
    assert (_norm(ours[0], p), ours[1]) == (_norm(theirs[0], q), theirs[1]), (
        f"qemu-img check {repair or ''} stderr:\n{theirs[2]}\npyqcow messages:\n"
        + "\n".join(ours[2])
    )
    # the stderr messages too (qemu's own prefixed lines aside)
    qemu_lines = [
        ln
        for ln in theirs[2].splitlines()
        if not ln.startswith("qemu-img:") and "warning" not in ln
    ]
    ours_lines = [ln for ln in ours[2] if not ln.startswith("qcow2:")]
    if not any("Some clusters may be leaked" in ln for ln in theirs[2].splitlines()):
        assert ours_lines == qemu_lines
    return q, p, ours[1]


def raw_of(path: Path, out: Path) -> bytes:
    convert_raw(path, out)
    return out.read_bytes()


# --- every shape ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("check_shapes")


_built: dict[str, Shape] = {}


def _shape(name: str, base: Path) -> Shape:
    if name not in _built:
        _built[name] = SHAPES[name](base)
    return _built[name]


@pytest.mark.parametrize("repair", [None, "leaks", "all"], ids=["ro", "leaks", "all"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_check_matches_qemu(name: str, repair: str | None, shapes_dir: Path) -> None:
    shape = _shape(name, shapes_dir)
    q, p, _ = compare_check(shape.path, repair)
    if repair == "all":
        # afterwards both checkers find the repaired image clean
        assert qemu_check(p)[1] == 0
        assert pyqcow_check(p)[1] == 0
    for f in {q, p} - {shape.path}:
        f.unlink()


# --- hand-corrupted images --------------------------------------------------------


def _u64(path: Path, off: int) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def _put64(path: Path, off: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">Q", value))


def _hdr(path: Path) -> dict:
    with open(path, "rb") as f:
        b = f.read(104)
    cb = struct.unpack(">I", b[20:24])[0]
    return {
        "cs": 1 << cb,
        "l1": struct.unpack(">Q", b[40:48])[0],
        "rt": struct.unpack(">Q", b[48:56])[0],
        "order": struct.unpack(">I", b[96:100])[0],
    }


def _l2_entry_offset(path: Path, guest: int) -> int:
    h = _hdr(path)
    cs = h["cs"]
    n = cs // 8
    c = guest // cs
    l1e = _u64(path, h["l1"] + 8 * (c // n))
    return (l1e & OFFSET_MASK) + 8 * (c % n)


def _data_cluster(path: Path, guest: int) -> int:
    return (_u64(path, _l2_entry_offset(path, guest)) & OFFSET_MASK) // _hdr(path)["cs"]


def _set_refcount(path: Path, cluster: int, value: int) -> None:
    h = _hdr(path)
    assert h["order"] == 4
    per = h["cs"] * 8 // 16
    block = _u64(path, h["rt"] + 8 * (cluster // per)) & ~0x1FF
    with open(path, "r+b") as f:
        f.seek(block + 2 * (cluster % per))
        f.write(struct.pack(">H", value))


def _base(path: Path, *opts: str) -> Path:
    create(path, 64 * MiB, *opts)
    qemu_io(path, "write -P 0x11 0 256k", "write -P 0x22 1M 64k", "write -P 0x33 3M 128k")
    return path


def c_refcount_zero(p: Path) -> None:
    """The refcount of a data cluster set to 0 (refcount too low: rebuild)."""
    _set_refcount(p, _data_cluster(p, 0), 0)


def c_refcount_high(p: Path) -> None:
    """A data cluster's refcount 2 instead of 1: a leak."""
    _set_refcount(p, _data_cluster(p, 64 * KiB), 2)


def c_leaked_cluster(p: Path) -> None:
    """Refcount 1 on a cluster nothing references (appended to the file)."""
    cs = _hdr(p)["cs"]
    size = p.stat().st_size
    cluster = -(-size // cs)
    with open(p, "r+b") as f:
        f.truncate((cluster + 1) * cs)
    _set_refcount(p, cluster, 1)


def c_refcount_past_eof(p: Path) -> None:
    """Refcount 1 on a cluster past the end of the file: qemu does not look there."""
    _set_refcount(p, 40, 1)


def c_copied_cleared(p: Path) -> None:
    """COPIED flag cleared on an L2 entry."""
    e = _l2_entry_offset(p, 0)
    _put64(p, e, _u64(p, e) & ~COPIED)


def c_l1_copied_cleared(p: Path) -> None:
    h = _hdr(p)
    _put64(p, h["l1"], _u64(p, h["l1"]) & ~COPIED)


def c_past_eof(p: Path) -> None:
    """An L2 entry pointing past the end of the file (not repairable, as in qemu)."""
    _put64(p, _l2_entry_offset(p, 2 * 64 * KiB), COPIED | (100 * MiB))


def c_unaligned(p: Path) -> None:
    """A data cluster at a misaligned offset (reported, not repaired, as in qemu)."""
    _put64(p, _l2_entry_offset(p, 6 * 64 * KiB), COPIED | (0x50000 + 512))


def c_overlap_l1(p: Path) -> None:
    """A data cluster overlapping the L1 table."""
    _put64(p, _l2_entry_offset(p, 5 * 64 * KiB), COPIED | _hdr(p)["l1"])


def c_overlap_refblock(p: Path) -> None:
    """A data cluster overlapping a refcount block (refblock refcount 2: rebuild)."""
    h = _hdr(p)
    block = _u64(p, h["rt"]) & ~0x1FF
    _put64(p, _l2_entry_offset(p, 7 * 64 * KiB), COPIED | block)


def c_reftable_unaligned(p: Path) -> None:
    _put64(p, _hdr(p)["rt"] + 8, 0x12340200)


def c_refblock_outside(p: Path) -> None:
    _put64(p, _hdr(p)["rt"] + 8, 100 * MiB)


def c_reftable_entry_zero(p: Path) -> None:
    """The only refcount block unhooked: every refcount reads 0."""
    _put64(p, _hdr(p)["rt"], 0)


def c_l1_reserved_bits(p: Path) -> None:
    h = _hdr(p)
    _put64(p, h["l1"], _u64(p, h["l1"]) | (1 << 60))


def c_corrupt_bit(p: Path) -> None:
    """Corrupt bit set on a consistent image, plus a leak."""
    _put64(p, 72, _u64(p, 72) | 2)
    _set_refcount(p, 30, 1)


def c_leak_and_copied(p: Path) -> None:
    """A leak and a wrong COPIED flag: -r leaks fixes only the leak."""
    c_refcount_high(p)
    c_copied_cleared(p)


def c_snapshot_refcount_low(p: Path) -> None:
    """With an internal snapshot: a shared data cluster's refcount 1 instead of 2."""
    snapshot_create(p, "s1")
    _set_refcount(p, _data_cluster(p, 0), 1)


def c_compressed_copied(p: Path) -> None:
    qemu_io(p, "write -c -P 0x44 4M 64k")
    e = _l2_entry_offset(p, 4 * MiB)
    _put64(p, e, _u64(p, e) | COPIED)


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    f.__name__[2:]: f
    for f in (
        c_refcount_zero,
        c_refcount_high,
        c_leaked_cluster,
        c_refcount_past_eof,
        c_copied_cleared,
        c_l1_copied_cleared,
        c_past_eof,
        c_unaligned,
        c_overlap_l1,
        c_overlap_refblock,
        c_reftable_unaligned,
        c_refblock_outside,
        c_reftable_entry_zero,
        c_l1_reserved_bits,
        c_corrupt_bit,
        c_leak_and_copied,
        c_snapshot_refcount_low,
        c_compressed_copied,
    )
}
# qemu-img check -r all leaves these corrupt too (it does not repair them)
NOT_REPAIRABLE = {"past_eof", "unaligned", "l1_reserved_bits", "overlap_l1", "compressed_copied"}


@pytest.fixture(params=sorted(CORRUPTIONS))
def corrupted(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, bytes]:
    """(name, corrupted image, guest data before the corruption)."""
    p = _base(tmp_path / "img.qcow2")
    before = raw_of(p, tmp_path / "before.raw")
    CORRUPTIONS[request.param](p)
    return request.param, p, before


@pytest.mark.parametrize("repair", [None, "leaks", "all"], ids=["ro", "leaks", "all"])
def test_corrupted_check_matches_qemu(corrupted, repair: str | None) -> None:
    name, p, _ = corrupted
    _, _, status = compare_check(p, repair)
    if repair is None:
        assert status in ((0,) if name in ("corrupt_bit", "refcount_past_eof") else (2, 3))


@pytest.mark.parametrize(
    "corrupted", sorted(set(CORRUPTIONS) - set(NOT_REPAIRABLE)), indirect=True
)
def test_repair_all_leaves_clean_image_with_same_data(corrupted, tmp_path: Path) -> None:
    name, p, before = corrupted
    out, status, _ = pyqcow_check(p, "all")
    assert status == 0, out
    assert qemu_check(p)[1] == 0, qemu_check(p)
    assert pyqcow_check(p)[1] == 0
    hdr = _u64(p, 72)
    assert not hdr & 3, "dirty/corrupt bit left set"
    if name not in ("overlap_refblock",):  # that one made guest data point at metadata
        assert raw_of(p, tmp_path / "after.raw") == before


@pytest.mark.parametrize("corrupted", sorted(NOT_REPAIRABLE), indirect=True)
def test_repair_all_unrepairable_keeps_guest_view(corrupted, tmp_path: Path) -> None:
    """qemu-img check -r all does not repair these either."""
    name, p, _ = corrupted
    q = p.with_name("q.qcow2")
    shutil.copyfile(p, q)
    try:
        view = raw_of(p, tmp_path / "corrupt.raw")
    except QemuError:  # qemu cannot read it at all (misaligned data cluster)
        view = None
    pyqcow_check(p, "all")
    qemu_check(q, "all")
    # both leave the same verdict, and pyqcow's repair did not change what qemu reads
    assert _norm(pyqcow_check(p)[0], p) == _norm(qemu_check(q)[0], q)
    if view is not None:
        assert raw_of(p, tmp_path / "after.raw") == view


def test_repair_leaks_fixes_leaks_only(tmp_path: Path) -> None:
    p = _base(tmp_path / "img.qcow2")
    c_snapshot_refcount_low(p)  # refcount 1 where 2 references: corruption
    c_leaked_cluster(p)
    out, status, _ = pyqcow_check(p, "leaks")
    report = json.loads(out)
    assert report["leaks-fixed"] == 1
    assert "leaks" not in report
    # the refcount that is too low, and the COPIED flag it makes wrong, stay
    assert report["corruptions"] == 2 and status == 2
    assert json.loads(qemu_check(p)[0])["corruptions"] == 2
    out, status, _ = pyqcow_check(p, "all")
    assert (
        status == 0 and json.loads(out)["corruptions-fixed"] == 1
    )  # the COPIED one resolves itself
    assert qemu_check(p)[1] == 0


def test_repair_leaks_also_fixes_copied_flags_when_refcounts_are_sound(tmp_path: Path) -> None:
    """qemu's check_oflag_copied repairs under -r leaks once nothing else is wrong."""
    p = _base(tmp_path / "img.qcow2")
    c_leak_and_copied(p)
    out, status, _ = pyqcow_check(p, "leaks")
    report = json.loads(out)
    assert (report["leaks-fixed"], report["corruptions-fixed"], status) == (1, 1, 0)
    assert qemu_check(p)[1] == 0


# --- dirty (lazy refcounts) images ------------------------------------------------------


def _dirty_image(path: Path) -> Path:
    create(path, 64 * MiB, "lazy_refcounts=on")
    qemu_io(path, "write -P 0x55 0 1M")
    snapshot_create(path, "s1")
    qemu_io(
        path,
        "write -P 0x66 64k 128k",
        "write -P 0x77 10M 64k",
        "abort",
        allow_failure=True,
    )
    assert _u64(path, 72) & 1, "dirty bit not set"
    return path


@pytest.mark.parametrize("repair", [None, "leaks", "all"], ids=["ro", "leaks", "all"])
def test_lazy_refcounts_abort_matches_qemu(tmp_path: Path, repair: str | None) -> None:
    p = _dirty_image(tmp_path / "dirty.qcow2")
    q, mine, status = compare_check(p, repair)
    if repair == "all":
        assert status == 0
        assert not _u64(mine, 72) & 1
        assert raw_of(mine, tmp_path / "a.raw") == raw_of(q, tmp_path / "b.raw")


def test_open_rw_repairs_dirty_image(tmp_path: Path) -> None:
    p = _dirty_image(tmp_path / "dirty.qcow2")
    before = bytearray(raw_of(p, tmp_path / "before.raw"))
    with pyqcow.open(p, "r+") as img:
        assert not img.header.dirty
        img.write(5 * MiB + 100, b"\x88" * 70000)
    before[5 * MiB + 100 : 5 * MiB + 100 + 70000] = b"\x88" * 70000
    assert not _u64(p, 72) & 1
    assert qemu_check(p)[1] == 0, qemu_check(p)
    assert pyqcow_check(p)[1] == 0
    assert raw_of(p, tmp_path / "after.raw") == bytes(before)
    # the snapshot still reads what it held
    snap = tmp_path / "snap.raw"
    convert_raw(p, snap, "s1")
    data = snap.read_bytes()
    assert data[: 1 * MiB] == b"\x55" * MiB


# --- the writer against both checkers ---------------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [
        (),
        ("cluster_size=512",),
        ("refcount_bits=1",),
        ("refcount_bits=64",),
        ("compat=0.10",),
        ("extended_l2=on",),
    ],
    ids=lambda o: ",".join(o) or "default",
)
def test_random_writes_check_clean(tmp_path: Path, opts: tuple[str, ...]) -> None:
    p = tmp_path / "w.qcow2"
    size = 8 * MiB
    create(p, size, *opts)
    qemu_io(
        p,
        "write -P 0x12 0 1M",
        "write -c -P 0x34 2M 64k"
        if "refcount_bits=1" not in opts and "cluster_size=512" not in opts
        else "write -P 0x34 2M 64k",
    )
    model = bytearray(raw_of(p, tmp_path / "m.raw"))
    rng = random.Random(1234 + len(opts))
    with pyqcow.open(p, "r+") as img:
        for _ in range(60):
            off = rng.randrange(0, size - 1)
            n = rng.randrange(1, min(200 * KiB, size - off))
            op = rng.random()
            if op < 0.7:
                data = bytes([rng.randrange(256)]) * n
                img.write(off, data)
                model[off : off + n] = data
            elif op < 0.85:
                img.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                img.discard(off, n)
                # discard frees whole clusters only; re-read what they now read as
                model[off : off + n] = img.read(off, n)
    assert qemu_check(p)[1] == 0, qemu_check(p)
    out, status, msgs = pyqcow_check(p)
    assert status == 0, (out, msgs)
    assert _norm(out, p) == _norm(qemu_check(p)[0], p)
    assert raw_of(p, tmp_path / "after.raw") == bytes(model)


# --- the CLI --------------------------------------------------------------------------------


def _cli(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from pyqcow.cli.main import SUBCOMMANDS, main

    assert "check" in SUBCOMMANDS
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("corruption", ["none", "refcount_high", "copied_cleared", "refcount_zero"])
def test_cli_human_output_and_status_match_qemu(tmp_path: Path, corruption: str) -> None:
    p = _base(tmp_path / "img.qcow2")
    qemu_io(p, "write -c -P 0x44 5M 64k")
    if corruption != "none":
        CORRUPTIONS[corruption](p)
    for repair in (None, "leaks", "all"):
        q = tmp_path / f"q-{repair}.qcow2"
        mine = tmp_path / f"p-{repair}.qcow2"
        shutil.copyfile(p, q)
        shutil.copyfile(p, mine)
        rflag = ["-r", repair] if repair else []
        proc = subprocess.run(
            ["qemu-img", "check", *rflag, q], capture_output=True, text=True, check=False
        )
        status, out, err = _cli("check", *rflag, os.fspath(mine))
        assert status == proc.returncode
        assert out == proc.stdout
        if status == 1:
            assert "Check failed" in err


def test_cli_json_and_errors(tmp_path: Path) -> None:
    p = _base(tmp_path / "img.qcow2")
    status, out, _ = _cli("check", "--output", "json", os.fspath(p))
    assert status == 0
    assert out == qemu_check(p)[0]
    status, out, err = _cli("check", os.fspath(tmp_path / "missing.qcow2"))
    assert status == 1 and err.startswith("pyqcow: ")
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(4096))
    status, _, err = _cli("check", os.fspath(raw))
    assert status == 63 and "does not support checks" in err  # as qemu-img


def test_human_report_matches_qemu_for_dirty(tmp_path: Path) -> None:
    p = _dirty_image(tmp_path / "dirty.qcow2")
    proc = subprocess.run(["qemu-img", "check", p], capture_output=True, text=True, check=False)
    assert human_report(check(p)) == proc.stdout
