"""rebase: change an image's backing file (safe: keep guest content; unsafe: header only)."""

from __future__ import annotations

import errno
import os

from .. import spec
from ..chain import header_chain, open_image, probe_format, resolve_backing
from ..entries import ClusterType
from ..errors import BackingChainError, FormatError, OperationError, QcowError
from ..image import QcowImage
from .common import check_backing_target, open_chain, same_file

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
    window by window of the guest disk: where the new chain reaches the old
    backing file itself (``_shared_layer``) and nothing above it allocates,
    the two read the same by construction and nothing is read.  Elsewhere
    each chain's pieces say where its bytes lie (``_Sources``): two that lie
    at the same offset of the same file are equal unread, and the others are
    compared in place, in the files' mappings, cluster by cluster
    (``copier.diff_runs``, memcmp in the C helper, which stops at the first
    differing byte: clusters that differ cost about a page each, not a read
    of both).  A run of differing clusters that reads as zeros in the old
    chain becomes zero clusters, any other is copied from where the old chain
    holds it (``copier.execute``: file to file, sharing extents on a reflink
    file system; compressed clusters and edges read and written).  Top reads
    the same at every instant (it is written only where it allocates nothing,
    with what its backing shows there); on failure the copier's ``abandon``
    leaves the file as after its last flush.
    """
    # the copier (and the C helper, typing) only for a safe rebase: start-up of -u
    from . import copier
    from .plan import unallocated_ranges

    ranges = unallocated_ranges(top)
    prog = copier.Progress(sum(n for _, n in ranges), progress)
    out = _Output(top, copier)
    sources = _Sources(copier, top.path)
    try:
        for a, b, op, np_ in _segments(ranges, old, new, top.cluster_size, prog):
            for g, n, piece in sources.differences(a, b, op, np_, top.cluster_size):
                out.add(g, n, piece, sources)
            prog.advance(b - a)
        out.finish()
    except BaseException:
        # Ctrl-C (or an error) in the middle of a write: the in-memory metadata
        # may be half updated; leave the file as after its last flush
        copier.abandon(top)
        raise
    finally:
        sources.close()
    return out.copied


WINDOW_CLUSTERS = 16384  # guest clusters planned at once (a bound on the pieces held)


def _shared_layer(old, new):
    """The old backing file itself as a member of the new chain (opened there), if
    it reads the same there: the new chain reads it where nothing above it
    allocates (e.g. a rebase onto an overlay of the old backing)."""
    if old is None or new is None:
        return None
    shared = next((i for i in new.chain if same_file(i.path, old.path)), None)
    if shared is None or (shared.format, shared.virtual_size) != (old.format, old.virtual_size):
        return None
    return shared


def _segments(ranges, old, new, cs: int, prog):
    """(start, end, old piece, new piece) over ``ranges`` where the two chains may
    read otherwise, in guest order (pieces of ``plan.pieces_above`` down to the
    bottom of each chain; a "zero" piece where there is no chain).  Where the
    new chain reads the old backing file itself (see ``_shared_layer``) there
    is no segment (progress is advanced there).  Planned one window of
    WINDOW_CLUSTERS clusters at a time, the old chain only where the new one
    leaves something to compare."""
    from .plan import pieces_above

    if not ranges:
        return
    shared = _shared_layer(old, new)
    window = WINDOW_CLUSTERS * cs
    j = 0
    w0 = ranges[0][0] // window * window
    last = ranges[-1][0] + ranges[-1][1]
    while w0 < last:
        w1 = w0 + window
        mine: list[tuple[int, int]] = []  # the ranges' parts in [w0, w1)
        while j < len(ranges) and ranges[j][0] < w1:
            s, n = ranges[j]
            mine.append((max(s, w0), min(s + n, w1)))
            if s + n > w1:
                break
            j += 1
        if mine:
            lo, hi = mine[0][0], mine[-1][1]
            newp = _chain_pieces(new, shared, lo, hi - lo, pieces_above)
            cut = _intersect(mine, newp, prog)
            if cut:
                lo, hi = cut[0][0], cut[-1][1]
                oldp = _chain_pieces(old, None, lo, hi - lo, pieces_above)
                for a, b, np_ in cut:
                    yield from _with_old(a, b, np_, oldp)
        w0 = ranges[j][0] // window * window if j < len(ranges) and ranges[j][0] >= w1 else w1


def _chain_pieces(img, base, start: int, length: int, pieces_above) -> list:
    from .plan import Piece

    if img is None:
        return [Piece(start, length, "zero")]
    return pieces_above(img, base, start, length)


def _intersect(ranges, pieces, prog) -> list:
    """(start, end, piece) of ``ranges`` (sorted (start, end)) within the sorted
    ``pieces``; "below" pieces (the shared layer: the same bytes) are left out
    and their bytes reported done."""
    out = []
    k = 0
    for a, b in ranges:
        while k < len(pieces) and pieces[k].end <= a:
            k += 1
        i = k
        while i < len(pieces) and pieces[i].guest_offset < b:
            p = pieces[i]
            s, e = max(a, p.guest_offset), min(b, p.end)
            if p.kind == "below":
                prog.advance(e - s)
            else:
                out.append((s, e, p))
            i += 1
    return out


def _with_old(a: int, b: int, newp, oldp):
    """(start, end, old piece, new piece) for [a, b) of ``newp`` against the sorted
    old pieces ``oldp`` (bisected: they cover the window)."""
    import bisect

    k = bisect.bisect_right(oldp, a, key=lambda p: p.guest_offset) - 1
    k = max(k, 0)
    while k < len(oldp) and oldp[k].guest_offset < b:
        p = oldp[k]
        s, e = max(a, p.guest_offset), min(b, p.end)
        if s < e:
            yield s, e, p, newp
        k += 1


RELEASE_BYTES = 16 * 1024 * 1024  # mapped bytes compared between releases (the RSS bound)


class _Sources:
    """Where each chain's bytes of a piece lie, and their comparison.

    A data piece at a known host offset is looked at in a read-only mapping of
    its file (one per file, its pages given back with MADV_DONTNEED after
    every RELEASE_BYTES compared, so that the RSS does not grow with the data
    compared); a zero piece is zeros; anything else (compressed clusters) is
    read through its layer.  With the C helper the comparison runs on
    pointers into the mappings (no view or buffer is made per chunk)."""

    def __init__(self, copier, path: str) -> None:
        from .. import fastcopy

        self.copier = copier
        self.path = path
        self.maps: dict[int, tuple] = {}  # fd -> (mmap or None, (st_dev, st_ino), pointer)
        self.zeros = bytes(COMPARE_CHUNK)
        self.bufs: list = [None, None]  # read buffers, made when first needed
        self.touched = 0
        self.native = fastcopy._native_for_call()
        if self.native is not None:
            ffi = self.native.ffi
            self.zero_ptr = ffi.from_buffer(self.zeros)
            self.cap = COMPARE_CHUNK // 512 + 2
            self.out = ffi.new("int64_t[]", 2 * self.cap)
            self.zero_flags = ffi.new("signed char[]", self.cap)

    def close(self) -> None:
        for m, _, ptr in self.maps.values():
            if ptr is not None:
                self.native.ffi.release(ptr)
            if m is not None:
                try:
                    m.close()
                except BufferError:  # a view still held by an interrupted compare
                    pass  # unmapped when the last view goes
        self.maps.clear()

    def _file(self, fd: int):
        got = self.maps.get(fd)
        if got is None:
            import mmap

            st = os.fstat(fd)
            m = ptr = None
            # (mapped only for the C helper, which survives a SIGBUS: the
            # fallback reads through the layers)
            if st.st_size and self.native is not None:
                try:
                    m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                except (OSError, ValueError):  # e.g. a block device or a pipe
                    m = None
            if m is not None and self.native is not None:
                ptr = self.native.ffi.from_buffer(m)
            got = self.maps[fd] = (m, (st.st_dev, st.st_ino), ptr)
        return got

    def where(self, p, a: int):
        """(mapping, offset, file id, pointer) of piece ``p``'s byte at guest ``a``
        (mapping and pointer None: read it), or None if it is zeros, or () if
        it must be read through its layer and has no file offset."""
        if p.kind != "data":
            return None
        run = p.run
        if run is None or run.type != ClusterType.NORMAL or run.host_offset is None:
            return ()
        m, ident, ptr = self._file(self.copier._src_fd(p.layer))
        host = run.host_offset + (a - run.guest_offset)
        if m is not None and host + (p.end - a) > len(m):
            m = ptr = None  # (past the file's end: read, which gives zeros there)
        return m, host, ident, ptr

    def _read(self, p, a: int, n: int, side: int) -> memoryview:
        if self.bufs[side] is None:
            self.bufs[side] = bytearray(COMPARE_CHUNK)
        v = memoryview(self.bufs[side])[:n]
        p.layer.readinto(v, a)
        return v

    def view(self, p, loc, a: int, n: int, side: int):
        """The ``n`` bytes of piece ``p`` from guest ``a`` (``loc``: its ``where``
        there): a pointer with the C helper, else a memoryview."""
        if loc is None:
            return self.zero_ptr if self.native is not None else memoryview(self.zeros)[:n]
        if loc == () or loc[0] is None:
            v = self._read(p, a, n, side)
            return self.native.ffi.from_buffer(v) if self.native is not None else v
        self.touched += n
        return loc[3] + loc[1]

    def differences(self, a: int, b: int, op, np_, cs: int):
        """(guest offset, length, old piece) of the differing cluster runs in [a, b)
        (the old piece None: the old chain reads zeros there)."""
        lo, ln = self.where(op, a), self.where(np_, a)
        if lo is None and ln is None:
            return
        if lo and ln and lo[2] == ln[2] and lo[1] == ln[1]:
            return  # the same bytes of the same file
        pos = a
        while pos < b:
            n = min(COMPARE_CHUNK, b - pos)
            ov = self.view(op, _at(lo, pos - a), pos, n, 0)
            nv = self.view(np_, _at(ln, pos - a), pos, n, 1)
            for off, length, zero in self._diff(ov, nv, n, -pos % cs, cs, lo is None):
                yield pos + off, length, None if zero else op
            pos += n
            if self.touched >= RELEASE_BYTES:
                self.release()

    def _diff(self, ov, nv, n: int, first: int, cs: int, old_zero: bool):
        """(offset, length, old reads zeros) of the differing runs of ``n`` bytes."""
        native = self.native
        if native is None:
            runs = self.copier.diff_runs(ov, nv, first, cs)
            return [(o, ln, old_zero or self.copier.is_zero(ov[o : o + ln])) for o, ln in runs]
        out, zero = self.out, self.zero_flags
        count = native.lib.pyqcow_diff_runs_mapped(ov, nv, n, first, cs, out, self.cap, zero)
        if count < 0:
            if count == -errno.EFAULT:  # SIGBUS: a file shrank under its mapping
                raise OperationError(self.path, "an image file shrank while it was compared")
            raise OSError(-count, os.strerror(-count))
        return [(out[2 * i], out[2 * i + 1], old_zero or zero[i] == 1) for i in range(count)]

    def release(self) -> None:
        import mmap

        for m, _, _ in self.maps.values():
            if m is not None:
                m.madvise(mmap.MADV_DONTNEED)
        self.touched = 0


def _at(loc, delta: int):
    """``loc`` (see ``_Sources.where``) moved ``delta`` bytes on."""
    if not loc:
        return loc
    return loc[0], loc[1] + delta, loc[2], loc[3]


class _Output:
    """The writes into ``top``: zero clusters where the old chain reads zeros (runs
    joined), the old chain's data collected as pieces for the copier and
    executed in batches of COPY_BATCH bytes."""

    def __init__(self, top, copier) -> None:
        self.top = top
        self.copier = copier
        self.todo: list = []
        self.todo_bytes = 0
        self.zero: list[int] = []  # [start, end) of the pending zero run
        self.copied = 0

    def add(self, g: int, n: int, piece, sources) -> None:
        from .plan import Piece

        self.copied += n
        if piece is None:
            if self.zero and self.zero[1] == g:
                self.zero[1] = g + n
            else:
                self._zeros()
                self.zero = [g, g + n]
            return
        self.todo.append(Piece(g, n, piece.kind, piece.layer, piece.run))
        self.todo_bytes += n
        if self.todo_bytes >= COPY_BATCH:
            self.copier.execute(self.todo, self.top)
            self.todo.clear()
            self.todo_bytes = 0

    def _zeros(self) -> None:
        if self.zero:
            self.top.write_zeroes(self.zero[0], self.zero[1] - self.zero[0])
            self.zero = []

    def finish(self) -> None:
        self._zeros()
        self.copier.execute(self.todo, self.top)
        self.todo.clear()
        self.top.flush()
