"""Mutations of valid qcow2 files: bit flips and field overwrites aimed at the
header and the metadata tables, byte splices and truncation.

``mutations(data)`` is a shrinkable strategy of mutation lists for the bytes of
one image, ``apply_mutations(data, muts)`` applies them.  A mutated image may
or may not still be valid; :func:`pyqcow.testing.invalid_images` gives images
that are invalid for a known, labelled reason.  pyqcow's fuzzing
(tests/property/test_fuzz.py) uses these.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

__all__ = ["HEADER_FIELDS", "INTERESTING", "apply_mutations", "mutation", "mutations",
           "regions"]

HEADER_FIELDS = [  # (offset, width) of every qcow2 header field
    (0, 4), (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8),
    (56, 4), (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1),
]

INTERESTING = [0, 1, 2, 7, 8, 9, 15, 16, 21, 22, 31, 32, 63, 64, 0x7F, 0x80, 0xFF, 0x100, 0x1FF,
               0x200, 0xFFFF, 0x10000, 0x200000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32,
               1 << 40, 1 << 56, 1 << 61, 1 << 62, 1 << 63, (1 << 64) - 1, (1 << 63) - 512]


def regions(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the metadata areas of a valid image: cluster 0, the L1
    table, the first L2 tables, the refcount table and its first block, the
    snapshot table and the first snapshot's L1."""
    cb = struct.unpack_from(">I", data, 20)[0]
    cs = 1 << cb
    out = [(0, min(cs, len(data)))]

    def add(off, n):
        if 0 < off < len(data):
            out.append((off, min(n, len(data) - off)))

    l1_size, l1_off = struct.unpack_from(">IQ", data, 36)
    add(l1_off, l1_size * 8)
    for i in range(min(l1_size, 4)):
        if l1_off + 8 * i + 8 <= len(data):
            e = struct.unpack_from(">Q", data, l1_off + 8 * i)[0] & 0x00FFFFFFFFFFFE00
            add(e, cs)
    rt_off = struct.unpack_from(">Q", data, 48)[0]
    add(rt_off, cs)
    if rt_off and rt_off + 8 <= len(data):
        add(struct.unpack_from(">Q", data, rt_off)[0] & ~0x1FF, cs)
    nb_snap, snap_off = struct.unpack_from(">IQ", data, 60)
    if nb_snap:
        add(snap_off, 1024)
        if snap_off + 12 <= len(data):
            sl1_off, sl1_size = struct.unpack_from(">QI", data, snap_off)
            add(sl1_off, sl1_size * 8)
    return out


@st.composite
def mutation(draw, data: bytes, regions: list[tuple[int, int]]):
    """One mutation of ``data``: ("truncate", n), ("flip", offset, bit),
    ("set", offset, width, value) or ("bytes", offset, raw)."""
    kind = draw(st.sampled_from(["flip", "flip", "field", "field", "word", "truncate", "bytes"]))
    if kind == "truncate":
        return ("truncate", draw(st.integers(0, len(data))))
    if kind == "field":
        off, width = draw(st.sampled_from(HEADER_FIELDS))
        return ("set", off, width, draw(st.sampled_from(INTERESTING)) & ((1 << (8 * width)) - 1))
    start, length = draw(st.sampled_from(regions))
    length = max(1, length)
    if kind == "flip":
        return ("flip", start + draw(st.integers(0, length - 1)), draw(st.integers(0, 7)))
    if kind == "word":  # an aligned table entry
        slot = draw(st.integers(0, max(0, length // 8 - 1)))
        value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << 64) - 1),
                               st.sampled_from([len(data), len(data) - 512, len(data) + 4096])))
        return ("set", start + 8 * slot, 8, value & ((1 << 64) - 1))
    off = start + draw(st.integers(0, length - 1))
    return ("bytes", off, draw(st.binary(min_size=1, max_size=16)))


def mutations(data: bytes, *, min_size: int = 1, max_size: int = 4):
    """Lists of mutations of the image bytes ``data`` (shrink to fewer, simpler ones)."""
    return st.lists(mutation(data, regions(data)), min_size=min_size, max_size=max_size)


def apply_mutations(data: bytes, muts) -> bytes:
    buf = bytearray(data)
    for m in muts:
        if m[0] == "truncate":
            del buf[m[1]:]
        elif m[0] == "flip":
            if m[1] < len(buf):
                buf[m[1]] ^= 1 << m[2]
        elif m[0] == "set":
            _, off, width, value = m
            if off + width <= len(buf):
                buf[off : off + width] = value.to_bytes(width, "big")
        else:
            _, off, raw = m
            buf[off : off + len(raw)] = raw
    return bytes(buf)
