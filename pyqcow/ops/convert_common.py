"""What every convert output shares: the copy options, the source/destination
guard and the source's page cache after the copy."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import OperationError
from .plan import data_fds

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ConvertOptions:
    """qemu-img convert's copy options (the CLI's -n, --target-is-zero, -S, -m, -W)."""

    existing: bool = False  # -n: write into DST as it is (no create, no truncate)
    target_is_zero: bool = False  # --target-is-zero: DST reads as zeros: skip zero ranges
    sparse_size: int = 4096  # -S: 0 writes every byte (fully allocated output)
    coroutines: int = 1  # -m: copy streams (threads) working at once
    out_of_order: bool = False  # -W: writes may complete in any order
    bitmaps: bool = False  # --bitmaps: copy the source's persistent bitmaps (qcow2 output)


DEFAULT_OPTIONS = ConvertOptions()


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def refuse_source_as_destination(img, dst: str) -> None:
    for layer in img.chain:
        for hf in {id(h): h for h in (layer.hf, getattr(layer, "data_hf", layer.hf))}.values():
            if _same_file(hf.fd, dst):
                raise OperationError(dst, f"destination is the source image file {hf.path}")


def drop_source_cache(img) -> None:
    """-T none/directsync: the source's pages leave the page cache after the copy."""
    from ..hostfile import cache_mode

    if cache_mode(source=True) not in ("none", "directsync"):
        return
    for fd in data_fds(img).values():
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass
