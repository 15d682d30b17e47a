"""stream: pull into TOP every range it does not allocate from the images above BASE.

Crash safety: TOP is only written where it allocates nothing, with exactly the
data its chain shows there, so TOP reads the same guest data at every instant;
the backing pointer is switched last, in one header write.
"""

from __future__ import annotations

from ..record import Record
from . import copier
from .common import backing_name_for, find_layer, open_chain
from .plan import Piece, data_bytes, pieces_above, unallocated_ranges


class StreamResult(Record):
    """top (path), new_backing (None: none), bytes_copied."""

    __slots__ = ("top", "new_backing", "bytes_copied")


def plan_stream(top, base) -> list[Piece]:
    """What the backing chain (down to ``base``) shows where ``top`` allocates
    nothing: one walk of the chain, clipped to top's unallocated ranges."""
    pieces: list[Piece] = []
    if top.backing is None:
        return pieces
    ranges = unallocated_ranges(top)
    if not ranges:
        return pieces
    first, last = ranges[0][0], ranges[-1][0] + ranges[-1][1]
    whole = pieces_above(top.backing, base, first, last - first)
    j = 0
    for p in whole:
        while j < len(ranges) and ranges[j][0] + ranges[j][1] <= p.guest_offset:
            j += 1
        k = j
        while k < len(ranges) and ranges[k][0] < p.end:
            a, b = max(p.guest_offset, ranges[k][0]), min(p.end, ranges[k][0] + ranges[k][1])
            pieces.append(p if (a, b) == (p.guest_offset, p.end)
                          else Piece(a, b - a, p.kind, p.layer, p.run))
            k += 1
    return pieces


def stream_bytes(top, base) -> int:
    """What :func:`plan_stream` would copy, from one walk of the backing chain (the
    cost alone: no per-range walks, no pieces kept)."""
    if top.backing is None:
        return 0
    from .plan import data_bytes_within

    whole = pieces_above(top.backing, base, 0, top.virtual_size)
    return data_bytes_within(whole, unallocated_ranges(top))


def stream(top_path, base=None, *, progress=None, backing_name: str | None = None,
           _top=None) -> StreamResult:
    """Pull backing data into TOP; afterwards TOP's backing is BASE (or nothing).

    ``_top``: a chain the caller opened (TOP read-write) and closes itself.
    """
    top = _top if _top is not None else open_chain(top_path, "r+")
    try:
        if top.backing is None:
            return StreamResult(top.path, None, 0)
        base_img = None
        parent = None
        if base is not None:
            parent, base_img = find_layer(top, base)
        pieces = plan_stream(top, base_img)
        prog = copier.Progress(data_bytes(pieces), progress)
        copied = copier.execute(pieces, top, write_zero=base_img is not None, progress=prog)
        top.flush()
        if base_img is None:
            top.set_backing(None, None)
            return StreamResult(top.path, None, copied)
        if backing_name is None:
            backing_name = backing_name_for(top.path, base_img.path, parent.header.backing_file)
        top.set_backing(backing_name, base_img.format)
        return StreamResult(top.path, backing_name, copied)
    finally:
        if _top is None:
            top.close()
