"""Generated backing chains: :class:`GeneratedChain` and the :func:`chains` strategy."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from . import _files
from .guestops import _KINDS, Op, _concrete_ops, _ops_strategy
from .imagegen import (
    GeneratedImage,
    _build_image,
    _compressed_only_fresh,
    _default_params,
    _ops_kinds,
    _Plan,
    _plan_image,
    _short,
)
from .params import ImageParams, _ParamsStrategy, round_size

__all__ = ["GeneratedChain", "chains"]


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
    raw_ops = base_size_p = None
    if raw_base:
        raw_ops = draw(_ops_strategy(("write", "zero"), min_ops, max_ops))
        base_size_p = draw(base_strat)  # the size family of the chain
    base_plan = None
    if base_p is not None:
        base_plan = _plan_image(draw, base_p, False, max_ops=max_ops, min_ops=min_ops,
                                max_snapshots=0)
    specs = _overlay_specs(draw, depth, over_strat, over_strats, max_ops, min_ops, same_size)

    d = _files.new_dir(directory)
    base_dir = os.path.join(d, "base") if subdir else d
    os.makedirs(base_dir, exist_ok=True)
    # one row per layer, base first: (path, format, expected, params, ops, image)
    rows: list[tuple] = []
    with _files.no_fsync():
        if raw_base:
            rows.append(_raw_base(base_dir, round_size(base_size_p.virtual_size), raw_ops))
        else:
            img = _build_image(base_dir, "base.qcow2", base_plan, backing=None,
                               backing_format=None, initial=b"")
            rows.append((img.path, "qcow2", img.expected, base_plan.params, img.ops, img))
        for i, (p, extra, abstract) in enumerate(specs, start=1):
            rows.append(_overlay(d, i, p, extra, abstract, rows[-1]))
    rows.reverse()
    layers, formats, expected, plist, all_ops, gimgs = (list(c) for c in zip(*rows, strict=True))
    ch = GeneratedChain(directory=d, layers=layers, formats=formats, expected=expected,
                        params=plist, ops=all_ops, images=gimgs)
    _files.keep_example(d, ch.reproduce() if _files.keep_mode() else "")
    return ch


def _overlay_specs(draw, depth, over_strat, over_strats, max_ops, min_ops, same_size) -> list:
    """The overlays' (params, extra size, abstract ops), bottom first: a list, so the
    shrinker can delete any one of them."""
    if over_strats is not None:
        return [draw(_layer_spec(s, _KINDS, max_ops, min_ops, not same_size))
                for s in over_strats]
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
    return specs


def _raw_base(base_dir: str, size: int, raw_ops) -> tuple:
    path = os.path.join(base_dir, "base.raw")
    model = bytearray(size)
    ops = _concrete_ops(raw_ops, size, 512)
    for op in ops:
        op.apply_to_model(model)
    with open(path, "wb") as f:
        f.write(model)
    return (path, "raw", bytes(model), None, ops, None)


def _overlay(d: str, i: int, p: ImageParams, extra: int, abstract, below: tuple) -> tuple:
    below_path, below_fmt, below_expected = below[:3]
    vs = max(len(below_expected) + extra * 512, 512)
    p = replace(p, virtual_size=vs)
    kinds = _ops_kinds(p, True)
    ab = [a if a[0] in kinds else ("write",) + tuple(a[1:]) for a in abstract]
    ops = _compressed_only_fresh(_concrete_ops(ab, vs, p.cluster_size), p.cluster_size, set())
    rel = os.path.relpath(below_path, d)
    img = _build_image(d, f"layer{i}.qcow2", _Plan(p, [ops]), backing=rel,
                       backing_format=below_fmt, initial=below_expected)
    return (img.path, "qcow2", img.expected, p, img.ops, img)
