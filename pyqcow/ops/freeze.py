"""Freeze an image under another name while it keeps its own (the seed's third option).

``pyqcow create --freeze-to FROZEN IMAGE`` and ``pyqcow domain snapshot --keep-name``:
IMAGE's content moves to FROZEN and IMAGE becomes an empty qcow2 overlay over it,
so every reference to IMAGE (a domain's ``<source>``, AppArmor profiles, backup
configurations, pool volumes) stays as it is.
"""

from __future__ import annotations

import os

from ..chain import host_path, open_image
from ..errors import OperationError


def freeze(image: str, frozen: str) -> None:
    """``create --freeze-to FROZEN IMAGE``: IMAGE keeps its name and its content moves
    to FROZEN; IMAGE becomes an empty qcow2 overlay over FROZEN.

    Crash-safe: at every instant IMAGE reads the same content.  The overlay is
    made at a temporary name, FROZEN is made a hard link of IMAGE, then the
    overlay is renamed over IMAGE.  QEMU's write lock on IMAGE is held throughout.
    """
    from ..hostfile import fsync_dir
    from ..newimage import create as create_image
    from .merge import _take_mode

    image, frozen = host_path(image), host_path(frozen)
    if os.path.lexists(frozen):
        raise OperationError(frozen, "already exists; refusing to overwrite it")
    if os.path.dirname(frozen) != os.path.dirname(image):
        st_i, st_f = os.stat(os.path.dirname(image)), os.stat(os.path.dirname(frozen) or ".")
        if st_i.st_dev != st_f.st_dev:
            raise OperationError(frozen, f"is on another file system than {image}; the frozen "
                                         "file is a hard link of the image")
    with open_image(image, "r+", backing=False) as held:
        if held.format != "qcow2" and held.format != "raw":  # pragma: no cover
            raise OperationError(image, "not a qcow2 or raw image")
        fmt = held.format
        size = held.virtual_size
        tmp = os.path.join(os.path.dirname(image), f".{os.path.basename(image)}.pyqcow-freeze")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        name = os.path.relpath(frozen, os.path.dirname(image))
        create_image(tmp, size, backing=name, backing_format=fmt, unsafe=True)
        try:
            with open_image(tmp, "r+", backing=False) as ov:
                _take_mode(src_name=image, file=ov)
            os.link(image, frozen)
            fsync_dir(frozen)
            os.replace(tmp, image)
            fsync_dir(image)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise


__all__ = ["freeze"]
