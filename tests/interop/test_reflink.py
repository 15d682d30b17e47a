"""Copy-free data movement on a reflink file system (issue 14, item 1).

On XFS with ``reflink=1``, ``copy_file_range`` between files of one file system
shares the extents instead of copying them when offsets and lengths are
FS-block aligned.  Each test builds a chain with qemu-img/qemu-io on such a file
system, runs a pyqcow operation that moves cluster data, then checks with
``filefrag -v`` that a substantial part of the destination's data extents is
flagged ``shared`` (not copied) and with ``qemu-img compare`` that the result
reads as before.

The XFS file system is made by the fixture itself: a sparse file under tmp,
``mkfs.xfs -m reflink=1``, a loop device, a mount; all torn down afterwards.
Needs root, loop devices and xfsprogs: skipped elsewhere with the reason, and
a failure under CI (the ``CI`` environment variable set).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import qemu
from qemu import compare, create, qemu_img, qemu_io

from pyqcow import fastcopy
from pyqcow.cli.main import main as cli
from pyqcow.ops.commit import commit
from pyqcow.ops.merge import merge
from pyqcow.ops.rebase import rebase
from pyqcow.ops.stream import stream

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: the share of the moved data that must land in shared extents
SHARED_MIN = 0.75
BLOCK = 4 * KiB  # mkfs.xfs's default block size

pytestmark = pytest.mark.usefixtures("qemu_img_path", "qemu_io_path")



@pytest.fixture(scope="module")
def xfs(xfs_reflink: Path) -> Path:
    return xfs_reflink


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


@pytest.fixture
def wd(xfs: Path, request) -> Path:
    d = xfs / request.node.name.replace("[", "_").replace("]", "_")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def extents(path: Path) -> list[tuple[int, set[str]]]:
    """(length in blocks, flags) of each extent ``filefrag -v`` lists for ``path``."""
    proc = _run("filefrag", "-s", "-v", str(path))
    assert proc.returncode == 0, proc.stderr
    out = []
    for line in proc.stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 5 or not parts[0].strip().isdigit():
            continue
        flags = {f.strip() for f in parts[-1].split(",") if f.strip()}
        out.append((int(parts[3]), flags))
    return out


def shared_fraction(path: Path) -> tuple[float, int, int]:
    """(shared / data blocks, shared blocks, data blocks) of ``path``'s extents
    (preallocated, unwritten extents are not data)."""
    data = shared = 0
    for length, flags in extents(path):
        if "unwritten" in flags:
            continue
        data += length
        if "shared" in flags:
            shared += length
    return (shared / data if data else 0.0), shared, data


def assert_shares(path: Path, moved: int) -> None:
    """At least SHARED_MIN of the ``moved`` bytes of data are in shared extents."""
    frac, shared, data = shared_fraction(path)
    assert data > 0, f"{path.name} has no data extents"
    assert shared * BLOCK >= SHARED_MIN * moved, (
        f"{path.name}: only {shared} of {data} data blocks are shared extents "
        f"({frac:.0%}), for {moved // BLOCK} blocks moved; filefrag -v:\n"
        f"{_run('filefrag', '-v', str(path)).stdout}"
    )


def chain(d: Path) -> tuple[Path, Path]:
    """base (24 MiB of data in a 64 MiB disk) <- top (part of that rewritten,
    plus data where the base has none)."""
    base, top = d / "base.qcow2", d / "top.qcow2"
    create(base, 64 * MiB)
    qemu_io(base, "write -P 0x11 0 16M", "write -P 0x12 32M 8M")
    create(top, 64 * MiB, backing=base, backing_fmt="qcow2")
    # one cluster in four of 8M..16M too: the layer changes every few clusters there
    scattered = [f"write -P 0x24 {8 * MiB + i * 256 * KiB} 64k" for i in range(32)]
    qemu_io(top, "write -P 0x21 0 8M", "write -P 0x22 36M 4M", "write -P 0x23 48M 4M",
            *scattered)
    return base, top


TOP_DATA = 18 * MiB  # what the top of chain() holds
STREAMED = 10 * MiB  # base data not covered by the top: in 8M..16M, 32M..36M
GUEST_DATA = 28 * MiB  # guest data of the chain: 0..16M, 32M..40M, 48M..52M


def run(capsys, *argv) -> int:
    status = cli([str(a) for a in argv])
    capsys.readouterr()
    return status


def test_fixture_makes_reflink_xfs(wd: Path) -> None:
    a, b = wd / "a", wd / "b"
    a.write_bytes(b"\x5a" * (4 * MiB))
    with open(a, "rb") as src, open(b, "wb") as dst:
        os.copy_file_range(src.fileno(), dst.fileno(), 4 * MiB)
    assert shared_fraction(b)[0] == 1.0
    with open(a, "rb") as src, open(b, "r+b") as dst:
        assert fastcopy.can_share(src.fileno(), dst.fileno())


def test_commit_shares_extents(wd: Path) -> None:
    base, top = chain(wd)
    view = wd / "before.raw"
    qemu_img("convert", "-O", "raw", top, view)
    commit(top)
    assert compare(view, base, fmt_a="raw", fmt_b="qcow2") == 0
    assert_shares(base, TOP_DATA)  # the top's clusters, committed
    assert qemu.check_json(base)[1] == 0


def test_stream_shares_extents(wd: Path) -> None:
    base, top = chain(wd)
    view = wd / "before.raw"
    qemu_img("convert", "-O", "raw", top, view)
    stream(top)
    assert compare(view, top, fmt_a="raw", fmt_b="qcow2") == 0
    assert_shares(top, STREAMED)  # the base's clusters the top did not cover


def test_safe_rebase_shares_extents(wd: Path) -> None:
    """A safe rebase onto an empty image copies what the old backing shows where
    the top has nothing: from the base's clusters, shared."""
    base, top = chain(wd)
    create(wd / "new.qcow2", 64 * MiB)
    view = wd / "before.raw"
    qemu_img("convert", "-O", "raw", top, view)
    rebase(top, "new.qcow2", backing_format="qcow2")
    assert compare(view, top, fmt_a="raw", fmt_b="qcow2") == 0
    assert qemu.qemu_img_json("info", "--output=json", top)["backing-filename"] == "new.qcow2"
    assert_shares(top, STREAMED)
    assert qemu.check_json(top)[1] == 0


@pytest.mark.parametrize("keep,via,kept,source,moved", [
    ("base", "commit", "base.qcow2", "top.qcow2", TOP_DATA),
    ("top", "stream", "top.qcow2", "base.qcow2", STREAMED),
    ("top", "commit", "top.qcow2", "top.qcow2", TOP_DATA),
    ("base", "stream", "base.qcow2", "base.qcow2", STREAMED),
], ids=["commit-keep-base", "stream-keep-top", "commit-keep-top", "stream-keep-base"])
def test_merge_shares_extents(wd: Path, keep: str, via: str, kept: str, source: str,
                              moved: int) -> None:
    """merge in both directions: the data it moves lands in shared extents.  The
    file it moves the data from is removed at the end (its extents would then
    be the result's alone): a reflinked witness copy of it, made before, keeps
    them shared."""
    base, top = chain(wd)
    view = wd / "before.raw"
    qemu_img("convert", "-O", "raw", top, view)
    witness = wd / "aside" / "witness"  # (not beside the chain: not an overlay of it)
    witness.parent.mkdir()
    subprocess.run(["cp", "--reflink=always", str(wd / source), str(witness)], check=True)
    merge(top, keep=keep, via=via)
    result = wd / kept
    assert compare(view, result, fmt_a="raw", fmt_b="qcow2") == 0
    assert_shares(result, moved)
    assert qemu.check_json(result)[1] == 0


@pytest.mark.parametrize("fmt,opts,prealloc", [
    ("raw", (), None),
    ("qcow2", (), None),
    ("raw", ("-m", "4"), None),
    ("qcow2", ("-m", "4", "-W"), None),
    ("qcow2", ("-S", "1M"), None),
    ("raw", ("-n",), "full"),
    ("qcow2", ("-n",), "falloc"),
    ("qcow2", ("-n",), "full"),
], ids=["raw", "qcow2", "raw-m4", "qcow2-m4-W", "qcow2-S1M", "raw-n-full", "qcow2-n-falloc", "qcow2-n-full"])
def test_convert_shares_extents(wd: Path, capsys, fmt: str, opts: tuple[str, ...],
                                prealloc: str | None) -> None:
    """Also into a target preallocated by qemu-img (-n): its allocated blocks are
    replaced by shared extents, not written over."""
    base, top = chain(wd)
    dst = wd / f"out.{fmt}"
    if prealloc is not None:
        create(dst, 64 * MiB, f"preallocation={prealloc}", fmt=fmt)
    assert run(capsys, "convert", "-O", fmt, *opts, top, dst) == 0
    assert compare(top, dst, fmt_a="qcow2", fmt_b=fmt) == 0
    assert_shares(dst, GUEST_DATA)
    if fmt == "qcow2":
        assert qemu.check_json(dst)[1] == 0


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_mixed_chain(wd: Path, capsys, fmt: str) -> None:
    """Compressed clusters (read and written) beside plain ones (shared), and
    subclusters of an extended-L2 top (edges that are not cluster boundaries)."""
    plain, base, top = wd / "plain.qcow2", wd / "base.qcow2", wd / "top.qcow2"
    create(plain, 16 * MiB)
    qemu_io(plain, "write -P 0x31 0 4M")
    qemu_img("convert", "-c", "-O", "qcow2", plain, base)
    create(top, 16 * MiB, "extended_l2=on", backing=base, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x41 4k 8k", "write -P 0x42 1M 1M", "write -P 0x43 6M 2M",
            "write -P 0x44 10M 6k")
    dst = wd / f"out.{fmt}"
    assert run(capsys, "convert", "-O", fmt, top, dst) == 0
    assert compare(top, dst, fmt_a="qcow2", fmt_b=fmt) == 0
    assert_shares(dst, 3 * MiB)  # the top's whole clusters: 1M..2M, 6M..8M
    if fmt == "qcow2":
        assert qemu.check_json(dst)[1] == 0


@pytest.mark.parametrize("onto", ["layer", "copy"])
def test_convert_B_shares_extents(wd: Path, capsys, onto: str) -> None:
    """convert -O qcow2 -B: the clusters that differ from the backing are shared
    with the source's, whether the backing is the source's own base (only the
    top is read) or a copy of it (everything compared)."""
    base, top = chain(wd)
    backing = base
    if onto == "copy":
        backing = wd / "copy.qcow2"
        shutil.copy(base, backing)
    dst = wd / "out.qcow2"
    assert run(capsys, "convert", "-O", "qcow2", "-B", backing, "-F", "qcow2", top, dst) == 0
    assert compare(top, dst) == 0
    assert qemu.check_json(dst)[1] == 0
    assert_shares(dst, TOP_DATA)  # every cluster of the top differs from the base


def test_convert_S1M_shares_and_allocates_as_qemu(wd: Path, capsys) -> None:
    """-S larger than a cluster, from a chain whose layer changes every few
    clusters: the zero blocks are decided over whole -S blocks as qemu-img does
    (the same allocation map) while the data still goes as shared extents."""
    _base, top = chain(wd)
    q, p = wd / "q.qcow2", wd / "p.qcow2"
    qemu_img("convert", "-O", "qcow2", "-S", "1M", top, q)
    assert run(capsys, "convert", "-O", "qcow2", "-S", "1M", top, p) == 0

    def shape(path: Path) -> list[tuple]:
        return [(e["start"], e["length"], e["data"], e["zero"]) for e in qemu.map_json(path)]

    assert shape(p) == shape(q)
    assert compare(q, p) == 0
    assert_shares(p, GUEST_DATA)


def scattered_chain(d: Path, writes: int = 96, seed: int = 7) -> tuple[Path, Path, bytes]:
    """base (data in 0..32M of a 64 MiB disk) <- top written 64 KiB at a time at
    guest offsets in random order, half of them over the base's data: the top's
    data lies in one region of its file, in an order the guest's is not.  Also
    returns the guest content through the top."""
    import random

    base, top = d / "base.qcow2", d / "top.qcow2"
    create(base, 64 * MiB)
    qemu_io(base, "write -P 0x11 0 32M")
    create(top, 64 * MiB, backing=base, backing_fmt="qcow2")
    rng = random.Random(seed)
    slots = rng.sample(range(64 * MiB // (64 * KiB)), writes)
    model = bytearray(b"\x11" * (32 * MiB) + bytes(32 * MiB))
    cmds = []
    for n, slot in enumerate(slots):
        pattern = 0x20 + n % 200
        cmds.append(f"write -P {pattern} {slot * 64 * KiB} 64k")
        model[slot * 64 * KiB:(slot + 1) * 64 * KiB] = bytes([pattern]) * (64 * KiB)
    qemu_io(top, *cmds)
    return base, top, bytes(model)


def shared_extents(path: Path) -> int:
    return sum(1 for _length, flags in extents(path) if "shared" in flags)


def test_commit_shares_in_few_runs_and_frees_what_it_moved(wd: Path) -> None:
    """A commit on a reflink file system copies the top's clusters in the order
    of the top's file (new clusters of the base allocated in that order, the
    base's own clusters under them moved too): a few long shared extents, not
    one per guest run (each copy_file_range is one reflink, ~70 us on XFS:
    issue 14's XFS commit rows).  The clusters it moved away from are punched,
    so the base takes no more space than an in-place commit."""
    base, top, model = scattered_chain(wd)
    before = os.stat(base).st_blocks * 512
    commit(top)
    assert compare(top, base) == 0  # (top emptied: reads through to the base)
    got = wd / "got.raw"
    qemu_img("convert", "-O", "raw", base, got)
    assert got.read_bytes() == model
    assert qemu.check_json(base)[1] == 0
    # 96 writes in random guest order: in place that is ~96 shared extents
    assert 0 < shared_extents(base) <= 8, _run("filefrag", "-v", str(base)).stdout
    # every moved cluster's old copy was given back: what the base uses is its
    # old data plus the new clusters of the guest (48 x 64 KiB past 32M), not
    # also the 48 old clusters under the top's writes
    new_guest = sum(1 for i in range(32 * MiB // (64 * KiB), 1024)
                    if model[i * 64 * KiB:(i + 1) * 64 * KiB] != bytes(64 * KiB))
    grown = os.stat(base).st_blocks * 512 - before
    assert grown <= new_guest * 64 * KiB + 2 * MiB, (grown, new_guest)


def test_commit_relocation_then_more_writes(wd: Path) -> None:
    """After a relocating commit freed the base's old clusters, later writes
    (by qemu, then a second commit) reuse that space and read back right."""
    base, top, model = scattered_chain(wd)
    commit(top)
    qemu_io(top, "write -P 0x77 1M 3M", "write -P 0x78 40M 64k")
    model = bytearray(model)
    model[1 * MiB:4 * MiB] = b"\x77" * (3 * MiB)
    model[40 * MiB:40 * MiB + 64 * KiB] = b"\x78" * (64 * KiB)
    commit(top)
    got = wd / "got.raw"
    qemu_img("convert", "-O", "raw", base, got)
    assert got.read_bytes() == bytes(model)
    assert qemu.check_json(base)[1] == 0


@pytest.mark.parametrize("extra,most", [((), 56), (("-B", "base.qcow2", "-F", "qcow2"), 8)],
                         ids=["plain", "B"])
def test_convert_qcow2_shares_in_few_runs(wd: Path, capsys, extra: tuple[str, ...],
                                          most: int) -> None:
    """convert -O qcow2 (and -B) on a reflink file system: the output's clusters
    are allocated in the order of the source's, so the top's clusters, scattered
    over the guest, are shared in a few long runs, not one per guest run (in
    guest order: 142 extents, and 96 with -B).  The base's data stays broken
    where the top covers it (48 of its clusters): each break starts an extent."""
    _base, top, model = scattered_chain(wd)
    dst = wd / "out.qcow2"
    extra = tuple(str(wd / a) if a.endswith(".qcow2") else a for a in extra)
    assert run(capsys, "convert", "-O", "qcow2", *extra, top, dst) == 0
    assert qemu.check_json(dst)[1] == 0
    got = wd / "got.raw"
    qemu_img("convert", "-O", "raw", dst, got)
    assert got.read_bytes() == model
    assert 0 < shared_extents(dst) <= most, _run("filefrag", "-v", str(dst)).stdout
