"""Guest operations for the generated images, and the model they are checked against.

An :class:`Op` is one guest write, zero write, discard or compressed write; the
model of the guest content is a ``bytearray`` that :meth:`Op.apply_to_model`
updates.  :func:`operations` draws lists of them (independent of the disk size
until made concrete); :func:`apply_ops` performs them on an image with
pyqcow's writer or with qemu-io.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import strategies as st

from . import _qemuio

__all__ = ["Op", "apply_ops", "operations", "qemu_io_sessions"]


@dataclass(frozen=True)
class Op:
    """One guest operation.

    ``kind``: ``write`` (data), ``zero`` (write zeroes), ``discard`` (whole
    clusters, read as zeros afterwards) or ``compressed`` (one cluster written
    compressed).  Data is derived from ``seed``: a repeated byte when
    ``pattern`` is true (compressible), pseudo-random bytes otherwise
    (``random.Random(seed).randbytes(length)``).
    """

    kind: str
    offset: int
    length: int
    seed: int = 0
    pattern: bool = False

    @property
    def fill(self) -> int:
        return self.seed & 0xFF or 1

    @property
    def data(self) -> bytes:
        if self.kind in ("zero", "discard"):
            return bytes(self.length)
        if self.pattern:
            return bytes([self.fill]) * self.length
        return random.Random(self.seed).randbytes(self.length)

    def apply_to_model(self, model: bytearray) -> None:
        """Apply this operation to ``model`` (the expected guest content)."""
        end = min(self.offset + self.length, len(model))
        if self.offset >= end:
            return
        model[self.offset : end] = self.data[: end - self.offset]

    def qemu_io_command(self, datafile: str | None = None) -> str:
        if self.kind == "zero":
            return f"write -z {self.offset} {self.length}"
        if self.kind == "discard":
            return f"discard {self.offset} {self.length}"
        flag = "-c " if self.kind == "compressed" else ""
        if self.pattern:
            return f"write {flag}-P {self.fill} {self.offset} {self.length}"
        assert datafile is not None
        return f"write {flag}-s {datafile} {self.offset} {self.length}"


_KINDS = ("write", "zero", "discard", "compressed")
_MAX_UNIT = (1 << 24) - 1


@st.composite
def _abstract_op(draw, kinds: Sequence[str]):
    """An operation independent of the disk size: mapped by :func:`_concrete`.
    Every draw is valid (no rejection), and each number shrinks towards the
    smallest operation at the start of the disk.  Four draws per operation
    (generation speed): ``bits`` holds the data seed (low 32 bits), whether the
    data is a repeated byte (bit 32) and whether the range is cluster aligned
    (bit 33)."""
    kind = draw(st.sampled_from(kinds))
    where = draw(st.integers(0, _MAX_UNIT))
    size = draw(st.integers(0, _MAX_UNIT))
    bits = draw(st.integers(0, (1 << 34) - 1))
    seed = bits & 0xFFFFFFFF
    pattern = kind == "compressed" or bool(bits >> 32 & 1)
    return (kind, bool(bits >> 33 & 1), where, size, seed, pattern)


def _concrete(a, virtual_size: int, cluster_size: int) -> Op | None:
    kind, aligned, where, size, seed, pattern = a
    if virtual_size <= 0:
        return None
    if kind in ("discard", "compressed"):
        full = virtual_size // cluster_size
        if full == 0:
            return None
        first = where % full
        num = 1 if kind == "compressed" else 1 + size % min(4, full - first)
        return Op(kind, first * cluster_size, num * cluster_size, seed, pattern)
    n_clusters = -(-virtual_size // cluster_size)
    if aligned:
        offset = (where % n_clusters) * cluster_size
        length = min((1 + size % 3) * cluster_size, virtual_size - offset)
    else:
        offset = where % virtual_size
        length = 1 + size % min(virtual_size - offset, 3 * cluster_size)
    return Op(kind, offset, length, seed, pattern)


_OPS_CACHE: dict = {}


def _ops_strategy(kinds: Sequence[str], min_ops: int, max_ops: int):
    max_ops = max(max_ops, 0)
    key = (tuple(kinds), min(min_ops, max_ops), max_ops)
    if key not in _OPS_CACHE:
        _OPS_CACHE[key] = st.lists(_abstract_op(tuple(kinds)), min_size=key[1], max_size=max_ops)
    return _OPS_CACHE[key]


def _concrete_ops(abstract, virtual_size: int, cluster_size: int) -> list[Op]:
    ops = []
    for a in abstract:
        op = _concrete(a, virtual_size, cluster_size)
        if op is not None:
            ops.append(op)
    return ops


@st.composite
def operations(
    draw,
    virtual_size: int = 1 << 20,
    cluster_size: int = 65536,
    *,
    max_ops: int = 8,
    min_ops: int = 0,
    kinds: Sequence[str] = ("write", "zero", "discard"),
) -> list[Op]:
    """Sequences of guest operations inside a disk of ``virtual_size`` bytes.

    Writes and zero writes have any offset and length (unaligned ones exercise
    copy-on-write); discards and compressed writes cover whole clusters (none
    are drawn in a disk smaller than one cluster).  Shrinks towards fewer,
    shorter operations at offset 0.
    """
    if virtual_size <= 0:
        return []
    return _concrete_ops(draw(_ops_strategy(kinds, min_ops, max_ops)), virtual_size,
                         cluster_size)


def apply_ops(path: str, ops: Sequence[Op], *, writer: str = "pyqcow", fmt: str = "qcow2",
              workdir: str | None = None) -> None:
    """Perform ``ops`` on the image at ``path`` (through its backing chain).

    ``writer``: ``pyqcow`` (pyqcow.open(path, "r+"), compressed clusters with
    its ``write_compressed``) or ``qemu-io`` (one qemu-io run; a compressed
    write gets a qemu-io run of its own).
    """
    if writer not in ("pyqcow", "qemu-io"):
        raise ValueError(f"writer must be 'pyqcow' or 'qemu-io', not {writer!r}")
    if writer == "pyqcow":
        _apply_pyqcow(path, ops)
        return
    for group in _qemu_io_groups(ops):
        _apply_qemu_io(path, group, fmt, workdir)


def _qemu_io_groups(ops: Sequence[Op]) -> list[list[Op]]:
    return qemu_io_sessions(ops, lambda op: op.kind == "compressed")


def qemu_io_sessions(items: Sequence, is_compressed) -> list[list]:
    """``items`` (ops, or qemu-io command lines) grouped into qemu-io runs, a
    compressed write (``is_compressed(item)``) in a run of its own: qemu 7.2
    keeps appending compressed data to a host cluster it has freed and reused
    for plain data in the same session, overwriting guest data (on 512-byte
    clusters, ``write -c 0 512; write 0 512; write 512 512; write -c 1024 512``
    leaves compressed bytes in guest 520-525, and ``qemu-img check`` reports
    "OFLAG_COPIED data cluster ... refcount=2")."""
    groups: list[list] = []
    for item in items:
        alone = is_compressed(item) or (groups and is_compressed(groups[-1][-1]))
        if groups and not alone:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _apply_pyqcow(path: str, ops: Sequence[Op]) -> None:
    from ..chain import open_image

    with open_image(path, "r+") as img:
        comp = None
        for op in ops:
            if op.kind == "write":
                img.write(op.offset, op.data)
            elif op.kind == "compressed":
                if comp is None:
                    from ..ops.convert import compressor

                    ctype = "zstd" if getattr(img.header, "compression_type", 0) == 1 else "zlib"
                    comp = compressor(ctype)
                data = op.data
                packed = comp(data)
                if len(data) == img.cluster_size and len(packed) < len(data):
                    img.write_compressed(op.offset, packed)
                else:  # as qemu does with data that does not shrink
                    img.write(op.offset, data)
            elif op.kind == "zero":
                img.write_zeroes(op.offset, op.length)
            elif op.kind == "discard":
                img.discard(op.offset, op.length)
            else:  # pragma: no cover
                raise ValueError(op.kind)
        img.flush()


def _apply_qemu_io(path: str, ops: Sequence[Op], fmt: str, workdir: str | None) -> None:
    d = workdir or os.path.dirname(os.path.abspath(path))
    made: list[str] = []
    try:
        cmds = []
        for i, op in enumerate(ops):
            datafile = None
            if op.kind in ("write", "compressed") and not op.pattern:
                datafile = os.path.join(d, f".op{i}.bin")
                with open(datafile, "wb") as f:
                    f.write(op.data)
                made.append(datafile)
            cmds.append(op.qemu_io_command(datafile))
        try:
            if _qemuio.run(os.path.abspath(path), fmt, cmds):
                return
        except _qemuio.SessionError:
            pass  # rerun one-shot below: its error message is the one to report
        argv = ["qemu-io", "-f", fmt]
        for c in cmds:
            argv += ["-c", c]
        argv.append(path)
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        if r.returncode != 0 or "error" in r.stdout.lower() or "failed" in r.stdout.lower():
            raise RuntimeError(f"qemu-io failed ({r.returncode}): {argv}: {r.stdout}{r.stderr}")
    finally:
        for f in made:
            os.unlink(f)
