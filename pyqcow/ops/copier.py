"""The one copier: executes planned pieces into a destination image.

Data held at a known host offset (normal clusters, raw files) is copied file to
file by fastcopy (copy_file_range or the C helper) into host clusters that the
destination's writer allocated with ``prepare_write``; compressed data and
unaligned edges go through read + write.
"""

from __future__ import annotations

from .. import fastcopy
from ..entries import ClusterType
from .plan import Piece

CHUNK = 32 * 1024 * 1024


class Progress:
    def __init__(self, total: int, callback=None) -> None:
        self.total = total
        self.done = 0
        self.callback = callback

    def advance(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)


def _src_fd(layer) -> int:
    hf = getattr(layer, "data_hf", None) or layer.hf
    return hf.fd


def execute(pieces: list[Piece], dest, *, write_zero: bool = True, progress: Progress | None = None) -> int:
    """Copy ``pieces`` into ``dest``; returns the number of data bytes copied."""
    copied = 0
    for p in pieces:
        if p.kind == "below":
            continue
        if p.kind == "zero":
            if write_zero:
                dest.write_zeroes(p.guest_offset, p.length)
            continue
        pos = p.guest_offset
        while pos < p.end:
            n = min(CHUNK, p.end - pos)
            _copy_data(p, pos, n, dest)
            copied += n
            if progress is not None:
                progress.advance(n)
            pos += n
    return copied


def _copy_data(p: Piece, pos: int, n: int, dest) -> None:
    run = p.run
    layer = p.layer
    direct = run is not None and run.type == ClusterType.NORMAL and run.host_offset is not None
    if not direct:
        buf = bytearray(n)
        layer.readinto(buf, pos)
        dest.write(pos, buf)
        return
    src_fd = _src_fd(layer)
    src_base = run.host_offset + (pos - run.guest_offset)
    if dest.format == "raw":
        fastcopy.copy_range(src_fd, src_base, dest.hf.fd, pos, n)
        return
    cs = dest.cluster_size
    end = pos + n
    a = -(-pos // cs) * cs  # first cluster boundary at or after pos
    b = end // cs * cs
    if end == dest.virtual_size:
        b = end
    if a >= b:
        buf = bytearray(n)
        layer.readinto(buf, pos)
        dest.write(pos, buf)
        return
    if a > pos:
        buf = bytearray(a - pos)
        layer.readinto(buf, pos)
        dest.write(pos, buf)
    hosts = dest.prepare_write(a, b - a)
    runs = [(src_base + (g - pos), h, ln) for g, h, ln in hosts]
    fastcopy.copy_runs(src_fd, dest.data_hf.fd, runs)
    if end > b:
        buf = bytearray(end - b)
        layer.readinto(buf, b)
        dest.write(b, buf)
