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

This module gathers the public strategies; they are defined by responsibility in
``params`` (image parameters), ``guestops`` (operations and the bytearray model),
``imagegen`` (standalone images) and ``chaingen`` (backing chains).
"""

from __future__ import annotations

from .chaingen import GeneratedChain, chains
from .guestops import Op, apply_ops, operations
from .imagegen import GeneratedImage, images
from .params import ImageParams, have_qemu, image_params

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
