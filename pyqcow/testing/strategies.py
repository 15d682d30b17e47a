"""Hypothesis strategies that build valid qcow2 images, chains and operations.

Every strategy here draws a *file* (or several) in a fresh temporary directory
together with the guest content it must read as, so a test can compare any
qcow2 reader or tool against a model::

    from hypothesis import given
    from pyqcow.testing import images

    @given(images())
    def test_my_reader(img):
        assert my_reader.read_all(img.path) == img.expected

What is varied (see :class:`ImageParams` and :func:`image_params`): cluster
size (512 B .. 64 KiB), compat 0.10 (v2) or 1.1 (v3), refcount width (1..64
bits), extended L2 entries (subclusters), compression type (zlib, zstd) with
compressed clusters, zero clusters, discarded clusters, lazy refcounts,
internal snapshots, the tool that created the file (pyqcow or qemu-img) and the
one that wrote the guest data (pyqcow's writer, qemu-io).  Opt-in features:
external data files, persistent bitmaps, unknown header extensions, the dirty
and corrupt bits.  Every feature has its own switch in :func:`image_params`;
a combination that cannot be honoured raises ``ValueError`` when the strategy
is built, never silently becomes something else.

Each example's directory is removed when the example ends (see
``pyqcow.testing._files``: ``PYQCOW_TESTING_KEEP=failing`` keeps the failing
one).  Pass ``directory=`` to put them elsewhere (pytest's ``tmp_path``).

The data model for discards: only whole, cluster-aligned ranges are discarded
and they read as zeros afterwards (v2 images with a backing file cannot
express that, so no discard is drawn for them).  Partial discards are allowed
to do nothing, which makes them useless for a model.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from . import _files, _qemuio
from ._patch import add_unknown_extension, set_incompatible_bits

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

UNKNOWN_EXTENSION_TYPE = 0x70797163  # "pyqc": unknown to QEMU, which must ignore it
UNKNOWN_EXTENSION_DATA = b"pyqcow.testing unknown extension"
DIRTY, CORRUPT = 1, 2
_HAVE_QEMU: list[bool] = []


def have_qemu() -> bool:
    """Whether qemu-img and qemu-io are on PATH (needed for some features)."""
    if not _HAVE_QEMU:
        _HAVE_QEMU.append(shutil.which("qemu-img") is not None
                          and shutil.which("qemu-io") is not None)
    return _HAVE_QEMU[0]


def round_size(n: int) -> int:
    """A virtual size as qemu-img create stores it: rounded up to 512 bytes."""
    return -(-int(n) // 512) * 512


# ---------------------------------------------------------------------------- operations
@dataclass(frozen=True)
class Op:
    """One guest operation.

    ``kind``: ``write`` (data), ``zero`` (write zeroes), ``discard`` (whole
    clusters, read as zeros afterwards) or ``compressed`` (one cluster written
    compressed).  Data is derived from ``seed``: a repeated byte when
    ``pattern`` is true (compressible), pseudo-random bytes otherwise
    (``random.Random(seed).randbytes(length)``).
    """

    kind: str
    offset: int
    length: int
    seed: int = 0
    pattern: bool = False

    @property
    def fill(self) -> int:
        return self.seed & 0xFF or 1

    @property
    def data(self) -> bytes:
        if self.kind in ("zero", "discard"):
            return bytes(self.length)
        if self.pattern:
            return bytes([self.fill]) * self.length
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
            return f"write {flag}-P {self.fill} {self.offset} {self.length}"
        assert datafile is not None
        return f"write {flag}-s {datafile} {self.offset} {self.length}"


_KINDS = ("write", "zero", "discard", "compressed")
_MAX_UNIT = (1 << 24) - 1


@st.composite
def _abstract_op(draw, kinds: Sequence[str]):
    """An operation independent of the disk size: mapped by :func:`_concrete`.
    Every draw is valid (no rejection), and each number shrinks towards the
    smallest operation at the start of the disk.  Four draws per operation
    (generation speed): ``bits`` holds the data seed (low 32 bits), whether the
    data is a repeated byte (bit 32) and whether the range is cluster aligned
    (bit 33)."""
    kind = draw(st.sampled_from(kinds))
    where = draw(st.integers(0, _MAX_UNIT))
    size = draw(st.integers(0, _MAX_UNIT))
    bits = draw(st.integers(0, (1 << 34) - 1))
    seed = bits & 0xFFFFFFFF
    pattern = kind == "compressed" or bool(bits >> 32 & 1)
    return (kind, bool(bits >> 33 & 1), where, size, seed, pattern)


def _concrete(a, virtual_size: int, cluster_size: int) -> Op | None:
    kind, aligned, where, size, seed, pattern = a
    if virtual_size <= 0:
        return None
    if kind in ("discard", "compressed"):
        full = virtual_size // cluster_size
        if full == 0:
            return None
        first = where % full
        num = 1 if kind == "compressed" else 1 + size % min(4, full - first)
        return Op(kind, first * cluster_size, num * cluster_size, seed, pattern)
    n_clusters = -(-virtual_size // cluster_size)
    if aligned:
        offset = (where % n_clusters) * cluster_size
        length = min((1 + size % 3) * cluster_size, virtual_size - offset)
    else:
        offset = where % virtual_size
        length = 1 + size % min(virtual_size - offset, 3 * cluster_size)
    return Op(kind, offset, length, seed, pattern)


_OPS_CACHE: dict = {}


def _ops_strategy(kinds: Sequence[str], min_ops: int, max_ops: int):
    max_ops = max(max_ops, 0)
    key = (tuple(kinds), min(min_ops, max_ops), max_ops)
    if key not in _OPS_CACHE:
        _OPS_CACHE[key] = st.lists(_abstract_op(tuple(kinds)), min_size=key[1], max_size=max_ops)
    return _OPS_CACHE[key]


def _concrete_ops(abstract, virtual_size: int, cluster_size: int) -> list[Op]:
    ops = []
    for a in abstract:
        op = _concrete(a, virtual_size, cluster_size)
        if op is not None:
            ops.append(op)
    return ops


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
    copy-on-write); discards and compressed writes cover whole clusters (none
    are drawn in a disk smaller than one cluster).  Shrinks towards fewer,
    shorter operations at offset 0.
    """
    if virtual_size <= 0:
        return []
    return _concrete_ops(draw(_ops_strategy(kinds, min_ops, max_ops)), virtual_size,
                         cluster_size)


def apply_ops(path: str, ops: Sequence[Op], *, writer: str = "pyqcow", fmt: str = "qcow2",
              workdir: str | None = None) -> None:
    """Perform ``ops`` on the image at ``path`` (through its backing chain).

    ``writer``: ``pyqcow`` (pyqcow.open(path, "r+"), compressed clusters with
    its ``write_compressed``) or ``qemu-io`` (one qemu-io run; a compressed
    write gets a qemu-io run of its own).
    """
    if writer not in ("pyqcow", "qemu-io"):
        raise ValueError(f"writer must be 'pyqcow' or 'qemu-io', not {writer!r}")
    if writer == "pyqcow":
        _apply_pyqcow(path, ops)
        return
    for group in _qemu_io_groups(ops):
        _apply_qemu_io(path, group, fmt, workdir)


def _qemu_io_groups(ops: Sequence[Op]) -> list[list[Op]]:
    # a compressed write runs in a qemu-io process of its own: qemu 7.2 keeps
    # appending compressed data to a host cluster it has freed and reused for a
    # copy-on-write in the same session, overwriting guest data
    groups: list[list[Op]] = []
    for op in ops:
        alone = op.kind == "compressed" or (groups and groups[-1][-1].kind == "compressed")
        if groups and not alone:
            groups[-1].append(op)
        else:
            groups.append([op])
    return groups


def _apply_pyqcow(path: str, ops: Sequence[Op]) -> None:
    from .. import open as qopen

    with qopen(path, "r+") as img:
        comp = None
        for op in ops:
            if op.kind == "write":
                img.write(op.offset, op.data)
            elif op.kind == "compressed":
                if comp is None:
                    from ..ops.convert import compressor

                    ctype = "zstd" if getattr(img.header, "compression_type", 0) == 1 else "zlib"
                    comp = compressor(ctype)
                data = op.data
                packed = comp(data)
                if len(data) == img.cluster_size and len(packed) < len(data):
                    img.write_compressed(op.offset, packed)
                else:  # as qemu does with data that does not shrink
                    img.write(op.offset, data)
            elif op.kind == "zero":
                img.write_zeroes(op.offset, op.length)
            elif op.kind == "discard":
                img.discard(op.offset, op.length)
            else:  # pragma: no cover
                raise ValueError(op.kind)
        img.flush()


def _apply_qemu_io(path: str, ops: Sequence[Op], fmt: str, workdir: str | None) -> None:
    d = workdir or os.path.dirname(os.path.abspath(path))
    made: list[str] = []
    try:
        cmds = []
        for i, op in enumerate(ops):
            datafile = None
            if op.kind in ("write", "compressed") and not op.pattern:
                datafile = os.path.join(d, f".op{i}.bin")
                with open(datafile, "wb") as f:
                    f.write(op.data)
                made.append(datafile)
            cmds.append(op.qemu_io_command(datafile))
        try:
            if _qemuio.run(os.path.abspath(path), fmt, cmds):
                return
        except _qemuio.SessionError:
            pass  # rerun one-shot below: its error message is the one to report
        argv = ["qemu-io", "-f", fmt]
        for c in cmds:
            argv += ["-c", c]
        argv.append(path)
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        if r.returncode != 0 or "error" in r.stdout.lower() or "failed" in r.stdout.lower():
            raise RuntimeError(f"qemu-io failed ({r.returncode}): {argv}: {r.stdout}{r.stderr}")
    finally:
        for f in made:
            os.unlink(f)


# ---------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageParams:
    """The creation options and features of one generated qcow2 image.

    ``compressed``/``zero_clusters``/``discard``: whether operations of that
    kind may be drawn.  ``data_file``: guest data in an external data file
    (qemu-img made).  ``bitmaps``: a persistent dirty bitmap ``bitmap0``.
    ``unknown_extension``: a header extension QEMU does not know (and must
    ignore).  ``dirty``/``corrupt``: the incompatible feature bits set after
    writing (the content is still the model).
    """

    virtual_size: int
    cluster_size: int = 65536
    compat: str = "1.1"
    refcount_bits: int = 16
    extended_l2: bool = False
    compression_type: str = "zlib"
    lazy_refcounts: bool = False
    creator: str = "pyqcow"  # pyqcow | qemu-img
    writer: str = "pyqcow"  # pyqcow | qemu-io
    compressed: bool = True
    zero_clusters: bool = True
    discard: bool = True
    data_file: bool = False
    bitmaps: bool = False
    unknown_extension: bool = False
    dirty: bool = False
    corrupt: bool = False

    @property
    def version(self) -> int:
        return 2 if self.compat == "0.10" else 3

    def qemu_options(self, data_file: str | None = None) -> str:
        opts = [f"cluster_size={self.cluster_size}", f"compat={self.compat}",
                f"refcount_bits={self.refcount_bits}"]
        if self.version == 3:
            opts += [f"extended_l2={'on' if self.extended_l2 else 'off'}",
                     f"compression_type={self.compression_type}",
                     f"lazy_refcounts={'on' if self.lazy_refcounts else 'off'}"]
        if data_file:
            opts.append(f"data_file={data_file}")
        return ",".join(opts)


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


# --------------------------------------------------------------- params and their switches
_CLUSTER_SIZES = (512, 1024, 4096, 16384, 65536)


def _bools(name: str, v) -> list[bool]:
    vals = [bool(x) for x in (v if isinstance(v, (list, tuple, set, frozenset)) else [v])]
    if not vals:
        raise ValueError(f"image_params: {name} must allow at least one value")
    return sorted(set(vals))  # False first: shrinks towards the feature being off


class _ParamsStrategy(st.SearchStrategy):
    """What :func:`image_params` returns: a strategy that knows its options, so
    chains() can ask for the overlay variant (see :meth:`for_overlay`)."""

    def __init__(self, opts: dict, overlay: bool = False):
        super().__init__()
        self.opts = opts
        self.overlay = overlay
        self._inner = _draw_params(opts, overlay)

    def do_draw(self, data):
        return data.draw(self._inner)

    def for_overlay(self) -> _ParamsStrategy:
        return _ParamsStrategy(_validate(self.opts, overlay=True), overlay=True)

    def __repr__(self) -> str:
        given = self.opts.get("_given", {})
        return f"image_params({', '.join(f'{k}={v!r}' for k, v in given.items())})"


def image_params(
    *,
    cluster_sizes: Sequence[int] = _CLUSTER_SIZES,
    compat: Sequence[str] = ("0.10", "1.1"),
    refcount_bits: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    extended_l2: Sequence[bool] = (False, True),
    compression_types: Sequence[str] = ("zlib", "zstd"),
    lazy_refcounts: Sequence[bool] = (False,),
    max_clusters: int = 48,
    virtual_size: int | None = None,
    writers: Sequence[str] | None = None,
    creators: Sequence[str] | None = None,
    compressed: Sequence[bool] | bool = (True,),
    zero_clusters: Sequence[bool] | bool = (True,),
    discard: Sequence[bool] | bool = (True,),
    data_file: Sequence[bool] | bool = (False,),
    bitmaps: Sequence[bool] | bool = (False,),
    unknown_extensions: Sequence[bool] | bool = (False,),
    dirty: Sequence[bool] | bool = (False,),
    corrupt: Sequence[bool] | bool = (False,),
) -> _ParamsStrategy:
    """Valid combinations of qcow2 creation options and features.

    Each argument lists the values drawn.  Feature switches take ``True``,
    ``False`` or a sequence of both: ``compressed``, ``zero_clusters`` and
    ``discard`` allow operations of that kind (on by default; ``False`` means
    none are ever drawn); ``data_file``, ``bitmaps``, ``unknown_extensions``,
    ``dirty`` and ``corrupt`` add that feature (off by default).  Every switch
    is honoured: a value that forces something (``extended_l2=(True,)``,
    ``refcount_bits=(1,)``, ``data_file=True`` ...) narrows the other choices
    (v3, cluster sizes >= 16 KiB, qemu-img as the creator ...), and an
    impossible combination raises ``ValueError`` here, when the strategy is
    built.  ``virtual_size`` is rounded up to a multiple of 512 bytes, as
    ``qemu-img create`` does.
    """
    opts = dict(
        cluster_sizes=tuple(cluster_sizes), compat=tuple(compat),
        refcount_bits=tuple(refcount_bits), extended_l2=tuple(_bools("extended_l2", extended_l2)),
        compression_types=tuple(compression_types),
        lazy_refcounts=tuple(_bools("lazy_refcounts", lazy_refcounts)),
        max_clusters=max_clusters, virtual_size=virtual_size,
        writers=tuple(writers) if writers else None,
        creators=tuple(creators) if creators else None,
        compressed=tuple(_bools("compressed", compressed)),
        zero_clusters=tuple(_bools("zero_clusters", zero_clusters)),
        discard=tuple(_bools("discard", discard)),
        data_file=tuple(_bools("data_file", data_file)),
        bitmaps=tuple(_bools("bitmaps", bitmaps)),
        unknown_extensions=tuple(_bools("unknown_extensions", unknown_extensions)),
        dirty=tuple(_bools("dirty", dirty)), corrupt=tuple(_bools("corrupt", corrupt)),
    )
    o = _validate(opts)
    defaults = image_params.__kwdefaults__ or {}
    o["_given"] = {k: v for k, v in dict(
        cluster_sizes=cluster_sizes, compat=compat, refcount_bits=refcount_bits,
        extended_l2=extended_l2, compression_types=compression_types,
        lazy_refcounts=lazy_refcounts, max_clusters=max_clusters, virtual_size=virtual_size,
        writers=writers, creators=creators, compressed=compressed, zero_clusters=zero_clusters,
        discard=discard, data_file=data_file, bitmaps=bitmaps,
        unknown_extensions=unknown_extensions, dirty=dirty, corrupt=corrupt,
    ).items() if v != defaults.get(k)}
    return _ParamsStrategy(o)


def _validate(opts: dict, overlay: bool = False) -> dict:
    """Narrow the choices so every draw honours every switch; ValueError if impossible."""
    o = dict(opts)
    qemu = have_qemu()

    def fail(msg: str):
        raise ValueError(f"image_params: {msg}")

    for k in ("cluster_sizes", "compat", "refcount_bits", "compression_types"):
        if not o[k]:
            fail(f"{k} is empty")
    bad = [c for c in o["cluster_sizes"] if c < 512 or c > (2 << 20) or c & (c - 1)]
    if bad:
        fail(f"cluster sizes must be powers of two from 512 to 2 MiB: {bad}")
    if set(o["compat"]) - {"0.10", "1.1"}:
        fail(f"compat must be '0.10' or '1.1': {o['compat']}")
    if set(o["refcount_bits"]) - {1, 2, 4, 8, 16, 32, 64}:
        fail(f"refcount_bits must be powers of two up to 64: {o['refcount_bits']}")
    if set(o["compression_types"]) - {"zlib", "zstd"}:
        fail(f"compression_types must be 'zlib' or 'zstd': {o['compression_types']}")
    creators = list(o["creators"] or (["pyqcow", "qemu-img"] if qemu else ["pyqcow"]))
    writers = list(o["writers"] or (["pyqcow", "qemu-io"] if qemu else ["pyqcow"]))
    if set(creators) - {"pyqcow", "qemu-img"}:
        fail(f"creators must be 'pyqcow' or 'qemu-img': {creators}")
    if set(writers) - {"pyqcow", "qemu-io"}:
        fail(f"writers must be 'pyqcow' or 'qemu-io': {writers}")
    if not qemu and ("qemu-img" in creators or "qemu-io" in writers):
        if o["creators"] and "pyqcow" not in creators or o["writers"] and "pyqcow" not in writers:
            fail("qemu-img/qemu-io are not on PATH")
        creators = [c for c in creators if c != "qemu-img"]
        writers = [w for w in writers if w != "qemu-io"]
    # features that exist only in v3 (compat=1.1)
    v3_only = [k for k in ("extended_l2", "data_file", "bitmaps", "dirty", "corrupt",
                           "lazy_refcounts") if o[k] == (True,)]
    if 16 not in o["refcount_bits"]:
        v3_only.append("refcount_bits without 16")
    if "zstd" not in o["compression_types"]:
        v3_only.append("compression_types=('zstd',)")
    compat = list(o["compat"])
    if v3_only:
        if "1.1" not in compat:
            fail(f"{', '.join(v3_only)} need compat 1.1 (v3), but compat is {o['compat']}")
        compat = ["1.1"]
    sizes = list(o["cluster_sizes"])
    if o["extended_l2"] == (True,):
        sizes = [c for c in sizes if c >= 16384]
        if not sizes:
            fail("extended_l2=(True,) needs a cluster size of at least 16 KiB")
    if o["data_file"] == (True,):
        if "qemu-img" not in creators:
            fail("data_file=(True,) needs qemu-img as a creator (pyqcow.create makes no data "
                 "files)" + ("" if qemu else "; qemu-img is not on PATH"))
        creators = ["qemu-img"]
    for k in ("bitmaps", "data_file"):
        if o[k] == (True,) and not qemu:
            fail(f"{k}=(True,) needs qemu-img, which is not on PATH")
    if overlay and "qemu-img" not in creators:
        # pyqcow.create always writes the feature name table, which leaves no room for a
        # backing name in a 512/1024-byte cluster 0 (qemu-img drops the table there)
        sizes = [c for c in sizes if c >= 4096]
        if not sizes:
            fail("overlays with cluster sizes under 4 KiB need qemu-img as a creator")
    o["_compat"], o["_sizes"], o["_creators"], o["_writers"] = compat, sizes, creators, writers
    return o


def _draw_params(o: dict, overlay: bool):
    return _params_from(o, overlay)


@st.composite
def _params_from(draw, o: dict, overlay: bool) -> ImageParams:
    cs = draw(st.sampled_from(o["_sizes"]))
    v = draw(st.sampled_from(o["_compat"]))
    rbs = list(o["refcount_bits"]) if v == "1.1" else [16]
    rb = draw(st.sampled_from(rbs))
    ext = False
    ctype = "zlib"
    lazy = False
    if v == "1.1":
        if cs >= 16384:
            ext = draw(st.sampled_from(o["extended_l2"]))
        ctype = draw(st.sampled_from(list(o["compression_types"])))
        lazy = draw(st.sampled_from(o["lazy_refcounts"]))
    if o["virtual_size"] is None:
        size = draw(st.integers(1, o["max_clusters"])) * cs
        if cs > 512 and draw(st.booleans()):
            size -= draw(st.integers(0, min(cs, 4096) // 512 - 1)) * 512
        size = max(size, 512)
    else:
        size = round_size(o["virtual_size"])
    creators = o["_creators"]
    df = False
    if v == "1.1" and "qemu-img" in creators:
        df = draw(st.sampled_from(o["data_file"]))
    if df:
        creators = ["qemu-img"]
    elif overlay and cs < 4096 and "qemu-img" in creators:
        creators = ["qemu-img"]
    creator = draw(st.sampled_from(creators))
    writer = draw(st.sampled_from(o["_writers"]))
    comp = draw(st.sampled_from(o["compressed"])) and not df
    zero = draw(st.sampled_from(o["zero_clusters"]))
    disc = draw(st.sampled_from(o["discard"]))
    v3 = v == "1.1"
    bm = v3 and have_qemu() and draw(st.sampled_from(o["bitmaps"]))
    unk = draw(st.sampled_from(o["unknown_extensions"]))
    dirty = v3 and draw(st.sampled_from(o["dirty"]))
    corrupt = v3 and draw(st.sampled_from(o["corrupt"]))
    return ImageParams(
        virtual_size=size, cluster_size=cs, compat=v, refcount_bits=rb, extended_l2=ext,
        compression_type=ctype, lazy_refcounts=lazy, creator=creator, writer=writer,
        compressed=comp, zero_clusters=zero, discard=disc, data_file=df, bitmaps=bool(bm),
        unknown_extension=unk, dirty=bool(dirty), corrupt=bool(corrupt),
    )


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


@dataclass(repr=False)
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
    images: list[GeneratedImage | None] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"GeneratedChain(layers={self.layers!r}, formats={self.formats!r}, "
                f"params={self.params!r}, ops={self.ops!r}, "
                f"expected=[{', '.join(_short(e) for e in self.expected)}])")

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(repr(self))

    @property
    def top(self) -> str:
        return self.layers[0]

    @property
    def base(self) -> str:
        return self.layers[-1]

    @property
    def top_expected(self) -> bytes:
        return self.expected[0]

    @property
    def depth(self) -> int:
        return len(self.layers)

    def reproduce(self) -> str:
        """A shell script that rebuilds the whole chain (base first) from its
        params and ops, with the same relative backing names."""
        from .reproduce import chain_script

        return chain_script(self)

    def cleanup(self) -> None:
        _files.remove(self.directory)


def _depth_bounds(depth) -> tuple[int, int] | None:
    if isinstance(depth, int):
        return depth, depth
    s = depth
    for _ in range(3):
        if hasattr(s, "start") and hasattr(s, "end") and isinstance(s.start, int) \
                and isinstance(s.end, int):
            return s.start, s.end
        try:
            s = s.wrapped_strategy
        except Exception:  # noqa: BLE001
            return None
    return None


def chains(
    depth: int | st.SearchStrategy[int] = st.integers(2, 3),
    *,
    raw_base: bool | None = None,
    params: st.SearchStrategy[ImageParams] | Sequence[st.SearchStrategy[ImageParams]]
    | None = None,
    max_ops: int = 6,
    min_ops: int = 0,
    same_size: bool = False,
    subdir: bool | None = None,
    directory: str | os.PathLike | None = None,
) -> st.SearchStrategy[GeneratedChain]:
    """A chain of ``depth`` images (base + overlays) with data in every layer.

    ``raw_base``: the base is a raw file (None: drawn).  ``params``: one
    strategy for every qcow2 layer, or a list of them, one per layer, top
    first like ``.layers`` (its length is the depth; a raw base takes no
    params and its entry is ignored).  Overlays may be larger than their
    backing file unless ``same_size``.  ``subdir``: the base lives in a
    sub-directory, so the stored relative name has a directory part.

    The layers are drawn as a list before any file is made, so hypothesis
    shrinks a failing chain by deleting whole layers (down to the smallest
    depth allowed), then operations, then sizes.
    """
    per_layer = None
    if params is not None and not isinstance(params, st.SearchStrategy):
        per_layer = list(params)
        if not per_layer:
            raise ValueError("chains: params is an empty list")
        if depth is not _DEFAULT_DEPTH and depth != len(per_layer):
            raise ValueError(f"chains: {len(per_layer)} per-layer params but depth={depth!r}")
        depth = len(per_layer)
        per_layer.reverse()  # base first, as built
    if isinstance(depth, int) and depth < 1:
        raise ValueError("depth must be at least 1")
    base_strat = per_layer[0] if per_layer else (
        params if params is not None else _default_params(max_clusters=24))
    if per_layer:
        over_strats = [_overlay_variant(s) for s in per_layer[1:]]
        over_strat = None
    else:
        over_strats = None
        over_strat = _overlay_variant(params if params is not None
                                      else _default_params(max_clusters=24))
    return _chains(depth, raw_base, base_strat, over_strat, over_strats, max_ops, min_ops,
                   same_size, subdir, directory)


_DEFAULT_DEPTH = chains.__defaults__[0]  # type: ignore[index]


def _overlay_variant(s):
    return s.for_overlay() if isinstance(s, _ParamsStrategy) else s


@st.composite
def _layer_spec(draw, pstrat, kinds_all, max_ops, min_ops, grow: bool):
    p = draw(pstrat)
    extra = draw(st.integers(0, 8)) if grow and draw(st.booleans()) else 0
    abstract = draw(_ops_strategy(kinds_all, min_ops, max_ops))
    return p, extra, abstract


@st.composite
def _chains(draw, depth, raw_base, base_strat, over_strat, over_strats, max_ops, min_ops,
            same_size, subdir, directory) -> GeneratedChain:
    if raw_base is None:
        raw_base = draw(st.booleans())
    if subdir is None:
        subdir = draw(st.booleans())
    base_p = None if raw_base else draw(base_strat)
    raw_ops = None
    if raw_base:
        raw_ops = draw(_ops_strategy(("write", "zero"), min_ops, max_ops))
        base_size_p = draw(base_strat)  # the size family of the chain
    base_plan = None
    if base_p is not None:
        base_plan = _plan_image(draw, base_p, False, max_ops=max_ops, min_ops=min_ops,
                                max_snapshots=0)
    # overlays: a list, so the shrinker can delete any one of them
    if over_strats is not None:
        specs = [draw(_layer_spec(s, _KINDS, max_ops, min_ops, not same_size))
                 for s in over_strats]
    else:
        bounds = _depth_bounds(depth)
        if bounds is None:
            n = draw(depth)
            if n < 1:
                raise InvalidArgument("depth must be at least 1")
            bounds = (n, n)
        lo, hi = max(bounds[0] - 1, 0), max(bounds[1] - 1, 0)
        spec = _layer_spec(over_strat, _KINDS, max_ops, min_ops, not same_size)
        # min_size=0: every element can be deleted while shrinking (hypothesis deletes
        # an element with the choice that announced it); the overlays still missing
        # for the minimum depth are drawn after the list and go just above the base
        specs = draw(st.lists(spec, min_size=0, max_size=hi))
        if len(specs) < lo:
            specs = [draw(spec) for _ in range(lo - len(specs))] + specs

    d = _files.new_dir(directory)
    base_dir = os.path.join(d, "base") if subdir else d
    os.makedirs(base_dir, exist_ok=True)
    layers: list[str] = []
    formats: list[str] = []
    expected: list[bytes] = []
    plist: list[ImageParams | None] = []
    all_ops: list[list[Op]] = []
    gimgs: list[GeneratedImage | None] = []
    with _files.no_fsync():
        if raw_base:
            size = round_size(base_size_p.virtual_size)
            path = os.path.join(base_dir, "base.raw")
            model = bytearray(size)
            ops = _concrete_ops(raw_ops, size, 512)
            for op in ops:
                op.apply_to_model(model)
            with open(path, "wb") as f:
                f.write(model)
            layers.append(path)
            formats.append("raw")
            expected.append(bytes(model))
            plist.append(None)
            all_ops.append(ops)
            gimgs.append(None)
        else:
            img = _build_image(base_dir, "base.qcow2", base_plan, backing=None,
                               backing_format=None, initial=b"")
            layers.append(img.path)
            formats.append("qcow2")
            expected.append(img.expected)
            plist.append(base_plan.params)
            all_ops.append(img.ops)
            gimgs.append(img)
        for i, (p, extra, abstract) in enumerate(specs, start=1):
            vs = max(len(expected[-1]) + extra * 512, 512)
            p = replace(p, virtual_size=vs)
            kinds = _ops_kinds(p, True)
            ab = [a if a[0] in kinds else ("write",) + tuple(a[1:]) for a in abstract]
            ops = _compressed_only_fresh(_concrete_ops(ab, vs, p.cluster_size), p.cluster_size,
                                         set())
            rel = os.path.relpath(layers[-1], d)
            img = _build_image(d, f"layer{i}.qcow2", _Plan(p, [ops]), backing=rel,
                               backing_format=formats[-1], initial=expected[-1])
            layers.append(img.path)
            formats.append("qcow2")
            expected.append(img.expected)
            plist.append(p)
            all_ops.append(img.ops)
            gimgs.append(img)
    for lst in (layers, formats, expected, plist, all_ops, gimgs):
        lst.reverse()
    ch = GeneratedChain(directory=d, layers=layers, formats=formats, expected=expected,
                        params=plist, ops=all_ops, images=gimgs)
    _files.keep_example(d, ch.reproduce() if _files.keep_mode() else "")
    return ch


# keep the dataclass field names importable for users that introspect ImageParams
PARAM_FIELDS = tuple(f.name for f in fields(ImageParams))
