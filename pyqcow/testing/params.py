"""Image parameters: :class:`ImageParams` and the :func:`image_params` strategy.

Every feature switch of :func:`image_params` is honoured or refused with
``ValueError`` when the strategy is built (:func:`_validate`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, fields

from hypothesis import strategies as st

__all__ = ["PARAM_FIELDS", "ImageParams", "have_qemu", "image_params", "round_size"]

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


# keep the dataclass field names importable for users that introspect ImageParams
PARAM_FIELDS = tuple(f.name for f in fields(ImageParams))
