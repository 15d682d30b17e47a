"""rebase: change an image's backing file (safe: keep guest content; unsafe: header only)."""

from __future__ import annotations

import os

from .. import spec
from ..chain import header_chain, open_image, probe_format, resolve_backing
from ..errors import BackingChainError, FormatError, OperationError, QcowError
from ..image import QcowImage
from .common import check_backing_target, open_chain, read_guest, same_file

COMPARE_CHUNK = 4 * 1024 * 1024
COPY_BATCH = 64 * 1024 * 1024  # differing data handed to the copier at once


class RebaseResult:
    """What a rebase did (a plain class: dataclasses costs a third of a small
    command's start-up)."""

    __slots__ = ("image", "backing", "bytes_copied")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, image: str, backing: str | None, bytes_copied: int) -> None:
        self.image = image
        self.backing = backing
        self.bytes_copied = bytes_copied

    def __eq__(self, other) -> bool:
        if other.__class__ is self.__class__:
            return (self.image, self.backing, self.bytes_copied) == (
                other.image, other.backing, other.bytes_copied)
        return NotImplemented

    def __repr__(self) -> str:
        return (f"RebaseResult(image={self.image!r}, backing={self.backing!r}, "
                f"bytes_copied={self.bytes_copied!r})")


def _validate_name(path: str, backing: str) -> None:
    n = len(os.fsencode(backing))
    if n > spec.MAX_BACKING_FILE_NAME:
        raise OperationError(
            path, f"backing file name too long ({n} bytes, maximum {spec.MAX_BACKING_FILE_NAME})"
        )


def _check_request(path: str, backing: str | None, backing_format: str | None) -> None:
    """What rebase checks before it opens anything (read-write, with locks: our own
    lock on an image of a loop would otherwise be reported as another process's)."""
    if backing is None:
        return
    _validate_name(path, backing)
    if backing_format not in (None, "qcow2", "raw"):
        raise OperationError(path, f"unsupported backing format {backing_format!r}")
    check_no_loop(path, backing, backing_format)


def validate(path, backing: str | None, backing_format: str | None = None, *,
             image_format: str | None = None) -> None:
    """Every check of a rebase request, before anything is opened or planned (the
    CLI calls it first, before a domain XML update is prepared): the name of
    BACKING, that ``path`` exists and is a qcow2 image (``image_format``: the
    format the caller was told, e.g. ``-f``; default: probe), and no loop."""
    path = os.fspath(path)
    backing = backing or None
    if backing is not None:
        _validate_name(path, backing)
    if not os.path.exists(path):
        raise OperationError(path, "no such file")
    fmt = image_format or probe_format(path)
    if fmt != "qcow2":
        how = "opened as raw (-f raw)" if image_format else "a raw image"
        raise OperationError(path, f"is {how}; only qcow2 images have a backing file")
    if probe_format(path) != "qcow2":
        raise FormatError(path, "not a qcow2 image (bad magic), but -f qcow2 was given")
    _check_request(path, backing, backing_format)


def backing_target(path, backing: str | None, backing_format: str | None = None
                   ) -> tuple[str | None, str | None]:
    """(file, format) of the new backing file named ``backing`` (None, None for
    none); the format is probed when not given and the file exists."""
    if not backing:
        return None, None
    full = resolve_backing(os.fspath(path), backing)
    if backing_format is None and os.path.exists(full):
        backing_format = probe_format(full)
    return full, backing_format


def check_no_loop(path, backing: str | None, backing_format: str | None = None) -> None:
    """Refuse (BackingChainError) if making ``backing`` the backing file of ``path``
    would make a loop: ``backing`` is ``path`` itself or has it in its chain."""
    if not backing:
        return
    path = os.fspath(path)
    try:
        full = resolve_backing(path, backing)
    except QcowError:
        return  # not a local file: reported by the rebase itself
    if not os.path.exists(full):
        return
    chain = header_chain(full, backing_format)
    for i, name in enumerate(chain):
        if same_file(name, path):
            names = " -> ".join([path, *chain[: i + 1]])
            raise BackingChainError(
                path, f"backing file {backing!r} would make a backing loop ({names}); "
                      "an image cannot be in its own backing chain"
            )


def rebase(path, backing: str | None, *, backing_format: str | None = None, unsafe: bool = False,
           progress=None) -> RebaseResult:
    path = os.fspath(path)
    backing = backing or None
    _check_request(path, backing, backing_format)
    if unsafe:
        fmt = backing_format
        if backing is not None and fmt is None:
            full = resolve_backing(path, backing)
            if not os.path.exists(full):
                raise OperationError(path, "backing format must be given with -F when the new backing file does not exist")
            fmt = probe_format(full)
        with QcowImage(path, "r+") as img:
            img.set_backing(backing, fmt)
        return RebaseResult(path, backing, 0)
    return _safe_rebase(path, backing, backing_format, progress)


def _safe_rebase(path: str, backing: str | None, backing_format: str | None,
                 progress) -> RebaseResult:
    new_img = None
    fmt = None
    if backing is not None:
        full, actual = check_backing_target(path, backing)
        if same_file(full, path):
            raise OperationError(path, "an image cannot be its own backing file")
        fmt = backing_format or actual
    top = open_chain(path, "r+")
    try:
        if backing is not None:
            new_img = open_image(full, format=fmt)
            if any(same_file(i.path, path) for i in new_img.chain):
                raise OperationError(path, "the new backing chain would contain the image itself")
        copied = _copy_differences(top, top.backing, new_img, progress)
        top.set_backing(backing, fmt)
        return RebaseResult(path, backing, copied)
    finally:
        if new_img is not None:
            new_img.close()
        top.close()


def _copy_differences(top, old, new, progress) -> int:
    """Where ``top`` allocates nothing and its old backing ``old`` reads otherwise
    than the new one ``new``, write the old content into ``top``.

    Planned by the planner (``plan.unallocated_ranges``, ``plan.pieces_above``),
    executed by the copier: both chains are read chunk by chunk and compared
    cluster by cluster (``copier.diff_runs``, memcmp in the C helper); a run of
    differing clusters that reads as zeros in the old chain becomes zero
    clusters, any other is copied from where the old chain holds it
    (``copier.execute``: file to file, sharing extents on a reflink file
    system; compressed clusters and edges read and written).  Top reads the
    same at every instant (it is written only where it allocates nothing, with
    what its backing shows there); on failure the copier's ``abandon`` leaves
    the file as after its last flush.
    """
    # the copier (and the C helper, typing) only for a safe rebase: start-up of -u
    from . import copier
    from .plan import unallocated_ranges

    ranges = unallocated_ranges(top)
    prog = copier.Progress(sum(n for _, n in ranges), progress)
    copied = 0
    cs = top.cluster_size
    old_buf, new_buf = bytearray(COMPARE_CHUNK), bytearray(COMPARE_CHUNK)
    todo: list = []  # pieces of the old chain to copy: executed together, in batches
    # both chains are read with image.readinto (pread), not the mmap-backed
    # reader: it took about 30% less CPU, but every page it touched stayed mapped,
    # so the peak RSS grew with the data compared (3.5 GiB on a 4 GiB chain)
    try:
        for start, length, same in _to_compare(ranges, old, new):
            if same:
                prog.advance(length)
                continue
            pos = start
            end = start + length
            while pos < end:
                n = min(COMPARE_CHUNK, end - pos)
                ov, nv = memoryview(old_buf)[:n], memoryview(new_buf)[:n]
                read_guest(old, ov, pos)
                read_guest(new, nv, pos)
                runs = copier.diff_runs(ov, nv, -pos % cs, cs)
                if runs:
                    copied += _write_differences(top, old, pos, ov, runs, copier, todo)
                    if sum(p.length for p in todo) >= COPY_BATCH:
                        copier.execute(todo, top)
                        todo.clear()
                prog.advance(n)
                pos += n
        copier.execute(todo, top)
        top.flush()
    except BaseException:
        # Ctrl-C (or an error) in the middle of a write: the in-memory metadata
        # may be half updated; leave the file as after its last flush
        copier.abandon(top)
        raise
    return copied



def _to_compare(ranges, old, new):
    """(start, length, same) over ``ranges``: ``same`` where the two chains read
    the same bytes by construction, so nothing is read there: the new chain
    reaches the old backing file itself (e.g. a rebase onto an overlay of the
    old backing) and nothing above it in the new chain allocates the range."""
    shared = None
    if old is not None and new is not None:
        shared = next((i for i in new.chain if same_file(i.path, old.path)), None)
    if shared is None or (shared.format, shared.virtual_size) != (old.format, old.virtual_size):
        for start, length in ranges:
            yield start, length, False
        return
    from .plan import pieces_above

    for start, length in ranges:
        for p in pieces_above(new, shared, start, length):
            yield p.guest_offset, p.length, p.kind == "below"


def _write_differences(top, old, pos: int, view, runs, copier, todo: list) -> int:
    """Write into ``top`` the differing ``runs`` (offset, length in ``view``, the
    old chain's bytes at guest ``pos``): zeros as zero clusters now, data as
    pieces of the old chain's layers added to ``todo`` for the copier."""
    from .plan import Piece, pieces_above

    data: list[tuple[int, int]] = []
    for off, ln in runs:
        if copier.is_zero(view[off : off + ln]):
            top.write_zeroes(pos + off, ln)
        else:
            data.append((pos + off, ln))
    if data:
        if old is None:  # (never: without an old backing the old bytes are zeros)
            raise AssertionError("data differs from an absent backing file")
        first, last = data[0][0], data[-1][0] + data[-1][1]
        for p in pieces_above(old, None, first, last - first):
            for g, ln in data:
                a, b = max(g, p.guest_offset), min(g + ln, p.end)
                if a < b:
                    todo.append(Piece(a, b - a, p.kind, p.layer, p.run))
    return sum(ln for _, ln in runs)
