"""rebase: change an image's backing file (safe: keep guest content; unsafe: header only)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import spec
from ..chain import header_chain, open_image, probe_format, resolve_backing
from ..errors import BackingChainError, FormatError, OperationError, QcowError
from ..image import QcowImage
from .common import check_backing_target, open_chain, read_guest, same_file

COMPARE_CHUNK = 4 * 1024 * 1024


@dataclass
class RebaseResult:
    image: str
    backing: str | None
    bytes_copied: int


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

    Planned by the planner (``plan.unallocated_ranges``).  Not executed by
    ``copier.execute``, which copies what an allocation map says: what to copy
    here is decided by comparing the bytes of two chains, so this loop reads
    both and writes the clusters that differ with ``top.write`` (or
    ``write_zeroes``); on failure the copier's ``abandon`` leaves the file as
    after its last flush, as for every copy.
    """
    # the copier (and the C helper, typing) only for a safe rebase: start-up of -u
    from . import copier
    from .plan import unallocated_ranges

    ranges = unallocated_ranges(top)
    prog = copier.Progress(sum(n for _, n in ranges), progress)
    copied = 0
    cs = top.cluster_size
    try:
        for start, length in ranges:
            pos = start
            end = start + length
            while pos < end:
                n = min(COMPARE_CHUNK, end - pos)
                old_buf = _view(old, pos, n)
                new_buf = _view(new, pos, n)
                if old_buf != new_buf:
                    copied += _write_differences(top, pos, old_buf, new_buf, cs)
                prog.advance(n)
                pos += n
        top.flush()
    except BaseException:
        # Ctrl-C (or an error) in the middle of a write: the in-memory metadata
        # may be half updated; leave the file as after its last flush
        copier.abandon(top)
        raise
    return copied


def _view(img, offset: int, length: int) -> bytes:
    """Guest bytes of ``img`` (zeros past its end, or if there is no image)."""
    buf = bytearray(length)
    read_guest(img, memoryview(buf), offset)
    return bytes(buf)


def _write_differences(top, pos: int, old: bytes, new: bytes, cs: int) -> int:
    """Write into ``top`` the clusters where the old and new backing differ."""
    written = 0
    n = len(old)
    i = 0
    while i < n:
        # cluster-aligned slices in guest space
        g = pos + i
        step = min(cs - (g % cs), n - i)
        if old[i : i + step] != new[i : i + step]:
            j = i + step
            while j < n:
                s2 = min(cs, n - j)
                if old[j : j + s2] == new[j : j + s2]:
                    break
                j += s2
            if not any(old[i:j]):
                top.write_zeroes(g, j - i)
            else:
                top.write(g, old[i:j])
            written += j - i
            i = j
        else:
            i += step
    return written
