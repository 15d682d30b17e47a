"""Chain operations (commit, stream, rebase, merge) against qemu-img as the oracle.

Every case builds a chain with qemu-img/qemu-io, copies it twice, runs the
pyqcow operation on one copy and qemu-img's equivalent on the other, then
checks: the results compare identical (``qemu-img compare``), every qcow2 file
passes ``qemu-img check`` (no errors, no leaks), and the top's guest content is
what it was before.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import qemu
from host_needs import backend_ctx

from pyqcow import fastcopy
from pyqcow.errors import QcowError
from pyqcow.ops.commit import commit
from pyqcow.ops.merge import merge
from pyqcow.ops.rebase import rebase
from pyqcow.ops.stream import stream

KiB = 1024
MiB = 1024 * KiB

pytestmark = pytest.mark.usefixtures("qemu_img_path", "qemu_io_path")


# --------------------------------------------------------------------------- chain builder


@dataclass
class ChainSpec:
    name: str
    base_fmt: str = "qcow2"
    depth: int = 2
    cluster_size: int = 64 * KiB
    opts: tuple[str, ...] = ()
    compressed: bool = False
    extended_l2: bool = False
    larger_top: bool = False
    absolute: bool = False
    units: int = 40  # virtual size in clusters
    extra: dict = field(default_factory=dict)


SPECS = {
    s.name: s
    for s in [
        ChainSpec("qcow2"),
        ChainSpec("raw_base", base_fmt="raw"),
        ChainSpec("deep3", depth=3),
        ChainSpec("deep3_raw", base_fmt="raw", depth=3),
        ChainSpec("compressed", compressed=True),
        ChainSpec("extl2", extended_l2=True, opts=("extended_l2=on",)),
        ChainSpec("c512", cluster_size=512, units=600),
        ChainSpec("c2m", cluster_size=2 * MiB, units=24),
        ChainSpec("larger_top", larger_top=True),
        ChainSpec("larger_top_raw", base_fmt="raw", larger_top=True),
        ChainSpec("absolute", absolute=True, depth=3),
        ChainSpec("v2", opts=("compat=0.10",)),
        ChainSpec("v2_deep3", opts=("compat=0.10",), depth=3),
        ChainSpec("refcount1", opts=("refcount_bits=1",)),
        ChainSpec("lazy", opts=("lazy_refcounts=on",), depth=3),
        ChainSpec("prealloc", extra={"base_opts": ("preallocation=metadata",)}),
        ChainSpec("snapshots", extra={"snapshot": True}, depth=3),
        ChainSpec("extl2_compressed", extended_l2=True, compressed=True, opts=("extended_l2=on",), depth=3),
    ]
}


@dataclass
class Chain:
    dir: Path
    files: list[Path]  # base first, top last
    fmts: list[str]
    absolute: bool = False

    @property
    def top(self) -> Path:
        return self.files[-1]

    @property
    def base(self) -> Path:
        return self.files[0]

    def copy(self, name: str) -> Chain:
        d = self.dir.parent / name
        shutil.copytree(self.dir, d)
        new = Chain(d, [d / f.name for f in self.files], list(self.fmts), self.absolute)
        if self.absolute:  # point the copies at each other, not at the originals
            for below, f, fmt in zip(new.files, new.files[1:], new.fmts):
                qemu.qemu_img("rebase", "-q", "-u", "-b", str(below), "-F", fmt, f)
        return new


def build_chain(tmp: Path, spec: ChainSpec) -> Chain:
    d = tmp / "orig"
    d.mkdir()
    u = spec.cluster_size
    size = spec.units * u
    opts = (f"cluster_size={u}", *spec.opts)
    sub = u // 32
    base = d / ("base.img" if spec.base_fmt == "raw" else "base.qcow2")
    if spec.base_fmt == "raw":
        qemu.create(base, size, fmt="raw")
    else:
        qemu.create(base, size, *opts, *spec.extra.get("base_opts", ()))
    bw = [
        f"write -P 0x11 0 {8 * u}",
        f"write -P 0x12 {10 * u} {6 * u}",
        f"write -z {11 * u} {2 * u}",
        f"write -P 0x14 {size - 4 * u} {2 * u}",
        f"write -P 0x15 {20 * u + 300} 700",
    ]
    if spec.base_fmt == "qcow2":
        bw.append(f"discard {14 * u} {u}")
    if spec.compressed:
        bw.append(f"write -c -P 0x13 {26 * u} {2 * u}")
    qemu.qemu_io(base, *bw, fmt=spec.base_fmt)
    if spec.extra.get("snapshot"):
        qemu.snapshot_create(base, "s1")
        qemu.qemu_io(base, f"write -P 0x16 {3 * u} {2 * u}")
    files = [base]
    fmts = [spec.base_fmt]
    layer_writes = []
    if spec.depth == 3:
        layer_writes.append([
            f"write -P 0x21 {2 * u} {3 * u}",
            f"write -z {5 * u} {u}",
            f"write -P 0x22 {22 * u + 7} {u}",
            f"discard {12 * u} {u}",
            f"write -P 0x23 {27 * u} {u}",
        ])
    top_size = size + 8 * u if spec.larger_top else None
    tw = [
        f"write -P 0x31 {u + 100} {2 * u}",
        f"write -z {6 * u} {2 * u}",
        f"write -z -u {3 * u} {u}",
        f"discard {15 * u} {u}",
        f"write -P 0x33 {size - 3 * u} {u}",
    ]
    if spec.compressed:
        tw.append(f"write -c -P 0x32 {24 * u} {2 * u}")
    if spec.extended_l2:
        tw += [f"write -P 0x34 {30 * u + 3 * sub} {2 * sub}", f"write -z {31 * u + 5 * sub} {sub}"]
    if spec.larger_top:
        tw += [f"write -P 0x35 {size - u} {2 * u}", f"write -P 0x36 {size + 4 * u} {u}"]
    layer_writes.append(tw)
    for i, writes in enumerate(layer_writes):
        name = "mid.qcow2" if i < len(layer_writes) - 1 else "top.qcow2"
        p = d / name
        backing = str(files[-1]) if spec.absolute else files[-1].name
        sz = top_size if name == "top.qcow2" else None
        qemu.create(p, sz, *opts, backing=backing, backing_fmt=fmts[-1], cwd=d)
        qemu.qemu_io(p, *writes)
        if spec.extra.get("snapshot"):
            qemu.snapshot_create(p, "s1")
            qemu.qemu_io(p, f"write -P 0x3a {u} {u}", f"write -z {16 * u} {u}")
        files.append(p)
        fmts.append("qcow2")
    return Chain(d, files, fmts, spec.absolute)


def raw_of(path: Path, out: Path) -> bytes:
    qemu.convert_raw(path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def assert_clean(chain: Chain) -> None:
    for f, fmt in zip(chain.files, chain.fmts):
        if fmt == "qcow2" and f.exists():
            res, rc = qemu.check_json(f)
            assert rc == 0, (f, res)
            assert not res.get("corruptions") and not res.get("leaks"), (f, res)


def assert_same(a: Path, b: Path) -> None:
    assert qemu.compare(a, b) == 0, f"{a} and {b} differ"
    assert os.path.getsize(a) > 0


def depth0_data(path: Path) -> list[dict]:
    return [e for e in qemu.map_json(path) if e["depth"] == 0 and e["present"]]


BACKENDS = ["native", "python"]


def with_backends(specs, python_specs):
    """(spec, backend) pairs: every spec natively, ``python_specs`` with the fallback too."""
    return [(s, "native") for s in specs] + [(s, "python") for s in python_specs]


@pytest.fixture
def make(tmp_path):
    def _make(spec_name: str) -> tuple[Chain, Chain, Chain]:
        orig = build_chain(tmp_path, SPECS[spec_name])
        return orig, orig.copy("ours"), orig.copy("theirs")

    return _make


# --------------------------------------------------------------------------- commit

KEY_SPECS = ["qcow2", "raw_base", "deep3", "compressed", "extl2", "larger_top"]
OTHER_SPECS = ["deep3_raw", "c512", "c2m", "larger_top_raw", "absolute", "v2", "v2_deep3", "refcount1",
               "lazy", "prealloc", "snapshots", "extl2_compressed"]


def _commit_case(make, tmp_path, spec_name, backend, *, base_arg: bool, chains=None):
    orig, ours, theirs = chains or make(spec_name)
    before = raw_of(orig.top, tmp_path / "before.raw")
    target = 0 if base_arg else -2
    with backend_ctx(backend), warnings.catch_warnings():
        warnings.simplefilter("error")
        res = commit(ours.top, str(ours.files[target]) if base_arg else None)
    if base_arg:
        qemu.qemu_img("commit", "-q", "-b", theirs.files[target], theirs.top)
    else:
        qemu.qemu_img("commit", "-q", theirs.top)
    assert_same(ours.files[target], theirs.files[target])
    assert os.path.getsize(ours.files[target]) <= os.path.getsize(theirs.files[target]) * 1.5 + 4 * MiB
    assert_clean(ours)
    # the guest content seen through the top is unchanged
    assert raw_of(ours.top, tmp_path / "after.raw") == before
    if not base_arg:
        assert res.emptied
        assert depth0_data(ours.top) == [] == depth0_data(theirs.top)
    else:
        assert not res.emptied


PYTHON_SPECS = ["qcow2", "deep3", "compressed"]


@pytest.mark.parametrize(("spec_name", "backend"), with_backends(KEY_SPECS, PYTHON_SPECS))
def test_commit_matches_qemu(make, tmp_path, spec_name, backend):
    _commit_case(make, tmp_path, spec_name, backend, base_arg=False)


def _more_shapes(make, tmp_path, spec_name):
    orig, ours, theirs = make(spec_name)
    _commit_case(make, tmp_path, spec_name, "native", base_arg=False, chains=(orig, ours, theirs))
    chains = (orig, orig.copy("ours-stream"), orig.copy("theirs-stream"))
    _stream_case(make, tmp_path, spec_name, "native", to_base=False, chains=chains)


@pytest.mark.parametrize("spec_name", [s for s in OTHER_SPECS if s != "c2m"])
def test_commit_and_stream_more_shapes(make, tmp_path, spec_name):
    _more_shapes(make, tmp_path, spec_name)


@pytest.mark.slow
def test_commit_and_stream_2m_clusters(make, tmp_path):
    _more_shapes(make, tmp_path, "c2m")


@pytest.mark.parametrize(("spec_name", "backend"), with_backends(
    ["deep3", "deep3_raw", "absolute", "v2_deep3", "snapshots"], ["deep3"]))
def test_commit_b_into_deepest_base(make, tmp_path, spec_name, backend):
    _commit_case(make, tmp_path, spec_name, backend, base_arg=True)


def test_commit_drop_keeps_top(make, tmp_path):
    orig, ours, theirs = make("qcow2")
    res = commit(ours.top, drop=True)
    qemu.qemu_img("commit", "-q", "-d", theirs.top)
    assert not res.emptied
    assert_same(ours.base, theirs.base)
    assert depth0_data(ours.top) and qemu.compare(ours.top, orig.top) == 0
    assert_clean(ours)


# --------------------------------------------------------------------------- stream


def _info(path: Path) -> dict:
    return qemu.info_json(path)


def _stream_case(make, tmp_path, spec_name, backend, *, to_base: bool, chains=None):
    orig, ours, theirs = chains or make(spec_name)
    before = raw_of(orig.top, tmp_path / "before.raw")
    below = [f.read_bytes() for f in ours.files[:-1]]
    with backend_ctx(backend):
        if to_base:
            stream(ours.top, str(ours.base))
        else:
            stream(ours.top)
    if to_base:
        backing = str(theirs.base) if SPECS[spec_name].absolute else theirs.base.name
        qemu.qemu_img("rebase", "-q", "-b", backing, "-F", theirs.fmts[0], theirs.top)
    else:
        qemu.qemu_img("rebase", "-q", "-b", "", theirs.top)
    assert_same(ours.top, theirs.top)
    info_o, info_t = _info(ours.top), _info(theirs.top)
    name_o, name_t = info_o.get("backing-filename"), info_t.get("backing-filename")
    if name_t is not None and os.path.isabs(name_t):
        assert name_o == str(ours.base)
    else:
        assert name_o == name_t
    assert info_o.get("backing-filename-format") == info_t.get("backing-filename-format")
    assert_clean(ours)
    assert raw_of(ours.top, tmp_path / "after.raw") == before
    if not to_base:
        # nothing below any more: every range is top data or a hole
        assert all(e["depth"] == 0 for e in qemu.map_json(ours.top))
    # the other files were not touched
    assert [f.read_bytes() for f in ours.files[:-1]] == below


@pytest.mark.parametrize(("spec_name", "backend"), with_backends(KEY_SPECS, PYTHON_SPECS))
def test_stream_full_matches_rebase_empty(make, tmp_path, spec_name, backend):
    _stream_case(make, tmp_path, spec_name, backend, to_base=False)


@pytest.mark.parametrize(("spec_name", "backend"), with_backends(["deep3", "deep3_raw", "absolute"], ["deep3"]))
def test_stream_to_base_matches_safe_rebase(make, tmp_path, spec_name, backend):
    _stream_case(make, tmp_path, spec_name, backend, to_base=True)


def test_stream_sparse_zero_ranges_stay_sparse(make, tmp_path):
    orig, ours, _ = make("qcow2")
    stream(ours.top)
    # the base's zero and unallocated ranges do not become data in the top
    u = 64 * KiB
    ext = {(e["start"], e["length"]): e for e in qemu.map_json(ours.top)}
    for start, ln in ((11 * u, 2 * u), (30 * u, 4 * u)):
        for (s, n), e in ext.items():
            if s < start + ln and start < s + n:
                assert not e["data"], e


# --------------------------------------------------------------------------- rebase


def _make_other(chain: Chain) -> Path:
    """Another backing file, partly equal to the old chain, partly different."""
    u = 64 * KiB
    other = chain.dir / "other.qcow2"
    size = qemu.info_json(chain.base)["virtual-size"]
    qemu.create(other, size, f"cluster_size={u}")
    qemu.qemu_io(other, f"write -P 0x11 0 {4 * u}", f"write -P 0x77 {4 * u} {8 * u}",
                 f"write -P 0x14 {size - 4 * u} {u}")
    return other


@pytest.mark.parametrize("spec_name", ["qcow2", "raw_base", "deep3", "compressed", "larger_top", "extl2"])
def test_safe_rebase_matches_qemu(make, tmp_path, spec_name):  # (rebase does not use fastcopy)
    orig, ours, theirs = make(spec_name)
    _make_other(ours)
    _make_other(theirs)
    before = raw_of(orig.top, tmp_path / "before.raw")
    rebase(ours.top, "other.qcow2", backing_format="qcow2")
    qemu.qemu_img("rebase", "-q", "-b", "other.qcow2", "-F", "qcow2", theirs.top)
    assert_same(ours.top, theirs.top)
    assert raw_of(ours.top, tmp_path / "after.raw") == before
    assert _info(ours.top)["backing-filename"] == "other.qcow2"
    assert_clean(ours)
    assert qemu.check_json(ours.dir / "other.qcow2")[1] == 0


@pytest.mark.parametrize("spec_name", ["deep3", "qcow2"])
def test_safe_rebase_to_deeper_and_none(make, tmp_path, spec_name):
    orig, ours, theirs = make(spec_name)
    before = raw_of(orig.top, tmp_path / "before.raw")
    rebase(ours.top, ours.base.name, backing_format=ours.fmts[0])
    qemu.qemu_img("rebase", "-q", "-b", theirs.base.name, "-F", theirs.fmts[0], theirs.top)
    assert_same(ours.top, theirs.top)
    assert raw_of(ours.top, tmp_path / "after.raw") == before
    rebase(ours.top, "")
    assert _info(ours.top).get("backing-filename") is None
    assert raw_of(ours.top, tmp_path / "after2.raw") == before
    assert_clean(ours)


def test_safe_rebase_onto_an_overlay_of_the_old_backing(tmp_path, monkeypatch):
    """Rebasing onto an overlay of the old backing file compares only where the
    overlay allocates something: elsewhere the new chain reads the old backing
    file itself (nothing is read there).  Same result as qemu-img's rebase."""
    from pyqcow.ops import rebase as rebase_mod

    u = 64 * KiB
    for name in ("ours", "theirs"):
        d = tmp_path / name
        d.mkdir()
        base = qemu.create(d / "base.qcow2", 64 * u)
        qemu.qemu_io(base, f"write -P 0x11 0 {32 * u}", f"write -P 0x12 {40 * u} {8 * u}")
        mid = qemu.create(d / "mid.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
        qemu.qemu_io(mid, f"write -P 0x21 {4 * u} {2 * u}", f"write -z {20 * u} {2 * u}",
                     f"write -P 0x23 {50 * u} {u}")
        top = qemu.create(d / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
        qemu.qemu_io(top, f"write -P 0x31 {5 * u} {4 * u}")
    ours, theirs = tmp_path / "ours" / "top.qcow2", tmp_path / "theirs" / "top.qcow2"
    before = raw_of(ours, tmp_path / "before.raw")
    read = []  # bytes of either chain looked at (compared)
    real = rebase_mod._Sources.view

    def view(self, p, loc, a, n, side):
        read.append(n)
        return real(self, p, loc, a, n, side)

    monkeypatch.setattr(rebase_mod._Sources, "view", view)
    rebase(ours, "mid.qcow2", backing_format="qcow2")
    monkeypatch.undo()
    qemu.qemu_img("rebase", "-q", "-b", "mid.qcow2", "-F", "qcow2", theirs, cwd=theirs.parent)
    assert raw_of(ours, tmp_path / "after.raw") == before
    assert_same(ours, theirs)
    assert 0 < sum(read) <= 2 * 4 * u  # mid's 5 clusters not under top's, read in both chains
    assert qemu.check_json(ours)[1] == 0


def test_unsafe_rebase_header_only(make):
    orig, ours, theirs = make("deep3")
    shutil.copy(ours.base, ours.dir / "renamed.qcow2")
    shutil.copy(theirs.base, theirs.dir / "renamed.qcow2")
    rebase(ours.files[1], "renamed.qcow2", backing_format="qcow2", unsafe=True)
    qemu.qemu_img("rebase", "-q", "-u", "-b", "renamed.qcow2", "-F", "qcow2", theirs.files[1])
    a, b = _info(ours.files[1]), _info(theirs.files[1])
    assert a["backing-filename"] == b["backing-filename"] == "renamed.qcow2"
    assert a["backing-filename-format"] == b["backing-filename-format"] == "qcow2"
    assert_same(ours.top, theirs.top)
    assert_clean(ours)
    # data clusters untouched: same depth-0 map
    strip = [{k: v for k, v in e.items() if k != "offset"} for e in depth0_data(ours.files[1])]
    assert strip == [{k: v for k, v in e.items() if k != "offset"} for e in depth0_data(orig.files[1])]
    rebase(ours.top, "", unsafe=True)
    assert _info(ours.top).get("backing-filename") is None


# --------------------------------------------------------------------------- merge


MERGE_CASES = (
    [("deep3", keep, via, "native") for keep in ("base", "top") for via in ("commit", "stream", "auto")]
    + [("deep3", keep, via, "python") for keep in ("base", "top") for via in ("commit", "stream")]
    + [("qcow2", keep, "auto", "native") for keep in ("base", "top")]
    + [("absolute", "top", "commit", "native"), ("absolute", "base", "stream", "native")]
)


@pytest.mark.parametrize(("spec_name", "keep", "via", "backend"), MERGE_CASES)
def test_merge_combinations(make, tmp_path, spec_name, keep, via, backend):
    orig, ours, _ = make(spec_name)
    before = raw_of(orig.top, tmp_path / "before.raw")
    base, top = ours.files[-2], ours.top
    old_backing = _info(base).get("backing-filename")
    with backend_ctx(backend):
        plan = merge(top, keep=keep, via=via)
    assert plan.done
    kept, gone = (base, top) if keep == "base" else (top, base)
    assert not gone.exists()
    assert raw_of(kept, tmp_path / "after.raw") == before
    info = _info(kept)
    if old_backing is None:
        assert info.get("backing-filename") is None
    else:
        # the base's old backing (the deepest file), resolvable from the kept name
        if os.path.isabs(old_backing):
            assert info["backing-filename"] == str(ours.base)
        else:
            assert info["backing-filename"] == old_backing
        assert info["backing-filename-format"] == "qcow2"
    res, rc = qemu.check_json(kept)
    assert rc == 0 and not res.get("leaks"), res
    if via != "auto":
        assert plan.via == via


def test_merge_raw_base_keep_base(make, tmp_path):
    orig, ours, _ = make("raw_base")
    before = raw_of(orig.top, tmp_path / "before.raw")
    plan = merge(ours.top, keep="base", via="commit")
    assert not ours.top.exists()
    assert raw_of(ours.base, tmp_path / "after.raw") == before
    assert plan.via == "commit"


def _auto_chain(tmp_path: Path, base_full: bool) -> Path:
    d = tmp_path / ("full" if base_full else "sparse")
    d.mkdir()
    size = 16 * MiB
    base = qemu.create(d / "base.qcow2", size)
    top = qemu.create(d / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    if base_full:
        qemu.qemu_io(base, f"write -P 0x11 0 {size}")
        qemu.qemu_io(top, f"write -P 0x22 {4 * MiB} {size // 20}")  # 5% dirty
    else:
        qemu.qemu_io(base, f"write -P 0x11 0 {size // 20}")
        qemu.qemu_io(top, f"write -P 0x22 {MiB} {size - 2 * MiB}")
    return top


def test_merge_auto_prefers_commit_for_small_dirty_top(tmp_path):
    top = _auto_chain(tmp_path, base_full=True)
    for keep in ("base", "top"):
        plan = merge(top, keep=keep, dry_run=True)
        assert plan.via == "commit", plan
        assert plan.commit_bytes * 10 < plan.stream_bytes


def test_merge_auto_prefers_stream_for_sparse_base(tmp_path):
    top = _auto_chain(tmp_path, base_full=False)
    for keep in ("base", "top"):
        plan = merge(top, keep=keep, dry_run=True)
        assert plan.via == "stream", plan
        assert plan.stream_bytes * 5 < plan.commit_bytes


def _snapshot(d: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def test_merge_dry_run_touches_nothing(make):
    orig, ours, _ = make("deep3")
    before = _snapshot(ours.dir)
    for keep in ("base", "top"):
        for via in ("auto", "commit", "stream"):
            plan = merge(ours.top, keep=keep, via=via, dry_run=True)
            assert not plan.done and plan.steps
            assert plan.commit_bytes > 0 and plan.stream_bytes > 0
    assert _snapshot(ours.dir) == before


# --------------------------------------------------------------------------- bad input


def _guarded(d: Path):
    """Context: assert no file in ``d`` changes (bytes) while the block runs."""

    class _G:
        def __enter__(self):
            self.before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
            return self

        def __exit__(self, *exc):
            after = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
            assert after == self.before
            return False

    return _G()


def test_missing_image_in_chain(make):
    orig, ours, _ = make("deep3")
    os.unlink(ours.base)
    ops = [
        lambda: commit(ours.top),
        lambda: commit(ours.top, str(ours.files[1])),
        lambda: stream(ours.top),
        lambda: merge(ours.top),
        lambda: rebase(ours.top, "", ),
    ]
    for op in ops:
        with _guarded(ours.dir), pytest.raises(QcowError, match="base.qcow2"):
            op()


def test_unreadable_image_in_chain(make):
    orig, ours, _ = make("deep3")
    if os.geteuid() == 0:  # root reads every file: a directory in its place cannot be read
        os.unlink(ours.base)
        os.mkdir(ours.base)
    else:
        os.chmod(ours.base, 0)
    ops = (lambda: commit(ours.top), lambda: commit(ours.top, str(ours.base)),
           lambda: stream(ours.top), lambda: merge(ours.top), lambda: rebase(ours.top, ""))
    for op in ops:
        with _guarded(ours.dir), pytest.raises((QcowError, OSError)):
            op()


def test_base_not_in_chain(make, tmp_path):
    orig, ours, _ = make("qcow2")
    stranger = qemu.create(ours.dir / "stranger.qcow2", MiB)
    with _guarded(ours.dir):
        with pytest.raises(QcowError, match="not in the backing chain"):
            commit(ours.top, str(stranger))
        with pytest.raises(QcowError, match="not in the backing chain"):
            stream(ours.top, str(stranger))
        with pytest.raises(QcowError, match="not in the backing chain"):
            commit(ours.top, str(ours.top))


def test_shared_base_commit_warns_merge_refuses(make, tmp_path):
    orig, ours, _ = make("qcow2")
    other = qemu.create(ours.dir / "sibling.qcow2", None, backing=ours.base.name, backing_fmt="qcow2",
                        cwd=ours.dir)
    with _guarded(ours.dir):
        for keep in ("base", "top"):
            with pytest.raises(QcowError, match="sibling.qcow2"):
                merge(ours.top, keep=keep)
    with pytest.warns(UserWarning, match="sibling.qcow2"):
        commit(ours.top)
    assert_clean(ours)
    assert other.exists()


def test_top_with_overlays_merge_keep_base_refused(make, tmp_path):
    orig, ours, _ = make("qcow2")
    before = raw_of(orig.top, tmp_path / "before.raw")
    child = qemu.create(ours.dir / "child.qcow2", None, backing=ours.top.name, backing_fmt="qcow2",
                        cwd=ours.dir)
    with _guarded(ours.dir):
        for via in ("commit", "stream"):
            with pytest.raises(QcowError, match="child.qcow2"):
                merge(ours.top, keep="base", via=via)
    # keeping the top's name keeps the child's chain intact
    merge(ours.top, keep="top", via="commit")
    assert raw_of(child, tmp_path / "child.raw") == before


def test_merge_refuses_losing_internal_snapshots(make, tmp_path):
    orig, ours, _ = make("qcow2")
    qemu.snapshot_create(ours.top, "in-top")
    with _guarded(ours.dir):
        for keep in ("base", "top"):
            for via in ("commit", "stream"):
                with pytest.raises(QcowError, match="internal snapshot"):
                    merge(ours.top, keep=keep, via=via)
    ours2 = orig.copy("ours2")
    qemu.snapshot_create(ours2.base, "in-base")
    with _guarded(ours2.dir):
        with pytest.raises(QcowError, match="internal snapshot"):
            merge(ours2.top, keep="top", via="stream")
    # committing into the base keeps the base's snapshots intact
    before = raw_of(orig.top, tmp_path / "before.raw")
    merge(ours2.top, keep="base", via="commit")
    assert raw_of(ours2.base, tmp_path / "after.raw") == before
    assert [s["name"] for s in qemu.info_json(ours2.base)["snapshots"]] == ["in-base"]
    assert qemu.check_json(ours2.base)[1] == 0


def test_shared_base_merge_force(make, tmp_path):
    orig, ours, _ = make("qcow2")
    before = raw_of(orig.top, tmp_path / "before.raw")
    qemu.create(ours.dir / "sibling.qcow2", None, backing=ours.base.name, backing_fmt="qcow2", cwd=ours.dir)
    merge(ours.top, keep="top", via="stream", force=True)
    assert raw_of(ours.top, tmp_path / "after.raw") == before


def test_merge_without_backing(tmp_path):
    img = qemu.create(tmp_path / "lone.qcow2", MiB)
    with _guarded(tmp_path), pytest.raises(QcowError, match="no backing"):
        merge(img)
    with _guarded(tmp_path), pytest.raises(QcowError, match="no backing"):
        commit(img)


@pytest.mark.parametrize("which", ["top", "base"])
def test_merge_refuses_hard_links(make, which):
    """Hard links are refused without --force (symlinks are followed: see
    tests/interop/test_merge_safety.py)."""
    orig, ours, _ = make("qcow2")
    target = ours.top if which == "top" else ours.base
    real = ours.dir / ("real-" + target.name)
    os.rename(target, real)
    os.link(real, target)
    with _guarded(ours.dir):
        for keep in ("base", "top"):
            with pytest.raises(QcowError, match="hard link"):
                merge(ours.top, keep=keep, via="commit")
            with pytest.raises(QcowError, match="hard link"):
                merge(ours.top, keep=keep, via="stream")


@pytest.mark.parametrize("unsafe", [False, True])
def test_rebase_name_too_long(make, unsafe):
    orig, ours, _ = make("qcow2")
    name = "x" * 1024
    with _guarded(ours.dir), pytest.raises(QcowError, match="too long"):
        rebase(ours.top, name, backing_format="qcow2", unsafe=unsafe)


def test_rebase_missing_new_backing(make):
    orig, ours, _ = make("qcow2")
    with _guarded(ours.dir), pytest.raises(QcowError, match="not found"):
        rebase(ours.top, "nope.qcow2", backing_format="qcow2")


@pytest.mark.parametrize("unsafe", [False, True], ids=["safe", "unsafe"])
def test_rebase_onto_itself_refused(make, unsafe):
    # qemu-img rebase -u accepts a loop; pyqcow refuses it in both modes, before
    # opening anything (it used to report its own lock as "another process")
    orig, ours, _ = make("qcow2")
    with _guarded(ours.dir), pytest.raises(QcowError, match=r"would make a backing loop \(.*base"):
        rebase(ours.base, "top.qcow2", backing_format="qcow2", unsafe=unsafe)
    with _guarded(ours.dir), pytest.raises(QcowError, match=r"would make a backing loop \(.*top"):
        rebase(ours.top, "top.qcow2", backing_format="qcow2", unsafe=unsafe)


# --------------------------------------------------------------------------- write ordering


def test_copier_fills_prepared_clusters_before_any_flush(tmp_path, monkeypatch):
    """No flush of the destination may make L2 entries durable before their data is copied.

    512-byte clusters: one L2 table maps 32 KiB, so a 12 MiB commit touches ~400
    tables, more than the writer keeps dirty before flushing on its own.
    """
    from pyqcow import writer
    from pyqcow.ops import copier

    d = tmp_path
    base = qemu.create(d / "base.qcow2", 16 * MiB, "cluster_size=512")
    qemu.qemu_io(base, f"write -P 0x11 0 {16 * MiB}")  # L2 tables the writer must load
    top = qemu.create(d / "top.qcow2", None, "cluster_size=65536", backing="base.qcow2",
                      backing_fmt="qcow2", cwd=d)
    qemu.qemu_io(top, f"write -P 0x5a {MiB} {12 * MiB}")
    pending: set[int] = set()
    flushes = []
    real_prepare, real_flush = writer.Writer.prepare_write, writer.Writer.flush
    real_copy = fastcopy.copy_runs

    inside = []

    def prepare(self, offset, length):
        inside.append(1)
        try:
            runs = real_prepare(self, offset, length)
        finally:
            inside.pop()
        pending.update(h for _, h, _ in runs)
        return runs

    def copy_runs(src_fd, dst_fd, runs, **kw):
        for _, h, _ in runs:
            pending.discard(h)
        return real_copy(src_fd, dst_fd, runs, **kw)

    def flush(self):
        flushes.append(len(pending) + len(inside))
        return real_flush(self)

    real_prepares = writer.Writer.prepare_writes

    def prepares(self, ranges, *args, **kwargs):
        inside.append(1)
        try:
            runs = real_prepares(self, ranges, *args, **kwargs)
        finally:
            inside.pop()
        pending.update(h for _, h, _ in runs)
        seen.extend(runs)
        return runs

    seen = []
    monkeypatch.setattr(writer.Writer, "prepare_write", prepare)
    monkeypatch.setattr(writer.Writer, "prepare_writes", prepares)
    monkeypatch.setattr(writer.Writer, "flush", flush)
    monkeypatch.setattr(copier.fastcopy, "copy_runs", copy_runs)
    before = raw_of(top, tmp_path / "before.raw")
    commit(top)
    assert len(flushes) > 2 and set(flushes) == {0}, flushes
    assert seen and not pending  # every prepared cluster was filled (the wrappers saw them)
    assert raw_of(top, tmp_path / "after.raw") == before
    assert qemu.check_json(base)[1] == 0


class _Interrupt(BaseException):
    pass


def _interrupt_after(n: int, real):
    calls = [0]

    def wrapper(*a, **kw):
        calls[0] += 1
        if calls[0] > n:
            raise _Interrupt()
        return real(*a, **kw)

    return wrapper


def _no_corruption(path: Path) -> None:
    res, rc = qemu.check_json(path)
    assert rc in (0, 3) and not res.get("corruptions"), res  # leaks allowed, as after a crash


@pytest.mark.parametrize("op", ["commit", "stream"])
def test_interrupted_copy_leaves_consistent_images(tmp_path, monkeypatch, op):
    """An exception (KeyboardInterrupt) in the middle of the copy: nothing that
    maps unfilled clusters reaches the disk; every image reads, block by block,
    what it read before or what the operation was putting there."""
    from pyqcow.ops import copier

    d = tmp_path
    base = qemu.create(d / "base.qcow2", 64 * MiB)
    qemu.qemu_io(base, f"write -P 0x11 0 {40 * MiB}")
    top = qemu.create(d / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qemu.qemu_io(top, *(f"write -P {0x20 + i} {i * 2 * MiB + 4096} {MiB}" for i in range(30)))
    top_view = raw_of(top, d / "top.raw")
    base_view = raw_of(base, d / "base.raw")
    monkeypatch.setattr(copier.fastcopy, "copy_runs", _interrupt_after(3, fastcopy.copy_runs))
    monkeypatch.setattr(copier, "BATCH_BYTES", 2 * MiB)
    with pytest.raises(_Interrupt):
        commit(top) if op == "commit" else stream(top)
    for img in (base, top):
        _no_corruption(img)
    assert raw_of(top, d / "after.raw") == top_view
    after = raw_of(base, d / "after.raw")
    blk = 4096
    bad = [i for i in range(0, len(after), blk)
           if after[i:i + blk] not in (base_view[i:i + blk], top_view[i:i + blk])]
    assert not bad, f"base reads neither old nor new data at {len(bad)} blocks, first {bad[0]:#x}"


def test_interrupted_make_empty_leaves_consistent_top(make, tmp_path, monkeypatch):
    from pyqcow import writer
    from pyqcow.image import QcowImage

    orig, ours, _ = make("qcow2")
    before = raw_of(orig.top, tmp_path / "before.raw")
    commit(ours.top, drop=True)  # the base holds the data: emptying the top keeps its view
    img = QcowImage(str(ours.top), "r+")
    # (the interruption lands after the table is unlinked, before its frees)
    monkeypatch.setattr(writer.Writer, "free_entry_allocations",
                        _interrupt_after(0, writer.Writer.free_entry_allocations))
    with pytest.raises(_Interrupt):
        img.make_empty()
    img.close()  # flushes what make_empty had done in memory
    _no_corruption(ours.top)
    assert raw_of(ours.top, tmp_path / "after.raw") == before


def test_safe_rebase_peak_rss_stays_small(tmp_path):
    """A safe rebase compares the two chains in 4 MiB chunks: its peak RSS does not
    grow with the data compared (was: both chains read through the mmap-backed
    reader, whose mapped pages all counted, 3.5 GiB on the 4 GiB bench chain)."""
    import subprocess
    import sys

    size = 384 * MiB
    old = qemu.create(tmp_path / "old.qcow2", size)
    qemu.qemu_io(old, f"write -P 0x5a 0 {size}")
    qemu.create(tmp_path / "new.qcow2", size)
    top = qemu.create(tmp_path / "top.qcow2", None, backing="old.qcow2", backing_fmt="qcow2",
                      cwd=tmp_path)
    # the child reports its own peak (VmHWM: since its exec) -- the ru_maxrss of
    # wait4 also counts the forked copy of this (large) test process before exec
    code = ("import sys; from pyqcow.ops.rebase import rebase; "
            "rebase(sys.argv[1], 'new.qcow2', backing_format='qcow2'); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    proc = subprocess.run([sys.executable, "-c", code, str(top)], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    peak_mib = int(proc.stdout.split()[1]) / 1024  # "VmHWM:  22408 kB"
    assert peak_mib < 160, f"peak RSS {peak_mib:.0f} MiB for {size // MiB} MiB compared"
    qemu.qemu_io(top, f"read -P 0x5a 0 {size}", read_only=True)
    assert qemu.check_json(top)[1] == 0
