"""Backing chains: name resolution, format probing, loop and depth checks."""

from __future__ import annotations

import os

from . import spec
from .errors import BackingChainError, FormatError, QcowError


def probe_format(path: str) -> str:
    """'qcow2' if the file starts with the qcow2 magic, else 'raw'."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise BackingChainError(path, "no such file") from None
    except IsADirectoryError:
        raise BackingChainError(path, "is a directory, not an image file") from None
    except OSError as e:
        raise QcowError(path, f"cannot open: {e.strerror}") from e
    if magic == spec.QCOW_MAGIC_BYTES:
        return "qcow2"
    if magic[:3] == b"QFI":
        raise FormatError(path, "qcow version 1 images are not supported")
    return "raw"


def resolve_backing(image_path: str, name: str) -> str:
    """Backing file path as QEMU resolves it: relative to the image's directory."""
    if name.startswith(("json:", "nbd:", "http:", "https:", "ssh:", "rbd:", "iscsi:")):
        raise BackingChainError(image_path, f"backing file {name!r} is not a local file")
    name = name.removeprefix("file:")
    if os.path.isabs(name):
        return name
    # qemu's path_combine(): the image path up to its last '/', then the name
    # ("top.qcow2" + "sub/b" -> "sub/b", not "./sub/b": info prints this path).
    return image_path[: image_path.rfind("/") + 1] + name


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _inside(path: str, root: str) -> bool:
    real = os.path.realpath(path)
    root = os.path.realpath(root)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def open_image(
    path: str | os.PathLike,
    mode: str = "r",
    *,
    format: str | None = None,
    force_share: bool = False,
    backing: bool = True,
    backing_root: str | os.PathLike | None = None,
    backing_mode: str = "r",
):
    """Open ``path`` and (unless ``backing=False``) its whole backing chain, read-only."""

    path = os.fspath(path)
    root = os.fspath(backing_root) if backing_root is not None else None
    fmt = format or probe_format(path)
    top = _open_one(path, fmt, mode, force_share, root)
    if not backing:
        return top
    seen = {_identity(path)}
    names = [path]
    cur = top
    try:
        while cur.format == "qcow2" and cur.header.backing_file:
            if len(names) > spec.MAX_CHAIN_DEPTH:
                raise BackingChainError(
                    path, f"backing chain deeper than {spec.MAX_CHAIN_DEPTH}: " + " -> ".join(names)
                )
            name = cur.header.backing_file
            bpath = resolve_backing(cur.path, name)
            if root is not None and not _inside(bpath, root):
                raise BackingChainError(
                    cur.path, f"backing file {name!r} lies outside the allowed directory {root}"
                )
            if not os.path.exists(bpath):
                raise BackingChainError(
                    cur.path,
                    f"backing file {name!r} not found (chain: {' -> '.join(names + [bpath])})",
                )
            ident = _identity(bpath)
            if ident in seen:
                raise BackingChainError(
                    cur.path,
                    "backing chain loops back on itself: " + " -> ".join(names + [bpath]),
                )
            seen.add(ident)
            names.append(bpath)
            bfmt = cur.header.backing_format or probe_format(bpath)
            if bfmt not in ("qcow2", "raw"):
                raise BackingChainError(cur.path, f"backing file format {bfmt!r} is not supported")
            if bfmt == "qcow2" and probe_format(bpath) != "qcow2":
                raise BackingChainError(
                    cur.path, f"backing file {name!r} is declared qcow2 but is not a qcow2 image"
                )
            try:
                nxt = _open_one(bpath, bfmt, backing_mode if cur is top else "r", force_share, root)
            except BackingChainError:
                raise
            except QcowError as e:
                raise BackingChainError(cur.path, f"backing file {name!r}: {e}") from e
            cur.backing = nxt
            cur = nxt
    except BaseException:
        top.close()
        raise
    return top


def _open_one(path: str, fmt: str, mode: str, force_share: bool, root: str | None = None):
    from .image import QcowImage
    from .raw import RawImage

    if fmt == "qcow2":
        return QcowImage(path, mode, force_share=force_share, data_root=root)
    if fmt == "raw":
        return RawImage(path, mode, force_share=force_share)
    raise FormatError(path, f"unsupported image format {fmt!r}")


def chain_description(img) -> list[tuple[str, str]]:
    """[(absolute path, format), ...] from top to bottom."""
    return [(os.path.abspath(i.path), i.format) for i in img.chain]
