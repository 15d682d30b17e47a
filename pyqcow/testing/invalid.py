"""``invalid_images()``: qcow2 files a correct reader must refuse, each labelled with
the rule it breaks.

A valid image is generated (:func:`pyqcow.testing.images`, at least one data
cluster written), then one rule is broken in its bytes.  Every rule here is one
qemu-img itself refuses the image for (pyqcow's own tests check that, rule by
rule): ``detected`` says where:

* ``"open"``: the header or a table's placement breaks a rule or one of QEMU's
  sanity limits; a reader must refuse to open the image;
* ``"read"``: a table entry is broken; a reader must refuse to read the guest
  range it maps (``.bad_range``) and everything else may read as usual;
* ``"check"``: the metadata overlap or loop, or an entry QEMU still reads
  (reserved bits it masks off, data past the end of the file it reads as
  zeros); ``qemu-img check`` reports it.  A reader may refuse or read as QEMU
  does, and must not hang, crash or blow its memory bound.

Use it with :func:`pyqcow.testing.run_bounded` so a reader that hangs on one of
them fails the example instead of the whole run::

    @given(bad=invalid_images())
    def test_refuses(bad):
        r = run_bounded(myreader.read_all, bad.path, timeout=5, raise_errors=False)
        assert r.kind == "exception", f"{bad.rule}: {bad.description}: {r}"
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from hypothesis import strategies as st

from .. import entries
from ..entries import ClusterType
from . import _files
from .imagegen import GeneratedImage, _short, images
from .params import have_qemu, image_params

__all__ = ["RULES", "InvalidImage", "invalid_images"]


@dataclass(repr=False)
class InvalidImage:
    """An image that breaks ``rule`` (see :data:`RULES`).

    ``path``: the broken file.  ``description``: what was changed, in words.
    ``detected``: ``open``, ``read`` or ``check`` (see the module doc).
    ``bad_range``: for ``read`` rules, the guest (offset, length) the broken
    entry maps.  ``valid``: the image it was made from (its ``.expected`` is
    still right outside ``bad_range``).  ``patches``: the (offset, bytes)
    written into the valid file.
    """

    path: str
    rule: str
    description: str
    detected: str
    valid: GeneratedImage
    patches: list[tuple[int, bytes]] = field(default_factory=list)
    truncate: int | None = None
    bad_range: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return (f"InvalidImage(rule={self.rule!r}, description={self.description!r}, "
                f"detected={self.detected!r}, path={self.path!r}, bad_range={self.bad_range!r}, "
                f"valid params={self.valid.params!r}, expected={_short(self.valid.expected)})")

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(repr(self))

    def reproduce(self) -> str:
        """Shell script: rebuild the valid image, then break it the same way."""
        p = self.valid.params
        exact = p.creator == "qemu-img" and (p.writer == "qemu-io" or not self.valid.ops)
        lines = [self.valid.reproduce().rstrip("\n").rsplit("\nqemu-img convert", 1)[0],
                 f"# break rule {self.rule}: {self.description}"]
        if not exact:
            lines.append("# NOTE: the original was made by pyqcow: the offsets below are "
                         "those of its layout, which qemu's may not share")
        lines += [f"cp {os.path.basename(self.valid.path)} {os.path.basename(self.path)}",
                  "python3 - <<'PYQCOW_EOF'",
                  f"f = open({os.path.basename(self.path)!r}, 'r+b')"]
        for off, data in self.patches:
            lines += [f"f.seek({off})", f"f.write({data!r})"]
        if self.truncate is not None:
            lines.append(f"f.truncate({self.truncate})")
        lines += ["f.close()", "PYQCOW_EOF"]
        return "\n".join(lines) + "\n"

    @property
    def directory(self) -> str:
        return self.valid.directory

    def cleanup(self) -> None:
        self.valid.cleanup()


class _Img:
    """The fields of a valid image needed to break it."""

    def __init__(self, data: bytes):
        self.data = data
        (self.version, self.bf_off, self.bf_len, self.cluster_bits, self.size, _crypt,
         self.l1_size, self.l1_off, self.rt_off, self.rt_clusters, self.nb_snap,
         self.snap_off) = struct.unpack_from(">IQIIQIIQQIIQ", data, 4)
        self.cs = 1 << self.cluster_bits
        self.hlen = struct.unpack_from(">I", data, 100)[0] if self.version >= 3 else 72
        self.ext_l2 = self.version >= 3 and bool(struct.unpack_from(">Q", data, 72)[0] & 16)
        self.entry = 16 if self.ext_l2 else 8
        self.l2 = []  # (l1 index, l2 offset) of allocated L2 tables
        for i in range(self.l1_size):
            e = entries.l1_l2_offset(struct.unpack_from(">Q", data, self.l1_off + 8 * i)[0])
            if e:
                self.l2.append((i, e))

    def data_entries(self):
        """(guest offset, file offset of the L2 entry, entry) of normal data clusters."""
        per_l2 = self.cs // self.entry
        out = []
        for i, l2 in self.l2:
            for j in range(per_l2):
                pos = l2 + j * self.entry
                e = struct.unpack_from(">Q", self.data, pos)[0]
                if entries.l2_type(e) in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                    out.append(((i * per_l2 + j) * self.cs, pos, e))
        return out


def _q(v: int) -> bytes:
    return struct.pack(">Q", v)


def _u32(v: int) -> bytes:
    return struct.pack(">I", v)


# Each rule: name -> (detected, function(img: _Img, choice: int) -> (description, patches,
# truncate, bad_range) or None when this image cannot break it)
def _bad_magic(m, c):
    return "magic is not QFI\\xfb", [(0, b"QFI\xfa")], None, None


def _bad_version(m, c):
    v = (1, 4, 0xFFFFFFFF)[c % 3]
    return f"version {v} (only 2 and 3 exist)", [(4, _u32(v))], None, None


def _cluster_bits(m, c):
    v = (8, 22, 63)[c % 3]
    return f"cluster_bits {v} (QEMU: 9..21)", [(20, _u32(v))], None, None


def _l1_too_large(m, c):
    v = 0x2000001  # QEMU_MAX_L1_SIZE / 8 = 0x400000 entries... far over it
    return f"l1_size {v:#x} (over QEMU's 32 MiB L1 limit)", [(36, _u32(v))], None, None


def _l1_too_small(m, c):
    return (f"l1_size 0 for a {m.size}-byte disk (too small)", [(36, _u32(0))], None, None)


def _refcount_order(m, c):
    if m.version < 3:
        return None
    v = (7, 8, 255)[c % 3]
    return f"refcount_order {v} (at most 6)", [(96, _u32(v))], None, None


def _header_length(m, c):
    if m.version < 3:
        return None
    v = (72, 100)[c % 2]
    return f"header_length {v} (v3: at least 104, a multiple of 8)", [(100, _u32(v))], None, None


def _unknown_incompat(m, c):
    if m.version < 3:
        return None
    bit = (5, 31, 63)[c % 3]
    v = struct.unpack_from(">Q", m.data, 72)[0] | (1 << bit)
    return f"unknown incompatible feature bit {bit}", [(72, _q(v))], None, None


def _l1_unaligned(m, c):
    return ("L1 table offset not cluster aligned", [(40, _q(m.l1_off + 512))], None, None)


def _rt_unaligned(m, c):
    return ("refcount table offset not cluster aligned", [(48, _q(m.rt_off + 512))], None, None)


def _rt_too_large(m, c):
    v = 0x10000001
    return (f"refcount_table_clusters {v:#x} (over QEMU's 8 MiB limit)", [(56, _u32(v))],
            None, None)


def _too_many_snapshots(m, c):
    v = 65537
    return (f"nb_snapshots {v} (QEMU allows 65536)", [(60, _u32(v)), (64, _q(m.cs))], None, None)


def _backing_offset(m, c):
    return ("backing file name outside cluster 0",
            [(8, _q(m.cs + 8)), (16, _u32(8))], None, None)


def _backing_too_long(m, c):
    return ("backing file name of 2000 bytes (QEMU: at most 1023)",
            [(8, _q(m.hlen + 8)), (16, _u32(2000))], None, None)


def _extension_too_large(m, c):
    pos = m.hlen  # the first extension (the end marker at least)
    return ("header extension longer than cluster 0",
            [(pos, _u32(0xE2792ACA) + _u32(m.cs))], None, None)


def _l1_entry_unaligned(m, c):
    if not m.l2:
        return None
    i, l2 = m.l2[0]
    e = struct.unpack_from(">Q", m.data, m.l1_off + 8 * i)[0]
    span = m.cs * (m.cs // m.entry)
    return (f"L1 entry {i}: L2 table offset {l2 + 512:#x} not cluster aligned",
            [(m.l1_off + 8 * i, _q(e + 512))], None, (i * span, min(span, m.size - i * span)))


def _l2_entry_unaligned(m, c):
    ents = m.data_entries()
    if not ents:
        return None
    g, pos, e = ents[c % len(ents)]
    return (f"L2 entry for guest {g:#x}: data offset {entries.l2_host_offset(e) + 512:#x} not "
            "cluster aligned", [(pos, _q(e + 512))], None, (g, min(m.cs, m.size - g)))


def _l2_entry_reserved(m, c):
    ents = m.data_entries()
    if not ents:
        return None
    g, pos, e = ents[c % len(ents)]
    bit = 1 + c % 8
    return (f"L2 entry for guest {g:#x}: reserved bit {bit} set",
            [(pos, _q(e | (1 << bit)))], None, (g, min(m.cs, m.size - g)))


def _l2_past_eof(m, c):
    ents = m.data_entries()
    if not ents:
        return None
    g, pos, e = ents[c % len(ents)]
    far = (len(m.data) + (16 << 20)) & ~(m.cs - 1)
    return (f"L2 entry for guest {g:#x} points past the end of the file ({far:#x})",
            [(pos, _q(entries.l2_with_host_offset(e, far)))], None, (g, min(m.cs, m.size - g)))


def _l2_into_header(m, c):
    ents = m.data_entries()
    if not ents:
        return None
    g, pos, e = ents[c % len(ents)]
    return (f"L2 entry for guest {g:#x} points at the L1 table (data overlaps metadata)",
            [(pos, _q(entries.l2_with_host_offset(e, m.l1_off & ~(m.cs - 1))))], None, None)


def _l1_overlaps_rt(m, c):
    return ("L1 table placed on the refcount table (overlapping metadata)",
            [(40, _q(m.rt_off))], None, None)


def _refcount_loop(m, c):
    # the refcount table's first entry points at the refcount table itself
    return ("refcount table entry 0 points at the refcount table (a loop)",
            [(m.rt_off, _q(m.rt_off))], None, None)


RULES: dict[str, tuple[str, object]] = {
    "bad-magic": ("open", _bad_magic),
    "version": ("open", _bad_version),
    "cluster-bits": ("open", _cluster_bits),
    "l1-size-limit": ("open", _l1_too_large),
    "l1-too-small": ("open", _l1_too_small),
    "refcount-order": ("open", _refcount_order),
    "header-length": ("open", _header_length),
    "unknown-incompatible-bit": ("open", _unknown_incompat),
    "l1-offset-unaligned": ("open", _l1_unaligned),
    "refcount-table-unaligned": ("open", _rt_unaligned),
    "refcount-table-limit": ("open", _rt_too_large),
    "snapshot-count-limit": ("open", _too_many_snapshots),
    "backing-name-offset": ("open", _backing_offset),
    "backing-name-length": ("open", _backing_too_long),
    "extension-too-large": ("open", _extension_too_large),
    "l1-entry-unaligned": ("read", _l1_entry_unaligned),
    "l2-entry-unaligned": ("read", _l2_entry_unaligned),
    # QEMU reads these (zeros past EOF; the reserved bits masked off), its check flags them
    "l2-entry-reserved-bits": ("check", _l2_entry_reserved),
    "l2-entry-past-eof": ("check", _l2_past_eof),
    "data-overlaps-metadata": ("check", _l2_into_header),
    "l1-overlaps-refcount-table": ("check", _l1_overlaps_rt),
    "refcount-table-loop": ("check", _refcount_loop),
}


V3_ONLY = {"refcount-order", "header-length", "unknown-incompatible-bit"}


def invalid_images(
    *,
    rules: list[str] | tuple[str, ...] | None = None,
    params=None,
    directory: str | os.PathLike | None = None,
) -> st.SearchStrategy[InvalidImage]:
    """Images that break one rule each (see :data:`RULES` and the module doc).

    ``rules``: the rule names to draw from (default: all).  ``params``: an
    :func:`pyqcow.testing.image_params` strategy for the valid image the break
    starts from (default: pyqcow-made, 4 KiB or 64 KiB clusters).  Shrinks
    towards the first rule and the smallest valid image.
    """
    names = list(RULES) if rules is None else list(rules)
    unknown = [r for r in names if r not in RULES]
    if unknown or not names:
        raise ValueError(f"invalid_images: unknown rules {unknown}; known: {', '.join(RULES)}")
    if params is None:
        v3 = all(r in V3_ONLY for r in names)
        # made by qemu-img and qemu-io (when installed), so that reproduce() rebuilds
        # the very same bytes before breaking them
        qemu = have_qemu()
        params = image_params(cluster_sizes=(4096, 65536), compressed=False, discard=False,
                              zero_clusters=False, max_clusters=40,
                              compat=("1.1",) if v3 else ("0.10", "1.1"),
                              creators=("qemu-img",) if qemu else None,
                              writers=("qemu-io",) if qemu else None)
    return _invalid(names, params, directory)


@st.composite
def _invalid(draw, names, params, directory) -> InvalidImage:
    rule = draw(st.sampled_from(names))
    choice = draw(st.integers(0, 255))
    valid = draw(images(params=params, min_ops=1, max_ops=4, directory=directory))
    with open(valid.path, "rb") as f:
        data = f.read()
    m = _Img(data)
    detected, fn = RULES[rule]
    res = fn(m, choice)  # type: ignore[operator]
    if res is None:  # this image cannot break that rule (v2: no v3 fields): the next one
        for other in names[names.index(rule) + 1:] + names[: names.index(rule)]:
            detected, fn = RULES[other]
            res = fn(m, choice)  # type: ignore[operator]
            if res is not None:
                rule = other
                break
        else:
            from hypothesis import reject

            reject()
    description, patches, truncate, bad_range = res
    path = os.path.join(valid.directory, "invalid.qcow2")
    buf = bytearray(data)
    for off, raw in patches:
        buf[off : off + len(raw)] = raw
    if truncate is not None:
        del buf[truncate:]
    with open(path, "wb") as f:
        f.write(buf)
    bad = InvalidImage(path=path, rule=rule, description=description, detected=detected,
                       valid=valid, patches=patches, truncate=truncate, bad_range=bad_range)
    _files.keep_example(valid.directory, bad.reproduce() if _files.keep_mode() else "")
    return bad
