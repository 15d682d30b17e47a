"""Hypothesis strategies that build valid qcow2 images, chains and operations.

Every strategy here draws a *file* (or several) in a fresh temporary directory
together with the guest content it must read as, so a test can compare any
qcow2 reader or tool against a model::

    from hypothesis import given
    from pyqcow.testing import images

    @given(images())
    def test_my_reader(img):
        assert my_reader.read_all(img.path) == img.expected

What is varied (see :class:`ImageParams`): cluster size (512 B .. 64 KiB),
compat 0.10 (v2) or 1.1 (v3), refcount width (1..64 bits), extended L2
entries (subclusters), compression type (zlib, zstd) with compressed clusters,
zero clusters, discarded clusters, lazy refcounts, internal snapshots, the tool
that created the file (pyqcow or qemu-img) and the one that wrote the guest
data (pyqcow's writer, qemu-io, or both).  Features that need qemu-img/qemu-io
(compressed clusters, internal snapshots) are only drawn when those tools are
on ``PATH``.

Generated directories are removed when the interpreter exits (or call
:meth:`GeneratedImage.cleanup`).  Pass ``directory=`` to put them elsewhere.

The data model for discards: only whole, cluster-aligned ranges are discarded
and they read as zeros afterwards (v2 images with a backing file cannot
express that, so no discard is drawn for them).  Partial discards are allowed
to do nothing, which makes them useless for a model.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import strategies as st

__all__ = [
    "GeneratedChain",
    "GeneratedImage",
    "ImageParams",
    "Op",
    "apply_ops",
    "chains",
    "have_qemu",
    "image_params",
    "images",
    "operations",
]

_DIRS: list[str] = []


def _cleanup_all() -> None:
    for d in _DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup_all)


def _new_dir(parent: str | None) -> str:
    d = tempfile.mkdtemp(prefix="pyqcow-testing-", dir=parent)
    _DIRS.append(d)
    return d


def have_qemu() -> bool:
    """Whether qemu-img and qemu-io are on PATH (needed for some features)."""
    return shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


# ---------------------------------------------------------------------------- operations
@dataclass(frozen=True)
class Op:
    """One guest operation.

    ``kind``: ``write`` (data), ``zero`` (write zeroes), ``discard`` (whole
    clusters, read as zeros afterwards) or ``compressed`` (one cluster written
    compressed; needs qemu-io).  Data is derived from ``seed``: a repeated byte
    when ``pattern`` is true (compressible), pseudo-random bytes otherwise.
    """

    kind: str
    offset: int
    length: int
    seed: int = 0
    pattern: bool = False

    @property
    def data(self) -> bytes:
        if self.kind in ("zero", "discard"):
            return bytes(self.length)
        if self.pattern:
            return bytes([self.seed & 0xFF or 1]) * self.length
        return random.Random(self.seed).randbytes(self.length)

    def apply_to_model(self, model: bytearray) -> None:
        """Apply this operation to ``model`` (the expected guest content)."""
        end = min(self.offset + self.length, len(model))
        if self.offset >= end:
            return
        model[self.offset : end] = self.data[: end - self.offset]

    def qemu_io_command(self, datafile: str | None = None) -> str:
        if self.kind == "zero":
            return f"write -z {self.offset} {self.length}"
        if self.kind == "discard":
            return f"discard {self.offset} {self.length}"
        flag = "-c " if self.kind == "compressed" else ""
        if self.pattern:
            return f"write {flag}-P {self.seed & 0xFF or 1} {self.offset} {self.length}"
        assert datafile is not None
        return f"write {flag}-s {datafile} {self.offset} {self.length}"


@st.composite
def operations(
    draw,
    virtual_size: int = 1 << 20,
    cluster_size: int = 65536,
    *,
    max_ops: int = 8,
    min_ops: int = 0,
    kinds: Sequence[str] = ("write", "zero", "discard"),
) -> list[Op]:
    """Sequences of guest operations inside a disk of ``virtual_size`` bytes.

    Writes and zero writes have any offset and length (unaligned ones exercise
    copy-on-write); discards and compressed writes cover whole clusters.
    """
    ops: list[Op] = []
    if virtual_size <= 0:
        return ops
    kinds = list(kinds)
    n_clusters = -(-virtual_size // cluster_size)
    count = draw(st.integers(min_ops, max_ops))
    for _ in range(count):
        kind = draw(st.sampled_from(kinds))
        if kind in ("discard", "compressed"):
            full = virtual_size // cluster_size
            if full == 0:
                continue
            first = draw(st.integers(0, full - 1))
            num = 1 if kind == "compressed" else draw(st.integers(1, min(4, full - first)))
            offset, length = first * cluster_size, num * cluster_size
        else:
            aligned = draw(st.booleans())
            if aligned:
                first = draw(st.integers(0, n_clusters - 1))
                offset = first * cluster_size
                length = min(draw(st.integers(1, 3)) * cluster_size, virtual_size - offset)
            else:
                offset = draw(st.integers(0, virtual_size - 1))
                length = draw(st.integers(1, min(virtual_size - offset, 3 * cluster_size)))
        seed = draw(st.integers(0, 2**32 - 1))
        pattern = kind == "compressed" or draw(st.booleans())
        ops.append(Op(kind, offset, length, seed, pattern))
    return ops


def apply_ops(path: str, ops: Sequence[Op], *, writer: str = "pyqcow", fmt: str = "qcow2") -> None:
    """Perform ``ops`` on the image at ``path`` (through its backing chain).

    ``writer``: ``pyqcow`` (pyqcow.open(path, "r+")) or ``qemu-io`` (one
    qemu-io run).  Compressed writes always go through qemu-io.
    """
    groups: list[tuple[str, list[Op]]] = []
    for op in ops:
        w = "qemu-io" if op.kind == "compressed" else writer
        # a compressed write runs in a qemu-io process of its own: qemu 7.2 keeps
        # appending compressed data to a host cluster it has freed and reused for a
        # copy-on-write in the same session, overwriting guest data
        alone = op.kind == "compressed" or (groups and groups[-1][1][-1].kind == "compressed")
        if groups and groups[-1][0] == w and not alone:
            groups[-1][1].append(op)
        else:
            groups.append((w, [op]))
    for w, group in groups:
        if w == "qemu-io":
            _apply_qemu_io(path, group, fmt)
        else:
            _apply_pyqcow(path, group)


def _apply_pyqcow(path: str, ops: Sequence[Op]) -> None:
    import pyqcow

    with pyqcow.open(path, "r+") as img:
        for op in ops:
            if op.kind in ("write", "compressed"):
                img.write(op.offset, op.data)
            elif op.kind == "zero":
                img.write_zeroes(op.offset, op.length)
            elif op.kind == "discard":
                img.discard(op.offset, op.length)
            else:  # pragma: no cover
                raise ValueError(op.kind)
        img.flush()


def _apply_qemu_io(path: str, ops: Sequence[Op], fmt: str) -> None:
    d = tempfile.mkdtemp(prefix="pyqcow-testing-io-")
    try:
        argv = ["qemu-io", "-f", fmt]
        for i, op in enumerate(ops):
            datafile = None
            if op.kind in ("write", "compressed") and not op.pattern:
                datafile = os.path.join(d, f"op{i}")
                with open(datafile, "wb") as f:
                    f.write(op.data)
            argv += ["-c", op.qemu_io_command(datafile)]
        argv.append(path)
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        if r.returncode != 0 or "error" in r.stdout.lower() or "failed" in r.stdout.lower():
            raise RuntimeError(f"qemu-io failed ({r.returncode}): {argv}: {r.stdout}{r.stderr}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageParams:
    """The creation options of one generated qcow2 image."""

    virtual_size: int
    cluster_size: int = 65536
    compat: str = "1.1"
    refcount_bits: int = 16
    extended_l2: bool = False
    compression_type: str = "zlib"
    lazy_refcounts: bool = False
    creator: str = "pyqcow"  # pyqcow | qemu-img
    writer: str = "pyqcow"  # pyqcow | qemu-io

    @property
    def version(self) -> int:
        return 2 if self.compat == "0.10" else 3

    def qemu_options(self) -> str:
        opts = [f"cluster_size={self.cluster_size}", f"compat={self.compat}",
                f"refcount_bits={self.refcount_bits}"]
        if self.version == 3:
            opts += [f"extended_l2={'on' if self.extended_l2 else 'off'}",
                     f"compression_type={self.compression_type}",
                     f"lazy_refcounts={'on' if self.lazy_refcounts else 'off'}"]
        return ",".join(opts)


@dataclass
class GeneratedImage:
    """A qcow2 image file and what it must read as.

    ``expected``: the guest content of the active layer (through the backing
    chain).  ``snapshots``: internal snapshot name -> its guest content.
    ``files``: every file of the image and its chain, top first.
    """

    path: str
    directory: str
    params: ImageParams
    expected: bytes
    ops: list[Op] = field(default_factory=list)
    snapshots: dict[str, bytes] = field(default_factory=dict)
    backing: str | None = None
    files: list[str] = field(default_factory=list)

    @property
    def virtual_size(self) -> int:
        return self.params.virtual_size

    @property
    def cluster_size(self) -> int:
        return self.params.cluster_size

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@st.composite
def image_params(
    draw,
    *,
    cluster_sizes: Sequence[int] = (512, 1024, 4096, 16384, 65536),
    compat: Sequence[str] = ("0.10", "1.1"),
    refcount_bits: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    extended_l2: Sequence[bool] = (False, True),
    compression_types: Sequence[str] = ("zlib", "zstd"),
    lazy_refcounts: Sequence[bool] = (False,),
    max_clusters: int = 48,
    virtual_size: int | None = None,
    writers: Sequence[str] | None = None,
    creators: Sequence[str] | None = None,
) -> ImageParams:
    """Valid combinations of qcow2 creation options (as qemu-img accepts them)."""
    qemu = have_qemu()
    cs = draw(st.sampled_from(list(cluster_sizes)))
    v = draw(st.sampled_from(list(compat)))
    rb = draw(st.sampled_from(list(refcount_bits)))
    ext = False
    ctype = "zlib"
    lazy = False
    if v == "1.1":
        if cs >= 16384:
            ext = draw(st.sampled_from(list(extended_l2)))
        ctype = draw(st.sampled_from(list(compression_types)))
        lazy = draw(st.sampled_from(list(lazy_refcounts)))
    elif rb != 16:
        rb = 16  # v2 only knows 16-bit refcounts
    if virtual_size is None:
        size = draw(st.integers(1, max_clusters)) * cs
        if draw(st.booleans()):
            size -= draw(st.integers(0, min(cs, 4096) // 512 - 1)) * 512 if cs > 512 else 0
        size = max(size, 512)
    else:
        size = virtual_size
    w_choices = list(writers) if writers else (["pyqcow", "qemu-io"] if qemu else ["pyqcow"])
    c_choices = list(creators) if creators else (["pyqcow", "qemu-img"] if qemu else ["pyqcow"])
    return ImageParams(
        virtual_size=size, cluster_size=cs, compat=v, refcount_bits=rb, extended_l2=ext,
        compression_type=ctype, lazy_refcounts=lazy,
        creator=draw(st.sampled_from(c_choices)), writer=draw(st.sampled_from(w_choices)),
    )


def _create(path: str, p: ImageParams, backing: str | None = None,
            backing_format: str | None = None) -> None:
    if p.creator == "qemu-img":
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", p.qemu_options()]
        if backing is not None:
            argv += ["-b", backing, "-F", backing_format or "qcow2"]
        argv += [path, str(p.virtual_size)]
        subprocess.run(argv, check=True, capture_output=True)
        return
    from ..create import create

    create(path, p.virtual_size, backing=backing, backing_format=backing_format,
           cluster_size=p.cluster_size, compat=p.compat, lazy_refcounts=p.lazy_refcounts,
           extended_l2=p.extended_l2, compression_type=p.compression_type,
           refcount_bits=p.refcount_bits)


def _ops_kinds(p: ImageParams, has_backing: bool) -> list[str]:
    kinds = ["write", "write", "zero"]
    if not (p.version == 2 and has_backing):
        kinds.append("discard")
    if have_qemu() and p.version == 3:
        kinds.append("compressed")
    return kinds


def _compressed_only_fresh(ops: list[Op], cs: int, touched: set[int]) -> list[Op]:
    """qemu cannot write a compressed cluster over an allocated one: such ops become writes."""
    out = []
    for op in ops:
        first, last = op.offset // cs, (op.offset + op.length - 1) // cs
        if op.kind == "compressed" and first in touched:
            op = Op("write", op.offset, op.length, op.seed, op.pattern)
        touched.update(range(first, last + 1))
        out.append(op)
    return out


def _build_image(draw, directory: str, name: str, p: ImageParams, *, backing: str | None,
                 backing_format: str | None, initial: bytes, max_ops: int,
                 max_snapshots: int, min_ops: int = 0) -> GeneratedImage:
    path = os.path.join(directory, name)
    _create(path, p, backing, backing_format)
    model = bytearray(initial[: p.virtual_size].ljust(p.virtual_size, b"\0"))
    kinds = _ops_kinds(p, backing is not None)
    snapshots: dict[str, bytes] = {}
    all_ops: list[Op] = []
    n_snap = 0
    touched: set[int] = set()
    # compressed clusters share host clusters: snapshots raise their refcounts a lot
    if max_snapshots and have_qemu() and p.refcount_bits >= 8:
        n_snap = draw(st.integers(0, min(max_snapshots, (1 << min(p.refcount_bits, 8)) - 2)))
    for seg in range(n_snap + 1):
        ops = draw(operations(p.virtual_size, p.cluster_size, max_ops=max_ops, kinds=kinds,
                              min_ops=min(min_ops, max_ops) if seg == 0 else 0))
        ops = _compressed_only_fresh(ops, p.cluster_size, touched)
        if ops:
            apply_ops(path, ops, writer=p.writer)
        for op in ops:
            op.apply_to_model(model)
        all_ops += ops
        if seg < n_snap:
            sname = f"snap{seg}"
            r = subprocess.run(["qemu-img", "snapshot", "-c", sname, path],
                               capture_output=True, text=True, check=False)
            if r.returncode:
                raise RuntimeError(f"qemu-img snapshot -c failed: {p}: {r.stderr}")
            snapshots[sname] = bytes(model)
    return GeneratedImage(path=path, directory=directory, params=p, expected=bytes(model),
                          ops=all_ops, snapshots=snapshots, backing=backing)


@st.composite
def images(
    draw,
    *,
    params: st.SearchStrategy[ImageParams] | None = None,
    max_ops: int = 8,
    min_ops: int = 0,
    snapshots: int = 0,
    directory: str | None = None,
) -> GeneratedImage:
    """A standalone qcow2 image with data written into it, and its expected content.

    ``min_ops``/``max_ops`` bound the number of guest operations written.
    ``params``: a strategy for :class:`ImageParams` (default :func:`image_params`).
    ``snapshots``: at most this many internal snapshots (qemu-img snapshot -c)
    taken between batches of operations; their content is in ``.snapshots``.
    """
    p = draw(params if params is not None else image_params())
    d = _new_dir(directory)
    img = _build_image(draw, d, "image.qcow2", p, backing=None, backing_format=None,
                       initial=b"", max_ops=max_ops, max_snapshots=snapshots,
                       min_ops=min_ops)
    img.files = [img.path]
    return img


@dataclass
class GeneratedChain:
    """A backing chain: ``layers`` top first; the last one may be a raw file.

    ``expected[i]``: the guest content seen through ``layers[i]``.  Backing
    names are stored relative to the overlay's directory (QEMU's rule).
    """

    directory: str
    layers: list[str]
    formats: list[str]
    expected: list[bytes]
    params: list[ImageParams | None]
    ops: list[list[Op]] = field(default_factory=list)

    @property
    def top(self) -> str:
        return self.layers[0]

    @property
    def base(self) -> str:
        return self.layers[-1]

    @property
    def top_expected(self) -> bytes:
        return self.expected[0]

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@st.composite
def chains(
    draw,
    depth: int | st.SearchStrategy[int] = st.integers(2, 3),
    *,
    raw_base: bool | None = None,
    params: st.SearchStrategy[ImageParams] | None = None,
    max_ops: int = 6,
    min_ops: int = 0,
    same_size: bool = False,
    subdir: bool | None = None,
    directory: str | None = None,
) -> GeneratedChain:
    """A chain of ``depth`` images (base + overlays) with data in every layer.

    ``raw_base``: the base is a raw file (None: drawn).  Overlays have the same
    cluster size family as drawn by ``params`` and may be larger than their
    backing file unless ``same_size``.  ``subdir``: the base lives in a
    sub-directory, so the stored relative name has a directory part.
    """
    n = depth if isinstance(depth, int) else draw(depth)
    if n < 1:
        raise ValueError("depth must be at least 1")
    d = _new_dir(directory)
    if raw_base is None:
        raw_base = draw(st.booleans())
    if subdir is None:
        subdir = draw(st.booleans())
    pstrat = params if params is not None else image_params(max_clusters=24)
    first = draw(pstrat)
    size = first.virtual_size
    layers: list[str] = []
    formats: list[str] = []
    expected: list[bytes] = []
    plist: list[ImageParams | None] = []
    all_ops: list[list[Op]] = []
    base_dir = os.path.join(d, "base") if subdir else d
    os.makedirs(base_dir, exist_ok=True)
    # base
    if raw_base:
        size = -(-size // 512) * 512
        path = os.path.join(base_dir, "base.raw")
        model = bytearray(size)
        ops = draw(operations(size, 512, max_ops=max_ops, min_ops=min(min_ops, max_ops),
                              kinds=("write", "zero")))
        for op in ops:
            op.apply_to_model(model)
        with open(path, "wb") as f:
            f.write(model)
        layers.append(path)
        formats.append("raw")
        expected.append(bytes(model))
        plist.append(None)
        all_ops.append(ops)
    else:
        img = _build_image(draw, base_dir, "base.qcow2", first, backing=None,
                           backing_format=None, initial=b"", max_ops=max_ops, max_snapshots=0,
                           min_ops=min_ops)
        layers.append(img.path)
        formats.append("qcow2")
        expected.append(img.expected)
        plist.append(first)
        all_ops.append(img.ops)
    for i in range(1, n):
        p = draw(pstrat)
        below_size = len(expected[-1])
        if same_size or not draw(st.booleans()):
            vs = below_size
        else:
            vs = below_size + draw(st.integers(0, 8)) * 512
        p = ImageParams(**{**p.__dict__, "virtual_size": max(vs, 512)})
        if p.cluster_size < 4096 and p.creator == "pyqcow":
            # pyqcow.create always writes the feature name table, which leaves no
            # room for a backing name in a 512/1024-byte cluster 0 (qemu-img drops
            # the table there)
            p = ImageParams(**{**p.__dict__, **({"creator": "qemu-img"} if have_qemu()
                                                 else {"cluster_size": 4096})})
        below = layers[-1]
        rel = os.path.relpath(below, d)
        img = _build_image(draw, d, f"layer{i}.qcow2", p, backing=rel,
                           backing_format=formats[-1], initial=expected[-1], max_ops=max_ops,
                           max_snapshots=0, min_ops=min_ops)
        layers.append(img.path)
        formats.append("qcow2")
        expected.append(img.expected)
        plist.append(p)
        all_ops.append(img.ops)
    layers.reverse()
    formats.reverse()
    expected.reverse()
    plist.reverse()
    all_ops.reverse()
    return GeneratedChain(directory=d, layers=layers, formats=formats, expected=expected,
                          params=plist, ops=all_ops)
