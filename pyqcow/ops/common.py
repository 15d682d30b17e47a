"""Shared helpers of the chain operations: opening chains, finding layers.

``dependents`` and ``same_file`` live in pyqcow/chain.py (create needs them too).
"""

from __future__ import annotations

import os

from ..chain import (  # noqa: F401 (dependents: for the ops)
    dependents,
    open_image,
    probe_format,
    resolve_backing,
    same_file,
)
from ..errors import BackingChainError, QcowError


def open_chain(top_path, top_mode: str = "r"):
    return open_image(top_path, top_mode)


def read_guest(img, dst: memoryview, offset: int) -> None:
    """Guest bytes of ``img`` at ``offset`` into ``dst``: zeros past its end, or if
    ``img`` is None (no backing file)."""
    n = len(dst)
    inside = 0 if img is None else max(0, min(n, img.virtual_size - offset))
    if inside:
        img.readinto(dst[:inside], offset)
    if inside < n:
        dst[inside:] = bytes(n - inside)


def find_layer(top, base_path: str | None):
    """(parent, base): ``base`` is in ``top``'s chain; ``parent`` is the image above it."""
    parent = top
    cur = top.backing
    if cur is None:
        raise BackingChainError(top.path, "image has no backing file")
    if base_path is None:
        return parent, cur
    while cur is not None:
        if same_file(cur.path, base_path):
            return parent, cur
        parent, cur = cur, cur.backing
    names = " -> ".join(i.path for i in top.chain)
    raise BackingChainError(base_path, f"is not in the backing chain of {top.path} ({names})")


def locate_base(top, base: str | None):
    """(parent, base image) for ``-b BASE``: BASE as given (relative to the current
    directory), else relative to TOP's directory as qemu resolves backing names."""
    try:
        return find_layer(top, base)
    except BackingChainError:
        if base is None or os.path.isabs(base):
            raise
        alt = resolve_backing(top.path, base)
        try:
            return find_layer(top, alt)
        except BackingChainError:
            pass
        raise


def reopen_rw(parent, img):
    """Reopen chain member ``img`` read-write in place (keeps its own backing)."""
    from ..image import QcowImage
    from ..raw import RawImage

    if img.writable:
        return img
    backing = img.backing
    img.backing = None
    img.close()
    try:
        new = QcowImage(img.path, "r+") if img.format == "qcow2" else RawImage(img.path, "r+")
    except QcowError:
        parent.backing = None
        if backing is not None:
            backing.close()
        raise
    new.backing = backing
    parent.backing = new
    return new


def backing_name_for(image_path: str, target_path: str, original_name: str | None) -> str:
    """Name to store in ``image_path``'s header for backing ``target_path``.

    Relative when the original reference was relative (relative to the image's
    own directory, as QEMU resolves it, through symbolic links), absolute
    otherwise; validated (see :func:`pyqcow.chain.backing_name`).
    """
    from ..chain import backing_name

    relative = original_name is None or not os.path.isabs(original_name.removeprefix("file:"))
    return backing_name(image_path, target_path, relative=relative)


def check_backing_target(path: str, backing: str) -> tuple[str, str]:
    full = resolve_backing(path, backing)
    if not os.path.exists(full):
        raise BackingChainError(path, f"new backing file {backing!r} not found ({full})")
    return full, probe_format(full)

