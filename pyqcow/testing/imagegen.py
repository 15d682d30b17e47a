"""Generated standalone images: :class:`GeneratedImage` and the :func:`images` strategy.

An image is planned from drawn values first (:class:`_Plan`: its params and its
operations between snapshots), then built in a fresh directory: created by
pyqcow or qemu-img, written by pyqcow or qemu-io, with snapshots, bitmaps,
unknown extensions and feature bits as the params say.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass, field

from hypothesis import strategies as st

from . import _files
from ._patch import add_unknown_extension, set_incompatible_bits
from .guestops import Op, _concrete_ops, _ops_strategy, apply_ops
from .params import ImageParams, _ParamsStrategy, have_qemu, image_params

__all__ = ["GeneratedImage", "images"]

UNKNOWN_EXTENSION_TYPE = 0x70797163  # "pyqc": unknown to QEMU, which must ignore it
UNKNOWN_EXTENSION_DATA = b"pyqcow.testing unknown extension"
DIRTY, CORRUPT = 1, 2


def _short(b: bytes) -> str:
    return f"<{len(b)} bytes sha256:{hashlib.sha256(b).hexdigest()[:12]}>"


@dataclass(repr=False)
class GeneratedImage:
    """A qcow2 image file and what it must read as.

    ``expected``: the guest content of the active layer (through the backing
    chain).  ``snapshots``: internal snapshot name -> its guest content.
    ``files``: every file of the image and its chain, top first.  The repr
    leaves the bytes out (their length and a hash stand in).
    """

    path: str
    directory: str
    params: ImageParams
    expected: bytes
    ops: list[Op] = field(default_factory=list)
    snapshots: dict[str, bytes] = field(default_factory=dict)
    backing: str | None = None
    files: list[str] = field(default_factory=list)
    data_file: str | None = None
    steps: list[tuple] = field(default_factory=list)
    backing_format: str | None = None

    def __repr__(self) -> str:
        snaps = {k: _short(v) for k, v in self.snapshots.items()}
        return (f"GeneratedImage(path={self.path!r}, params={self.params!r}, "
                f"ops={self.ops!r}, expected={_short(self.expected)}, snapshots={snaps!r}, "
                f"backing={self.backing!r})")

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis prints examples with this
        p.text(repr(self))

    @property
    def virtual_size(self) -> int:
        return self.params.virtual_size

    @property
    def cluster_size(self) -> int:
        return self.params.cluster_size

    def reproduce(self) -> str:
        """A shell script (qemu-img, qemu-io, python3) that rebuilds this image in
        the current directory from its params and ops."""
        from .reproduce import image_script

        return image_script(self)

    def cleanup(self) -> None:
        _files.remove(self.directory)


_QEMU_CREATED: dict[tuple, bytes] = {}
_QEMU_CACHE_ENTRIES = 512
_QEMU_CACHE_FILE_MAX = 1 << 20
QEMU_CREATE_CACHE = os.environ.get("PYQCOW_TESTING_QEMU_CACHE", "1") != "0"


def _qemu_cache_key(p: ImageParams, backing: str | None, backing_format: str | None):
    if not QEMU_CREATE_CACHE:
        return None
    per_l2 = p.cluster_size // (16 if p.extended_l2 else 8)
    l1 = -(-p.virtual_size // (per_l2 * p.cluster_size))
    return (p.qemu_options(), backing, backing_format if backing else None, l1)


def _create(path: str, p: ImageParams, backing: str | None = None,
            backing_format: str | None = None, data_file: str | None = None) -> None:
    if p.creator == "qemu-img":
        key = None if data_file else _qemu_cache_key(p, backing, backing_format)
        hit = _QEMU_CREATED.get(key) if key else None
        if hit is not None:
            # qemu-img create writes the same bytes for every size with the same L1
            # table size, except the size field (tests/property/test_testing_kit.py
            # compares the two)
            with open(path, "wb") as f:
                f.write(hit[:24] + p.virtual_size.to_bytes(8, "big") + hit[32:])
            return
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", p.qemu_options(data_file)]
        if backing is not None:
            argv += ["-b", backing, "-F", backing_format or "qcow2"]
        argv += [path, str(p.virtual_size)]
        r = subprocess.run(argv, capture_output=True, text=True, check=False,
                           cwd=os.path.dirname(path))
        if r.returncode:
            raise RuntimeError(f"qemu-img create failed: {argv}: {r.stderr.strip()}")
        if key is not None:
            with open(path, "rb") as f:
                made = f.read(_QEMU_CACHE_FILE_MAX + 1)
            if len(made) <= _QEMU_CACHE_FILE_MAX and int.from_bytes(made[36:40], "big") == key[-1] \
                    and len(_QEMU_CREATED) < _QEMU_CACHE_ENTRIES:
                _QEMU_CREATED[key] = made
        return
    from ..newimage import create

    create(path, p.virtual_size, backing=backing, backing_format=backing_format,
           cluster_size=p.cluster_size, compat=p.compat, lazy_refcounts=p.lazy_refcounts,
           extended_l2=p.extended_l2, compression_type=p.compression_type,
           refcount_bits=p.refcount_bits)


def _ops_kinds(p: ImageParams, has_backing: bool) -> list[str]:
    kinds = ["write", "write"]
    if p.zero_clusters:
        kinds.append("zero")
    if p.discard and not (p.version == 2 and has_backing):
        kinds.append("discard")
    if p.compressed and not p.data_file and (p.writer == "pyqcow" or have_qemu()):
        kinds.append("compressed")
    return kinds


def _compressed_only_fresh(ops: list[Op], cs: int, touched: set[int]) -> list[Op]:
    """qemu cannot write a compressed cluster over an allocated one: such ops become
    writes (for both writers, so the model does not depend on the writer)."""
    out = []
    for op in ops:
        first, last = op.offset // cs, (op.offset + op.length - 1) // cs
        if op.kind == "compressed" and first in touched:
            op = Op("write", op.offset, op.length, op.seed, op.pattern)
        touched.update(range(first, last + 1))
        out.append(op)
    return out


@dataclass
class _Plan:
    """Everything drawn for one image, before any file exists."""

    params: ImageParams
    segments: list[list[Op]]  # ops, then a snapshot between consecutive segments


def _plan_image(draw, p: ImageParams, has_backing: bool, *, max_ops: int, min_ops: int,
                max_snapshots: int) -> _Plan:
    kinds = _ops_kinds(p, has_backing)
    n_snap = 0
    # compressed clusters share host clusters: snapshots raise their refcounts a lot
    if max_snapshots and have_qemu() and p.refcount_bits >= 8 and not p.data_file:
        n_snap = draw(st.integers(0, min(max_snapshots, (1 << min(p.refcount_bits, 8)) - 2)))
    touched: set[int] = set()
    segments = []
    for seg in range(n_snap + 1):
        abstract = draw(_ops_strategy(kinds, min_ops if seg == 0 else 0, max_ops))
        ops = _concrete_ops(abstract, p.virtual_size, p.cluster_size)
        segments.append(_compressed_only_fresh(ops, p.cluster_size, touched))
    return _Plan(p, segments)


def _build_image(directory: str, name: str, plan: _Plan, *, backing: str | None,
                 backing_format: str | None, initial: bytes) -> GeneratedImage:
    p = plan.params
    path = os.path.join(directory, name)
    data_file = name.rsplit(".", 1)[0] + ".data" if p.data_file else None
    steps: list[tuple] = [("create", name, p, backing, backing_format, data_file)]
    # stored as an absolute name: qemu 7.2 resolves a relative data file name
    # against its working directory, not the image's
    _create(path, p, backing, backing_format,
            os.path.join(directory, data_file) if data_file else None)
    model = bytearray(initial[: p.virtual_size].ljust(p.virtual_size, b"\0"))
    snapshots: dict[str, bytes] = {}
    all_ops: list[Op] = []
    for seg, ops in enumerate(plan.segments):
        if ops:
            apply_ops(path, ops, writer=p.writer, workdir=directory)
            steps.append(("ops", p.writer, list(ops)))
        for op in ops:
            op.apply_to_model(model)
        all_ops += ops
        if seg < len(plan.segments) - 1:
            sname = f"snap{seg}"
            r = subprocess.run(["qemu-img", "snapshot", "-c", sname, path],
                               capture_output=True, text=True, check=False)
            if r.returncode:
                raise RuntimeError(f"qemu-img snapshot -c failed: {p}: {r.stderr}")
            snapshots[sname] = bytes(model)
            steps.append(("snapshot", sname))
    if p.bitmaps:
        r = subprocess.run(["qemu-img", "bitmap", "--add", path, "bitmap0"],
                           capture_output=True, text=True, check=False)
        if r.returncode:
            raise RuntimeError(f"qemu-img bitmap --add failed: {p}: {r.stderr}")
        steps.append(("bitmap", "bitmap0"))
    if p.unknown_extension:
        if not add_unknown_extension(path, UNKNOWN_EXTENSION_TYPE, UNKNOWN_EXTENSION_DATA):
            # a small cluster 0 already full (feature table, bitmaps and data-file
            # extensions, a backing name): this draw cannot hold the toggle; discard
            # it rather than quietly dropping the extension
            from hypothesis import reject

            reject()
        steps.append(("extension", UNKNOWN_EXTENSION_TYPE, UNKNOWN_EXTENSION_DATA))
    bits = (DIRTY if p.dirty else 0) | (CORRUPT if p.corrupt else 0)
    if bits:
        set_incompatible_bits(path, bits)
        steps.append(("incompatible", bits))
    return GeneratedImage(path=path, directory=directory, params=p, expected=bytes(model),
                          ops=all_ops, snapshots=snapshots, backing=backing,
                          data_file=os.path.join(directory, data_file) if data_file else None,
                          steps=steps, backing_format=backing_format)


def images(
    *,
    params: st.SearchStrategy[ImageParams] | None = None,
    max_ops: int = 8,
    min_ops: int = 0,
    snapshots: int = 0,
    directory: str | os.PathLike | None = None,
) -> st.SearchStrategy[GeneratedImage]:
    """A standalone qcow2 image with data written into it, and its expected content.

    ``min_ops``/``max_ops`` bound the number of guest operations written.
    ``params``: a strategy for :class:`ImageParams` (default :func:`image_params`).
    ``snapshots``: at most this many internal snapshots (qemu-img snapshot -c)
    taken between batches of operations; their content is in ``.snapshots``
    (0: the switch for internal snapshots is off).  ``directory``: where each
    example's directory is made (e.g. pytest's ``tmp_path``).
    """
    if snapshots and not have_qemu():
        snapshots = 0  # documented: snapshots need qemu-img
    return _images(params if params is not None else _default_params(), max_ops, min_ops,
                   snapshots, directory)


_DEFAULTS: dict = {}


def _default_params(**kw) -> _ParamsStrategy:
    key = tuple(sorted(kw.items()))
    if key not in _DEFAULTS:
        _DEFAULTS[key] = image_params(**kw)
    return _DEFAULTS[key]


@st.composite
def _images(draw, params, max_ops, min_ops, snapshots, directory) -> GeneratedImage:
    p = draw(params)
    plan = _plan_image(draw, p, False, max_ops=max_ops, min_ops=min_ops,
                       max_snapshots=snapshots)
    d = _files.new_dir(directory)
    with _files.no_fsync():
        img = _build_image(d, "image.qcow2", plan, backing=None, backing_format=None,
                           initial=b"")
    img.files = [img.path]
    _files.keep_example(d, img.reproduce() if _files.keep_mode() else "")
    return img
