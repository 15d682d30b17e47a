"""Property test: random chains, random chain operation, compared with a byte model.

A chain (raw or qcow2 base, one or two qcow2 overlays with their own cluster
sizes and virtual sizes) is built with qemu-img/qemu-io from random writes,
zero writes, compressed writes and discards; a bytearray model tracks what each
layer defines.  A random operation (commit, commit -b, stream, stream -b, safe
rebase, unsafe rebase, merge) runs through pyqcow; the resulting image must read
(through pyqcow and through qemu-img) what the model says, and every qcow2 file
must pass ``qemu-img check``.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import qemu
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyqcow
from pyqcow import fastcopy
from pyqcow.ops.commit import commit
from pyqcow.ops.merge import merge
from pyqcow.ops.rebase import rebase
from pyqcow.ops.stream import stream

SECTOR = 512
pytestmark = pytest.mark.usefixtures("qemu_img_path", "qemu_io_path")


class Layer:
    def __init__(self, size: int, cluster_size: int, fmt: str = "qcow2") -> None:
        self.size = size
        self.cluster_size = cluster_size
        self.fmt = fmt
        self.data = bytearray(size)
        self.alloc = bytearray(size)  # 1 where this layer defines the byte
        self.cmds: list[str] = []

    def put(self, off: int, data: bytes) -> None:
        self.data[off : off + len(data)] = data
        self.alloc[off : off + len(data)] = b"\x01" * len(data)


def view(layers: list[Layer], upto: int | None = None) -> bytes:
    """Guest content of layers[upto] (default: the top) through the layers below."""
    layers = layers[: (len(layers) if upto is None else upto + 1)]
    out = bytearray(layers[0].size)
    out[:] = layers[0].data
    for lay in layers[1:]:
        new = bytearray(lay.size)
        n = min(len(out), lay.size)
        new[:n] = out[:n]
        a = lay.alloc
        i = 0
        while i < lay.size:  # sector granular (all ops are 512-aligned)
            if a[i]:
                new[i : i + SECTOR] = lay.data[i : i + SECTOR]
            i += SECTOR
        out = new
    return bytes(out)


@st.composite
def layer_ops(draw, lay: Layer, is_base: bool):
    sectors = lay.size // SECTOR
    cs = lay.cluster_size
    touched: set[int] = set()  # qemu compresses only into clusters this layer never wrote
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["write", "write", "zero", "discard", "compressed"]))
        if lay.fmt == "raw" and kind in ("compressed", "discard"):
            kind = "write"
        if kind in ("write", "zero"):
            s = draw(st.integers(0, sectors - 1))
            n = draw(st.integers(1, min(sectors - s, 3 * cs // SECTOR + 4)))
            off, ln = s * SECTOR, n * SECTOR
            touched.update(range(off // cs, (off + ln - 1) // cs + 1))
            if kind == "write":
                pat = draw(st.integers(1, 255))
                lay.cmds.append(f"write -P {pat:#x} {off} {ln}")
                lay.put(off, bytes([pat]) * ln)
            else:
                lay.cmds.append(f"write -z {off} {ln}")
                lay.put(off, bytes(ln))
        else:
            clusters = lay.size // cs
            if clusters == 0:
                continue
            c = draw(st.integers(0, clusters - 1))
            k = draw(st.integers(1, min(3, clusters - c)))
            off, ln = c * cs, k * cs
            if kind == "compressed" and touched & set(range(c, c + k)):
                continue
            touched.update(range(c, c + k))
            if kind == "discard":
                lay.cmds.append(f"discard {off} {ln}")
                lay.put(off, bytes(ln))
            else:
                pat = draw(st.integers(1, 255))
                lay.cmds.append(f"write -c -P {pat:#x} {off} {ln}")
                lay.put(off, bytes([pat]) * ln)
    return lay


CLUSTERS = [512, 4096, 65536]


@st.composite
def chains(draw):
    base_fmt = draw(st.sampled_from(["qcow2", "qcow2", "raw"]))
    depth = draw(st.integers(2, 3))
    size = draw(st.integers(1, 768)) * SECTOR
    layers = []
    for i in range(depth):
        if i:
            grow = draw(st.sampled_from([0, 0, 0, draw(st.integers(1, 256)) * SECTOR]))
            size = size + grow
        fmt = base_fmt if i == 0 else "qcow2"
        lay = Layer(size, draw(st.sampled_from(CLUSTERS)), fmt)
        draw(layer_ops(lay, i == 0))
        layers.append(lay)
    return layers


OPS = ["commit", "commit_b", "stream", "stream_b", "rebase", "rebase_u",
       "merge_base_commit", "merge_base_stream", "merge_top_commit", "merge_top_stream", "merge_auto"]


def build(d: Path, layers: list[Layer]) -> list[Path]:
    paths = []
    for i, lay in enumerate(layers):
        if i == 0:
            p = d / ("base.img" if lay.fmt == "raw" else "base.qcow2")
            if lay.fmt == "raw":
                qemu.create(p, lay.size, fmt="raw")
            else:
                qemu.create(p, lay.size, f"cluster_size={lay.cluster_size}")
        else:
            p = d / f"l{i}.qcow2"
            qemu.create(p, lay.size, f"cluster_size={lay.cluster_size}",
                        backing=paths[-1].name, backing_fmt=layers[i - 1].fmt, cwd=d)
        if lay.cmds:
            qemu.qemu_io(p, *lay.cmds, fmt=lay.fmt)
        paths.append(p)
    return paths


def _read_pyqcow(p: Path) -> bytes:
    with pyqcow.open(str(p)) as img:
        return img.read(0, img.virtual_size)


def _read_qemu(p: Path, tmp: Path) -> bytes:
    out = tmp / "view.raw"
    qemu.convert_raw(p, out)
    data = out.read_bytes()
    out.unlink()
    return data


def _assert_reads(p: Path, expected: bytes, tmp: Path, what: str) -> None:
    got = _read_pyqcow(p)
    assert len(got) >= len(expected), what
    assert got[: len(expected)] == expected, f"{what}: pyqcow view differs from the model"
    assert not any(got[len(expected):]), what
    assert _read_qemu(p, tmp) == got, f"{what}: qemu-img view differs from pyqcow's"


def _assert_clean(paths) -> None:
    for p in paths:
        if p.exists() and qemu.info_json(p)["format"] == "qcow2":
            res, rc = qemu.check_json(p)
            assert rc == 0 and not res.get("leaks"), (p, res)


def run_case(layers: list[Layer], op: str, other: Layer, backend: str,
             root: Path | None = None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="chainprop-", dir=root))
    try:
        paths = build(tmp, layers)
        expected = view(layers)
        assert _read_qemu(paths[-1], tmp) == expected, "model disagrees with qemu-io's chain"
        top = paths[-1]
        with fastcopy.backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if op == "commit":
                commit(top)
                _assert_reads(paths[-2], expected, tmp, "commit target")
                _assert_reads(top, expected, tmp, "emptied top")
            elif op == "commit_b":
                commit(top, str(paths[0]))
                _assert_reads(paths[0], expected, tmp, "commit -b target")
            elif op == "stream":
                stream(top)
                _assert_reads(top, expected, tmp, "streamed top")
            elif op == "stream_b":
                stream(top, str(paths[0]))
                _assert_reads(top, expected, tmp, "stream -b top")
            elif op in ("rebase", "rebase_u"):
                op_paths = build_other(tmp, other)
                if op == "rebase":
                    rebase(top, op_paths.name, backing_format="qcow2")
                    _assert_reads(top, expected, tmp, "safe rebase")
                else:
                    # the top's clusters hold copy-on-write data the byte model does
                    # not track: qemu-img rebase -u on a copy is the oracle here
                    twin = tmp / "twin.qcow2"
                    shutil.copyfile(top, twin)
                    qemu.qemu_img("rebase", "-q", "-u", "-b", op_paths.name, "-F", "qcow2", twin)
                    rebase(top, op_paths.name, backing_format="qcow2", unsafe=True)
                    _assert_reads(top, _read_qemu(twin, tmp), tmp, "unsafe rebase")
                    paths.append(twin)
                paths.append(op_paths)
            else:
                _, keep, via = op.split("_") if op != "merge_auto" else ("", "top", "auto")
                # a raw BASE: the kept name would change format (refused unless forced)
                refused = paths[-2].suffix == ".img" and (keep, via) in (
                    ("base", "stream"), ("top", "commit"))
                if refused:
                    with pytest.raises(pyqcow.OperationError, match="merging via .* would put"):
                        merge(top, keep=keep, via=via)
                    _assert_reads(top, expected, tmp, "chain after a refused merge")
                plan = merge(top, keep=keep, via=via, force=refused)
                kept = paths[-2] if keep == "base" else top
                _assert_reads(kept, expected, tmp, f"merge keep={keep} via={plan.via}")
                gone = top if keep == "base" else paths[-2]
                assert not gone.exists()
        _assert_clean(paths)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_other(tmp: Path, other: Layer) -> Path:
    p = tmp / "other.qcow2"
    qemu.create(p, other.size, f"cluster_size={other.cluster_size}")
    if other.cmds:
        qemu.qemu_io(p, *other.cmds)
    return p


@st.composite
def cases(draw):
    layers = draw(chains())
    op = draw(st.sampled_from(OPS))
    other = Layer(draw(st.integers(1, 1024)) * SECTOR, draw(st.sampled_from(CLUSTERS)))
    draw(layer_ops(other, True))
    backend = draw(st.sampled_from(["native", "python"] if fastcopy.native_available() else ["python"]))
    return layers, op, other, backend


_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=5, **_common)
@given(cases())
def test_chain_ops_match_model(case):
    run_case(*case)


@pytest.mark.slow
@settings(max_examples=300, **_common)
@given(cases())
def test_chain_ops_match_model_many(case):
    run_case(*case)


@settings(max_examples=25, **_common)
@given(case=cases())
def test_chain_ops_match_model_on_reflink_xfs(xfs_reflink, case):
    """The same operations on a reflink file system, where the copier shares
    extents: new clusters in the order of their source, and a commit moves the
    target's own clusters too (then frees and punches the old ones)."""
    run_case(*case, root=xfs_reflink)


@pytest.mark.parametrize("op", OPS)
def test_each_op_once(op):
    """Every operation at least once in the default run, on a fixed small chain."""
    base = Layer(64 * 1024, 4096)
    base.cmds = ["write -P 0x11 0 40960", "write -z 8192 4096", "discard 16384 8192"]
    base.put(0, b"\x11" * 40960); base.put(8192, bytes(4096)); base.put(16384, bytes(8192))
    mid = Layer(64 * 1024, 512)
    mid.cmds = ["write -P 0x22 1024 3072", "write -c -P 0x23 32768 1024"]
    mid.put(1024, b"\x22" * 3072); mid.put(32768, b"\x23" * 1024)
    top = Layer(80 * 1024, 65536)
    top.cmds = ["write -P 0x33 4096 2048", "write -z 30720 2048", "write -P 0x34 70000 4000"]
    top.cmds[-1] = "write -P 0x34 69632 4096"
    top.put(4096, b"\x33" * 2048); top.put(30720, bytes(2048)); top.put(69632, b"\x34" * 4096)
    other = Layer(32 * 1024, 4096)
    other.cmds = ["write -P 0x55 0 16384"]
    other.put(0, b"\x55" * 16384)
    run_case([base, mid, top], op, other, "native" if fastcopy.native_available() else "python")


@pytest.mark.parametrize("op", [o for o in OPS if o.startswith("merge")])
def test_merges_over_a_raw_base(op):
    """A raw BASE under one overlay: the two directions that would change the format
    at the kept name are refused first (nothing changes), then done with force."""
    base = Layer(64 * 1024, 512, "raw")
    base.cmds = ["write -P 0x11 0 40960"]
    base.put(0, b"\x11" * 40960)
    top = Layer(64 * 1024, 4096)
    top.cmds = ["write -P 0x33 4096 8192"]
    top.put(4096, b"\x33" * 8192)
    run_case([base, top], op, Layer(4096, 4096), "python")


@settings(max_examples=25, **_common)
@given(cases())
def test_stream_cost_matches_its_plan(case):
    """merge's stream cost (one walk of the backing chain) equals the bytes the stream
    plan (one walk per unallocated range of TOP) would copy, for every base."""
    from pyqcow.ops.plan import data_bytes
    from pyqcow.ops.stream import plan_stream, stream_bytes

    layers = case[0]
    tmp = Path(tempfile.mkdtemp(prefix="streamcost-"))
    try:
        paths = build(tmp, layers)
        with pyqcow.open(str(paths[-1])) as top:
            for base in [None, *top.chain[1:]]:
                assert stream_bytes(top, base) == data_bytes(plan_stream(top, base))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_qemu_io_builds_what_a_mixed_compressed_script_says(tmp_path):
    """The script hypothesis found under CI (reflink XFS, a commit case): in one
    qemu-io session QEMU 7.2 packed the last compressed write into a host cluster it
    had freed and reused (on 512-byte clusters it marked the image corrupt: "overlaps
    with active L2 table").  tests/qemu.qemu_io runs it in two sessions, and the
    image is clean and reads as the script says."""
    p = tmp_path / "l1.qcow2"
    qemu.create(p, 64 * 1024, "cluster_size=512")
    qemu.qemu_io(p, "write -z 32768 512", "write -c -P 0x1 33280 512", "write -P 0x1 33280 512",
                 "write -P 0x1 0 512", "write -c -P 0x1 512 512")
    assert "No errors were found" in qemu.qemu_img("check", p)
    expected = bytes([1]) * 1024 + bytes(32768 - 1024) + bytes(512) + bytes([1]) * 512
    expected += bytes(64 * 1024 - len(expected))
    with pyqcow.open(p) as img:
        assert img.read(0, 64 * 1024) == expected
