"""Plan chain operations as data: which guest ranges come from which layer.

A ``Piece`` says what the chain from some image down to (but excluding) a base
shows over a guest range: ``data`` held by ``layer`` (with the layer's Run),
``zero`` (a zero cluster, or past the end of a shorter backing file), or
``below`` (nothing above the base allocates it: it reads from the base).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..mapping import UNALLOCATED_TYPES, ZERO_TYPES, Run


@dataclass(slots=True)
class Piece:
    guest_offset: int
    length: int
    kind: str  # "data" | "zero" | "below"
    layer: object | None = None
    run: Run | None = None

    @property
    def end(self) -> int:
        return self.guest_offset + self.length


def _add(out: list[Piece], p: Piece) -> None:
    if p.length <= 0:
        return
    if out and p.kind in ("zero", "below") and out[-1].kind == p.kind and out[-1].end == p.guest_offset:
        out[-1].length += p.length
        return
    out.append(p)


def pieces_above(img, base, start: int, length: int) -> list[Piece]:
    """What the chain ``img`` .. (excluding ``base``) shows over [start, start+length)."""
    out: list[Piece] = []
    _walk(img, base, start, length, out)
    return out


def _walk(img, base, start: int, length: int, out: list[Piece]) -> None:
    if img is base:
        _add(out, Piece(start, length, "below"))
        return
    inside = max(0, min(length, img.virtual_size - start))
    if inside:
        for run in img.runs(start, inside):
            t = run.type
            if t in UNALLOCATED_TYPES:
                if img.backing is None:
                    _add(out, Piece(run.guest_offset, run.length, "zero"))
                elif img.backing is base:
                    _below(base, run.guest_offset, run.length, out)
                else:
                    _walk(img.backing, base, run.guest_offset, run.length, out)
            elif t in ZERO_TYPES:
                _add(out, Piece(run.guest_offset, run.length, "zero", img, run))
            else:
                _add(out, Piece(run.guest_offset, run.length, "data", img, run))
    if inside < length:
        _add(out, Piece(start + inside, length - inside, "zero"))


def _below(base, start: int, length: int, out: list[Piece]) -> None:
    inside = max(0, min(length, base.virtual_size - start))
    if inside:
        _add(out, Piece(start, inside, "below"))
    if inside < length:
        _add(out, Piece(start + inside, length - inside, "zero"))


def unallocated_ranges(img, start: int = 0, length: int | None = None) -> list[tuple[int, int]]:
    if length is None:
        length = img.virtual_size - start
    out: list[tuple[int, int]] = []
    for r in img.runs(start, length):
        if r.type in UNALLOCATED_TYPES:
            if out and out[-1][0] + out[-1][1] == r.guest_offset:
                out[-1] = (out[-1][0], out[-1][1] + r.length)
            else:
                out.append((r.guest_offset, r.length))
    return out


def data_bytes(pieces: list[Piece]) -> int:
    return sum(p.length for p in pieces if p.kind == "data")


def data_bytes_within(pieces: list[Piece], ranges: list[tuple[int, int]]) -> int:
    """Data bytes of ``pieces`` inside ``ranges`` (both sorted by guest offset)."""
    total = 0
    j = 0
    for p in pieces:
        if p.kind != "data":
            continue
        start, end = p.guest_offset, p.end
        while j < len(ranges) and ranges[j][0] + ranges[j][1] <= start:
            j += 1
        k = j
        while k < len(ranges) and ranges[k][0] < end:
            r0, r1 = ranges[k][0], ranges[k][0] + ranges[k][1]
            total += min(end, r1) - max(start, r0)
            k += 1
    return total
