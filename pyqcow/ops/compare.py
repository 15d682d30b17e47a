"""compare: are two images' guest views identical?  (qemu-img.c ``img_compare``)

The walk follows qemu-img's: both chains' block status side by side; ranges
that read as zeros in both are skipped, ranges allocated in both are compared
byte for byte, a range allocated in only one must read as zeros there.  In
strict mode a size difference or a block-status difference counts as a
difference.  Without it, the tail of the larger image must read as zeros.
Mismatch offsets are reported at 512-byte granularity, as qemu-img does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..mapping import Extent, chain_status

__all__ = ["CompareResult", "compare_images"]

IO_BUF_SIZE = 2 * 1024 * 1024  # qemu-img.c
SECTOR = 512


@dataclass(frozen=True)
class CompareResult:
    identical: bool
    message: str  # what qemu-img prints on stdout ("Images are identical." ...)
    offset: int | None = None  # first differing offset, if content differs
    size_mismatch: bool = False  # the two virtual sizes differ
    warned: bool = False  # qemu-img printed "Warning: Image size mismatch!" first

    @property
    def lines(self) -> list[str]:
        """The lines qemu-img compare prints on stdout."""
        return (["Warning: Image size mismatch!"] if self.warned else []) + [self.message]


class _Status:
    """Block status lookups over one image's merged extents, walked forward."""

    def __init__(self, img) -> None:
        self.img = img
        self.extents: list[Extent] = chain_status(img)
        self.i = 0

    def at(self, offset: int) -> Extent:
        ex = self.extents
        while self.i < len(ex) and ex[self.i].start + ex[self.i].length <= offset:
            self.i += 1
        return ex[self.i]


def _key(st: _Status, e: Extent, offset: int) -> tuple:
    """The block-status bits qemu compares in strict mode (approximately).

    Besides allocation, zero, data and offset-valid, qemu's status carries an
    EOF bit when the status query reached the end of the image; a qcow2 query
    covers at most one 4 KiB L2-table slice, so only offsets in the last slice
    can see it.
    """
    img = st.img
    eof = e.start + e.length == img.virtual_size
    if eof and img.format == "qcow2":
        entry = 16 if img.extended_l2 else 8
        span = (min(img.cluster_size, 4096) // entry) * img.cluster_size
        eof = offset >= (img.virtual_size - 1) // span * span
    return (e.present, e.zero, e.data, e.offset is not None, eof)


def _first_diff(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    n = min(len(a), len(b))
    lo = 0
    # binary search for the first differing byte on C-speed slice comparisons
    hi = n
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return n


def _first_nonzero(buf: bytes) -> int | None:
    stripped = buf.lstrip(b"\0")
    if not stripped:
        return None
    return len(buf) - len(stripped)


def compare_images(
    a, b, strict: bool = False, progress: Callable[[int, int], None] | None = None
) -> CompareResult:
    """Compare the guest views of open images ``a`` and ``b`` like ``qemu-img compare``."""
    size_a, size_b = a.virtual_size, b.virtual_size
    total = min(size_a, size_b)
    progress_base = max(size_a, size_b)
    if strict and size_a != size_b:
        return CompareResult(False, "Strict mode: Image size mismatch!", size_mismatch=True)
    mismatch = size_a != size_b

    def differ(offset: int, warned: bool = False) -> CompareResult:
        return CompareResult(
            False, f"Content mismatch at offset {offset}!", offset, mismatch, warned
        )

    sa, sb = _Status(a), _Status(b)
    offset = 0
    while offset < total:
        ea, eb = sa.at(offset), sb.at(offset)
        chunk = min(ea.start + ea.length, eb.start + eb.length, total) - offset
        if strict and _key(sa, ea, offset) != _key(sb, eb, offset):
            return CompareResult(
                False, f"Strict mode: Offset {offset} block status mismatch!", offset
            )
        if ea.zero and eb.zero:
            pass
        elif ea.present == eb.present:
            if ea.present:
                chunk = min(chunk, IO_BUF_SIZE)
                i = _first_diff(a.read(offset, chunk), b.read(offset, chunk))
                if i is not None:
                    return differ(offset + i // SECTOR * SECTOR)
        else:
            chunk = min(chunk, IO_BUF_SIZE)
            img = a if ea.present else b
            i = _first_nonzero(img.read(offset, chunk))
            if i is not None:
                return differ(offset + i // SECTOR * SECTOR)
        offset += chunk
        if progress:
            progress(offset, progress_base)

    if mismatch:
        over, st = (a, sa) if size_a > size_b else (b, sb)
        while offset < progress_base:
            e = st.at(offset)
            chunk = e.start + e.length - offset
            if e.present and not e.zero:
                chunk = min(chunk, IO_BUF_SIZE)
                i = _first_nonzero(over.read(offset, chunk))
                if i is not None:
                    return differ(offset + i // SECTOR * SECTOR, warned=True)
            offset += chunk
            if progress:
                progress(offset, progress_base)
    return CompareResult(True, "Images are identical.", None, mismatch, mismatch)
