"""Backing chains: name resolution, format probing, loop and depth checks."""

from __future__ import annotations

import os

from . import spec
from .errors import BackingChainError, FormatError, QcowError
from .hostfile import path_inside as _inside
from .hostfile import read_opener
from .names import protocol_prefix, validate_backing_name


def probe_format(path: str) -> str:
    """'qcow2' if the file starts with the qcow2 magic, else 'raw'."""
    try:
        with open(path, "rb", opener=read_opener) as f:
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
    """Backing file path as QEMU resolves it.

    A plain relative name is combined with the image's path as given, textually
    (qemu's path_combine(): the image path up to its last '/', then the name), and
    the kernel then resolves that through the file system (``link/..`` follows the
    link).  A name with a protocol prefix is used as it is: ``file:x`` is the file
    ``x`` relative to the *current directory* (qemu's file driver strips the
    prefix), every other protocol is not a local file.
    """
    proto = protocol_prefix(name)
    if proto is not None:
        if proto != "file":
            raise BackingChainError(image_path, f"backing file {name!r} is not a local file")
        return name[len("file:"):]
    if os.path.isabs(name):
        return name
    # ("top.qcow2" + "sub/b" -> "sub/b", not "./sub/b": info prints this path).
    return image_path[: image_path.rfind("/") + 1] + name


def host_path(path: str) -> str:
    """An absolute name for ``path`` that opens the same file (for libvirt XML).

    ``os.path.abspath`` removes ``..`` lexically, which is wrong after a symbolic
    link to a directory (the kernel goes up from the link's target).  Use the
    lexical form when it names the same file, else the resolved one.
    """
    joined = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    lexical = os.path.normpath(joined)
    if ".." not in joined.split("/"):
        return lexical  # only '.' and '//' were dropped: always the same file
    try:
        if os.path.samefile(lexical, joined):
            return lexical
    except OSError:
        pass
    directory, base = os.path.split(joined)
    return os.path.join(os.path.realpath(directory), base)




def backing_name(image_path: str, target_path: str, *, relative: bool = True) -> str:
    """The name to store in ``image_path``'s header so QEMU opens ``target_path``.

    Relative names are relative to the directory of ``image_path`` *as given*
    (QEMU combines them textually with the name it opened the image by) and are
    resolved by the kernel, so ``..`` after a symbolic link goes up from the
    link's target: the name is computed from resolved directories whenever the
    lexical one would name another file.  ``image_path`` may not exist yet (a
    rename target); its directory must.  The result is validated.
    """
    target_abs = host_path(target_path)
    if relative:
        img_dir = os.path.dirname(image_path if os.path.isabs(image_path)
                                  else os.path.join(os.getcwd(), image_path))
        name = os.path.relpath(target_abs, os.path.normpath(img_dir))
        if not _names_same(os.path.join(img_dir, name), target_abs):
            name = os.path.relpath(os.path.realpath(target_abs), os.path.realpath(img_dir))
        if protocol_prefix(name) is not None:
            name = "./" + name
    else:
        name = target_abs
    validate_backing_name(image_path, name)
    return name


def _names_same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normpath(a) == os.path.normpath(b) and ".." not in a.split("/")


def identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file ``path`` opens, or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def peek_header(path: str):
    """The qcow2 header of ``path`` read without opening the image (no lock, no
    validation beyond the header), or None for a missing, unreadable or raw file."""
    from .header import parse_header

    try:
        if probe_format(path) != "qcow2":
            return None
        with open(path, "rb") as f:
            head = f.read(1 << spec.MAX_CLUSTER_BITS)
        return parse_header(path, head, os.path.getsize(path))
    except (OSError, QcowError):
        return None


def header_chain(start: str, fmt: str | None = None, *, data_files: bool = False) -> list[str]:
    """The files of the chain ``start`` heads, read from the headers alone.

    No image is opened (so no lock is taken): this answers "which files would this
    touch" and "would this make a loop" before anything is opened read-write.  The
    walk stops quietly at a missing, unreadable or raw file, a repeated file and
    the depth limit (opening the chain reports those).  ``fmt``: the format of
    ``start`` if known (a raw file is never probed); ``data_files``: include each
    image's external data file after it.
    """
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    cur: str | None = start
    cur_fmt = fmt
    while cur is not None and len(out) <= spec.MAX_CHAIN_DEPTH:
        ident = identity(cur)
        if ident is None or ident in seen:
            break
        seen.add(ident)
        out.append(cur)
        h = peek_header(cur) if cur_fmt in (None, "qcow2") else None
        if h is None:
            break
        if data_files and h.has_data_file and h.data_file:
            name = h.data_file
            out.append(name if os.path.isabs(name) else os.path.join(os.path.dirname(cur), name))
        try:
            cur = resolve_backing(cur, h.backing_file) if h.backing_file else None
        except QcowError:
            break
        cur_fmt = h.backing_format or None
    return out


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
    seen = {identity(path)}
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
            ident = identity(bpath)
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
    if fmt == "qcow2":
        from .image import QcowImage

        return QcowImage(path, mode, force_share=force_share, data_root=root)
    if fmt == "raw":
        from .raw import RawImage  # (a module less to load for a qcow2 chain: start-up)

        return RawImage(path, mode, force_share=force_share)
    raise FormatError(path, f"unsupported image format {fmt!r}")


def chain_description(img) -> list[tuple[str, str]]:
    """[(absolute path, format), ...] from top to bottom."""
    return [(host_path(i.path), i.format) for i in img.chain]


# --- added by h-snap: moved from ops/common.py (pyqcow.newimage.create needs them
# and sits below ops)
def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def dependents(path: str, *, exclude: tuple[str, ...] = ()) -> list[str]:
    """qcow2 images in ``path``'s directory whose backing file is ``path``."""
    from .header import parse_header

    d = os.path.dirname(os.path.abspath(path)) or "."
    out = []
    try:
        names = os.listdir(d)
    except OSError:
        return out
    for name in sorted(names):
        p = os.path.join(d, name)
        if same_file(p, path) or any(same_file(p, e) for e in exclude) or not os.path.isfile(p):
            continue
        try:
            with open(p, "rb") as f:
                head = f.read(65536)
            if head[:4] != b"QFI\xfb":
                continue
            h = parse_header(p, head, os.path.getsize(p))
        except (OSError, QcowError):
            continue
        if h.backing_file and same_file(resolve_backing(p, h.backing_file), path):
            out.append(p)
    return out
