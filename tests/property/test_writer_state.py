"""Stateful property test of the write engine against qemu-img as the oracle.

A hypothesis RuleBasedStateMachine opens an image read-write with pyqcow and
applies random ``write`` / ``write_zeroes`` (with and without unmap) /
``discard`` requests of every size (unaligned, sub-cluster, cross-cluster,
many clusters), keeping a ``bytearray`` model of the guest disk; it closes and
reopens the image at random.  After every close:

- ``qemu-img check`` exits 0 (no corruptions, no leaks),
- ``qemu-img convert -O raw`` equals the model byte for byte,
- every internal snapshot (``qemu-img convert -l``) reads as before the run,
- backing files are unchanged.

Bases: fresh images made by ``qemu-img create`` over cluster sizes 512..2M,
refcount widths 1..64, extended L2, v2 (compat=0.10), with and without a
backing file; and the qemu-made shapes of tests/interop/shapes.py (compressed
clusters, internal snapshots, persistent bitmaps, zero/discarded clusters,
preallocation, external data files, chains).

Discard may leave a granule (cluster or subcluster) with its old data or make
it read as zeros (as in qemu); the test reads the granule back with pyqcow,
checks it is one or the other, and takes that into the model, which qemu then
has to agree with at the next close.

The default run uses each base once with a few short sequences; the ``slow``
variant draws fresh-image options at random and runs many more steps.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import qemu
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)
from interop.shapes import SHAPES

import pyqcow

KiB = 1024
MiB = 1024 * KiB


@dataclass
class Base:
    path: Path
    files: list[Path]
    snapshots: list[str] = field(default_factory=list)  # snapshot ids


def _hash(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _fresh(opts: dict, backing: bool):
    """A builder for an image made by qemu-img create (and a base if asked)."""

    def build(d: Path) -> Base:
        d.mkdir(parents=True, exist_ok=True)
        cs = opts.get("cluster_size", 65536)
        size = max(3 * cs, 2 * MiB) + 1536  # a short last cluster
        o = [f"{k}={v}" for k, v in opts.items()]
        files = []
        if backing:
            b = qemu.create(d / "base.qcow2", size + 4096)
            qemu.qemu_io(b, f"write -P 0x5a 0 {size // 2}", f"write -P 0xa5 {size - 5000} 5000")
            p = qemu.create(d / "top.qcow2", size, *o, backing=b, backing_fmt="qcow2")
            files = [b]
        else:
            p = qemu.create(d / "img.qcow2", size, *o)
        return Base(p, files)

    return build


def _shape(name: str):
    def build(d: Path) -> Base:
        shape = SHAPES[name](d)
        others = [f for f in shape.files if f != shape.path]
        return Base(shape.path, others)

    return build


FRESH = {
    "c512_rc1": ({"cluster_size": 512, "refcount_bits": 1}, False),
    "c512_rc64_backing": ({"cluster_size": 512, "refcount_bits": 64}, True),
    "c4k_rc2": ({"cluster_size": 4096, "refcount_bits": 2}, False),
    "c2m_rc4": ({"cluster_size": 2 * MiB, "refcount_bits": 4}, False),
    "c64k_rc8_backing": ({"refcount_bits": 8}, True),
    "c64k_rc32": ({"refcount_bits": 32}, False),
    "extl2_32k": ({"extended_l2": "on", "cluster_size": 32768}, False),
    "extl2_64k_backing": ({"extended_l2": "on"}, True),
    "v2": ({"compat": "0.10"}, False),
    "v2_backing_4k": ({"compat": "0.10", "cluster_size": 4096}, True),
    "lazy_refcounts": ({"lazy_refcounts": "on"}, False),
}

SHAPE_BASES = [
    "default",
    "v2",
    "cluster512",
    "cluster2m",
    "refcount1",
    "refcount64",
    "extended_l2",
    "compressed_zlib",
    "compressed_zstd",
    "zero_writes",
    "discards",
    "prealloc_metadata",
    "prealloc_full",
    "snapshots",
    "bitmap",
    "data_file",
    "data_file_raw",
    "chain_qcow2",
    "chain_raw_base",
    "chain_3deep_relative",
    "overlay_larger",
    "extended_l2_overlay",
]

BASES = {f"fresh_{k}": _fresh(*v) for k, v in FRESH.items()}
BASES.update({f"shape_{n}": _shape(n) for n in SHAPE_BASES})


def _snapshot_ids(p: Path) -> list[str]:
    info = qemu.info_json(p)
    return [s["id"] for s in info.get("snapshots", [])]


def _raw(p: Path, dst: Path, snapshot: str | None = None) -> bytes:
    if dst.exists():
        dst.unlink()
    qemu.convert_raw(p, dst, snapshot)
    data = dst.read_bytes()
    dst.unlink()
    return data


class Harness:
    """One image under test, its bytearray model and the qemu oracle."""

    def __init__(self, build, tmp: Path) -> None:
        self.tmp = tmp
        self.base = build(tmp / "b")
        p = self.base.path
        self.raw_tmp = tmp / "out.raw"
        self.model = bytearray(_raw(p, self.raw_tmp))
        self.snaps = {
            sid: hashlib.sha256(_raw(p, self.raw_tmp, f"snapshot.id={sid}")).hexdigest()
            for sid in _snapshot_ids(p)
        }
        self.backing_hashes = {f: _hash(f) for f in self.base.files if f.suffix != ".data"}
        self.closes = 0
        self.img = pyqcow.open(p, "r+")
        self.size = self.img.virtual_size
        self.cs = self.img.cluster_size
        self.granule = self.cs >> 5 if self.img.extended_l2 else self.cs
        assert len(self.model) == self.size

    def write(self, off: int, payload: bytes) -> None:
        self.img.write(off, payload)
        self.model[off : off + len(payload)] = payload

    def write_zeroes(self, off: int, n: int, unmap: bool) -> None:
        self.img.write_zeroes(off, n, unmap=unmap)
        self.model[off : off + n] = bytes(n)

    def discard(self, off: int, n: int) -> None:
        self.img.discard(off, n)
        got = self.img.read(off, n)
        g = self.granule
        pos = off
        while pos < off + n:
            end = min(off + n, (pos // g + 1) * g)
            new = got[pos - off : end - off]
            old = bytes(self.model[pos:end])
            assert new == old or new == bytes(end - pos), f"discard of {off}+{n}: granule at {pos}"
            pos = end
        self.model[off : off + n] = got

    def read_back(self, off: int, n: int) -> None:
        assert self.img.read(off, n) == bytes(self.model[off : off + n])

    def reopen(self) -> None:
        self.close_and_check()
        self.img = pyqcow.open(self.base.path, "r+")

    def close_and_check(self) -> None:
        self.img.close()
        self.img = None
        self.closes += 1
        p = self.base.path
        result, rc = qemu.check_json(p)
        assert rc == 0, f"qemu-img check exit {rc}: {result}"
        assert not result.get("leaks") and not result.get("corruptions"), result
        raw = _raw(p, self.raw_tmp)
        if raw != bytes(self.model):
            first = next(i for i in range(len(raw)) if raw[i] != self.model[i])
            raise AssertionError(f"qemu reads differ from the model at guest offset {first}")
        for sid, digest in self.snaps.items():
            got = hashlib.sha256(_raw(p, self.raw_tmp, f"snapshot.id={sid}")).hexdigest()
            assert got == digest, f"internal snapshot {sid} changed"
        for f, digest in self.backing_hashes.items():
            assert _hash(f) == digest, f"backing file {f} changed"
        with pyqcow.open(p) as img:
            assert img.read(0, self.size) == bytes(self.model)


def _pick_range(draw_int, draw_choice, cs: int, size: int) -> tuple[int, int]:
    """An (offset, length) request: anywhere, cluster-aligned or near a boundary;
    tiny, sub-cluster, a few clusters, or k clusters +-1 byte."""
    kind = draw_choice(["any", "aligned", "edge"])
    if kind == "any":
        off = draw_int(0, size - 1)
    else:
        c = draw_int(0, (size - 1) // cs)
        delta = 0 if kind == "aligned" else draw_choice([1, 511, 512, cs // 2, cs - 512, cs - 1])
        off = min(size - 1, c * cs + delta)
    how = draw_choice(["tiny", "sub", "clusters"])
    if how == "tiny":
        length = draw_int(1, 1024)
    elif how == "sub":
        length = draw_int(1, 3 * cs + 1)
    else:
        length = max(1, draw_int(1, 4) * cs + draw_choice([-1, 0, 1]))
    return off, max(1, min(length, size - off, 4 * MiB))


class WriterMachine(RuleBasedStateMachine):
    base_names: list[str] = sorted(BASES)

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="pyqcow-wsm-"))
        self.h: Harness | None = None

    def _build(self, data) -> object:
        name = data.draw(st.sampled_from(self.base_names), label="base")
        return BASES[name]

    @initialize(data=st.data())
    def setup(self, data) -> None:
        self.h = Harness(self._build(data), self.tmp)

    def _range(self, data) -> tuple[int, int]:
        return _pick_range(
            lambda a, b: data.draw(st.integers(a, b)),
            lambda xs: data.draw(st.sampled_from(xs)),
            self.h.cs,
            self.h.size,
        )

    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1), zeros=st.booleans())
    def write(self, data, seed: int, zeros: bool) -> None:
        off, n = self._range(data)
        payload = bytes(n) if zeros and seed % 4 == 0 else random.Random(seed).randbytes(n)
        self.h.write(off, payload)

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data, unmap: bool) -> None:
        off, n = self._range(data)
        self.h.write_zeroes(off, n, unmap)

    @rule(data=st.data())
    def discard(self, data) -> None:
        off, n = self._range(data)
        self.h.discard(off, n)

    @rule(data=st.data())
    def read_back(self, data) -> None:
        off, n = self._range(data)
        self.h.read_back(off, n)

    @rule()
    def reopen(self) -> None:
        self.h.reopen()

    def teardown(self) -> None:
        try:
            if self.h is not None and self.h.img is not None:
                self.h.close_and_check()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_script(build, tmp: Path, seed: int, steps: int) -> Harness:
    """A seeded random sequence of requests (no shrinking: the seed reproduces it)."""
    r = random.Random(seed)
    h = Harness(build, tmp)
    try:
        for step in range(steps):
            off, n = _pick_range(r.randint, r.choice, h.cs, h.size)
            what = r.choices(["write", "zero", "discard", "read", "reopen"], [6, 3, 3, 1, 1])[0]
            if what == "write":
                h.write(off, bytes(n) if r.random() < 0.1 else r.randbytes(n))
            elif what == "zero":
                h.write_zeroes(off, n, r.random() < 0.5)
            elif what == "discard":
                h.discard(off, n)
            elif what == "read":
                h.read_back(off, n)
            else:
                h.reopen()
        h.close_and_check()
    except BaseException as e:
        e.add_note(f"run_script(seed={seed}) step {step}: {what} {off}+{n}")
        raise
    return h


@pytest.mark.parametrize("base", sorted(BASES))
def test_writer_random_sequence(base: str, tmp_path: Path) -> None:
    """Every base: 40 seeded random requests, a reopen or two, qemu as the oracle."""
    qemu.require_tool("qemu-img")
    qemu.require_tool("qemu-io")
    h = run_script(BASES[base], tmp_path, seed=sum(base.encode()), steps=40)
    assert h.closes >= 1


def _machine_for(names: list[str]):
    return type(f"WriterMachine_{len(names)}", (WriterMachine,), {"base_names": names})


FAST_BASES = [
    "fresh_c512_rc1",
    "fresh_extl2_64k_backing",
    "fresh_v2_backing_4k",
    "shape_compressed_zlib",
    "shape_snapshots",
    "shape_bitmap",
]


def test_writer_state_machine() -> None:
    """Hypothesis picks the base and the requests (small default budget)."""
    qemu.require_tool("qemu-img")
    qemu.require_tool("qemu-io")
    run_state_machine_as_test(
        _machine_for(FAST_BASES),
        settings=settings(
            max_examples=6,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


# --- slow: random fresh-image options, many more steps ----------------------------------

@st.composite
def fresh_options(draw):
    v2 = draw(st.booleans())
    cb = draw(st.integers(9, 21))
    opts: dict = {"cluster_size": 1 << cb}
    if v2:
        opts["compat"] = "0.10"
    else:
        opts["refcount_bits"] = 1 << draw(st.integers(0, 6))
        if cb >= 14 and draw(st.booleans()):
            opts["extended_l2"] = "on"
        if draw(st.booleans()):
            opts["lazy_refcounts"] = "on"
    return opts, draw(st.booleans())


class RandomFreshMachine(WriterMachine):
    def _build(self, data) -> object:  # type: ignore[override]
        opts, backing = data.draw(fresh_options(), label="fresh image")
        return _fresh(opts, backing)


@pytest.mark.slow
def test_writer_state_machine_random_fresh_slow() -> None:
    qemu.require_tool("qemu-img")
    run_state_machine_as_test(
        RandomFreshMachine,
        settings=settings(max_examples=60, stateful_step_count=30, deadline=None,
                          suppress_health_check=list(HealthCheck)),
    )


@pytest.mark.slow
def test_writer_state_machine_all_bases_slow() -> None:
    qemu.require_tool("qemu-img")
    run_state_machine_as_test(
        WriterMachine,
        settings=settings(max_examples=80, stateful_step_count=30, deadline=None,
                          suppress_health_check=list(HealthCheck)),
    )
