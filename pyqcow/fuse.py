"""A read-only FUSE file system over an image: ``pyqcow mount`` (pyqcow/cli/mount.py).

Layout of the mount::

    disk.raw                  the guest disk, read through the backing chain
    snapshots/NAME.raw        (--snapshots) each internal snapshot's guest disk
    layers/N-FILENAME.raw     (--layers) layer N of the chain alone (0 = the
                              image given, N+1 its backing file): that layer's
                              own data, zeros where it allocates nothing

Every file is read-only (mode 0444, directories 0555); opening one for writing
fails with EROFS, and nothing is ever written to the image.  The images are
opened read-only with QEMU's shared read lock (unless force_share) and with
O_NOATIME, so the evidence keeps its access and modification times.  The times
shown are the image file's.  Reads from several processes or threads are
all served, one request at a time: libfuse's single-threaded loop (the
engine runs under the GIL anyway, and threads cost more in switching than they
gain; see tools/bench read).  pyqcow mount uses FUSE direct_io unless asked for
the page cache.

Needs ``mfusepy`` (the ``pyqcow[fuse]`` extra) and libfuse 3 (Debian: fuse3).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass

from . import libyal_methods
from .errors import OperationError

__all__ = ["ImageFS", "build_tree", "load_mfusepy"]


def load_mfusepy():
    """The mfusepy module, or OperationError saying what to install."""
    try:
        import mfusepy
    except ImportError as e:
        raise OperationError(
            None, f"pyqcow mount needs mfusepy: pip install 'pyqcow[fuse]' ({e})"
        ) from None
    except OSError as e:  # mfusepy raises OSError when libfuse is missing
        raise OperationError(
            None, f"pyqcow mount needs libfuse 3 (Debian: apt-get install fuse3): {e}"
        ) from None
    return mfusepy


@dataclass
class Node:
    """One file of the mount: ``source`` has virtual_size and read(offset, length)."""

    source: object
    size: int


def _safe_name(name: str) -> str:
    """A snapshot or file name usable as one path component."""
    name = name.replace("/", "_").replace("\0", "_")
    return name if name not in ("", ".", "..") else f"_{name}_"


def build_tree(image, layer_images=(), snapshots: bool = False) -> dict[str, Node | None]:
    """{path: Node} for files and {path: None} for directories.

    ``layer_images``: each layer of the chain opened alone (no backing), top first.
    """
    tree: dict[str, Node | None] = {"/": None, "/disk.raw": Node(image, image.virtual_size)}
    if snapshots:
        tree["/snapshots"] = None
        if image.format == "qcow2":
            infos = image.snapshots
            names = [_safe_name(s.name or s.id_str) for s in infos]
            for info, name in zip(infos, names, strict=True):
                if names.count(name) > 1:  # two snapshots with one name: add the ID
                    name = f"{name}@{info.id_str}"
                view = image.snapshot(info.id_str)
                tree[f"/snapshots/{name}.raw"] = Node(view, view.virtual_size)
    if layer_images:
        tree["/layers"] = None
        for i, layer in enumerate(layer_images):
            base = _safe_name(os.path.basename(layer.path))
            tree[f"/layers/{i}-{base}.raw"] = Node(layer, layer.virtual_size)
    return tree


class ImageFS:
    """mfusepy operations (duck-typed: mfusepy looks the methods up by name)."""

    use_ns = True  # times in nanoseconds

    def __init__(self, tree: dict[str, Node | None], times: os.stat_result) -> None:
        self.tree = tree
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._times = {
            "st_atime": times.st_atime_ns,
            "st_mtime": times.st_mtime_ns,
            "st_ctime": times.st_ctime_ns,
        }
        self._lock = threading.Lock()
        self._children: dict[str, list[str]] = {}
        for path in tree:
            if path == "/":
                continue
            parent, _, name = path.rpartition("/")
            self._children.setdefault(parent or "/", []).append(name)

    def _node(self, path: str):
        try:
            return self.tree[path]
        except KeyError:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None

    # -- metadata --------------------------------------------------------------------
    def getattr(self, path: str, fh=None) -> dict:
        node = self._node(path)
        attrs = dict(self._times, st_uid=self.uid, st_gid=self.gid)
        if node is None:
            attrs.update(st_mode=stat.S_IFDIR | 0o555,
                         st_nlink=2 + sum(1 for c in self._children.get(path, ())
                                          if self.tree.get(f"{path.rstrip('/')}/{c}") is None))
        else:
            attrs.update(st_mode=stat.S_IFREG | 0o444, st_nlink=1, st_size=node.size,
                         st_blocks=(node.size + 511) // 512)
        return attrs

    def readdir(self, path: str, fh):
        if self._node(path) is not None:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        return [".", "..", *self._children.get(path, [])]

    def statfs(self, path: str) -> dict:
        total = sum(n.size for n in self.tree.values() if n is not None)
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": (total + 4095) // 4096,
                "f_bfree": 0, "f_bavail": 0, "f_files": len(self.tree), "f_ffree": 0,
                "f_namemax": 255}

    # -- data ------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        node = self._node(path)
        if node is None:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return 0

    def read(self, path: str, size: int, offset: int, fh) -> bytes:
        node = self._node(path)
        if node is None:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        n = min(size, node.size - offset)
        if n <= 0:
            return b""
        src = node.source
        try:
            with self._lock:
                if n <= 65536:
                    return src.read(offset, n)
                return libyal_methods._fill_bytes(n, lambda view: src.readinto(view, offset))
        except Exception as e:  # a corrupt image: the reader gets EIO, the mount lives on
            raise OSError(errno.EIO, f"{e}") from e

    def access(self, path: str, amode: int) -> int:
        self._node(path)
        if amode & os.W_OK:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return 0
