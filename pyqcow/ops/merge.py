"""merge: TOP and its backing BASE become one image, at the name the user keeps.

Directions (``via``): *commit* copies TOP's allocated clusters into BASE;
*stream* copies BASE's clusters that TOP does not override into TOP.  When the
surviving file is not the one that received the data, an atomic rename puts it
at the kept name.

The plan (:func:`plan_merge`) knows everything that can make the run fail or
surprise and lists it as :class:`Refusal` records: sizes, formats at each name,
internal snapshots, other overlays, hard links, permissions, file systems (a
rename cannot cross one), backing-name limits, persistent bitmaps, external
data files, other processes' locks.  ``--dry-run`` shows them all; the real run
refuses on the same list before its first write (``force`` overrides exactly
the refusals marked ``forceable``).

Crash promise: the images are opened (QEMU's locks taken) before the plan the
run follows is made, and stay open until after the commit point.  At every
instant, TOP's file name, while it exists, reads TOP's guest content (through
its chain); once TOP's name is gone (removed, or replaced by the rename), the
kept name reads that content.  The rename (or, for keep=base via commit, the
removal of TOP) is the commit point.  An intent record written before the
first change lets :func:`pyqcow.ops.recover.recover` finish the operation (and
the domain XML update that goes with it) after a crash or a failed later step.
"""

from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass, field

from ..chain import backing_name, host_path, open_image
from ..errors import BackingChainError, OperationError, QcowError
from ..hostfile import LOCK_WRITE, fsync_dir, lock_conflict
from . import commit as commit_mod
from . import stream as stream_mod
from .common import dependents, reopen_rw, same_file
from .plan import merge_costs


@dataclass
class Refusal:
    """A reason the merge will not run.  ``forceable``: ``force=True`` overrides it."""

    path: str
    reason: str
    forceable: bool

    def line(self) -> str:
        return f"{self.path}: {self.reason}" + (" (use --force to merge anyway)" if self.forceable else "")


@dataclass
class MergePlan:
    top: str
    base: str
    keep: str
    kept_path: str
    removed_path: str
    via: str
    commit_bytes: int
    stream_bytes: int
    new_backing: str | None
    new_backing_format: str | None
    steps: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    done: bool = False
    top_size: int = 0
    base_size: int = 0
    kept_format: str = "qcow2"
    removed_files: list[str] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    force: bool = False
    interim_backing: str | None = None
    retarget: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return asdict(self)

    def blocking(self, force: bool | None = None) -> list[Refusal]:
        """The refusals that stop the run (all of them, or the unforceable ones with force)."""
        f = self.force if force is None else force
        return [r for r in self.refusals if not (f and r.forceable)]

    def raise_refusals(self) -> None:
        block = self.blocking()
        if block:
            first = block[0]
            more = "; ".join(r.line() for r in block[1:])
            raise OperationError(first.path, first.reason
                                 + (" (use --force to merge anyway)" if first.forceable else "")
                                 + (f"; also {more}" if more else ""))


# -- names, files, file systems ------------------------------------------------------------
def _real(path: str) -> str:
    """The file a name opens (symbolic links followed)."""
    return os.path.realpath(path)


def _dir_of(path: str) -> str:
    return os.path.dirname(os.path.abspath(path)) or "/"


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _needs_rename(keep: str, via: str) -> bool:
    return (keep == "base") == (via == "stream")


def _data_file(img) -> str | None:
    return getattr(img, "data_file_path", None) if getattr(img, "has_data_file", False) else None


def _snapshot_count(img) -> int:
    return img.header.nb_snapshots if img.format == "qcow2" else 0


# -- planning -------------------------------------------------------------------------------
def _direction_refusals(top, base, keep: str, via: str) -> list[Refusal]:
    """What stops one direction (checked for both, so auto can avoid them)."""
    out: list[Refusal] = []
    real_top, real_base = _real(top.path), _real(base.path)
    # the format at the kept name
    if keep == "base" and via == "stream" and base.format != "qcow2":
        out.append(Refusal(base.path, f"holds a {base.format} image; merging via stream would put "
                                      "a qcow2 image at its name", True))
    if keep == "top" and via == "commit" and base.format != "qcow2":
        out.append(Refusal(top.path, f"holds a qcow2 image; merging via commit would put BASE's "
                                     f"{base.format} image ({base.path}) at its name", True))
    # the file written
    written = real_base if via == "commit" else real_top
    if not os.access(written, os.W_OK, effective_ids=True):
        out.append(Refusal(written, "is not writable (permission denied)", False))
    # the rename, or the removal
    if _needs_rename(keep, via):
        src, dst = (real_top, real_base) if keep == "base" else (real_base, real_top)
        try:
            if os.stat(src).st_dev != os.stat(_dir_of(dst)).st_dev:
                out.append(Refusal(src, f"is on another file system than {dst}; the rename that "
                                        f"puts it at the kept name cannot cross file systems", False))
        except OSError as e:
            out.append(Refusal(src, f"cannot stat: {e.strerror}", False))
        for d in {_dir_of(src), _dir_of(dst)}:
            if not os.access(d, os.W_OK | os.X_OK, effective_ids=True):
                out.append(Refusal(d, "directory is not writable; cannot rename there", False))
        # a relative external data file name must still resolve after the move
        moved = top if keep == "base" else base
        df = _data_file(moved)
        name = moved.header.data_file if moved.format == "qcow2" else None
        if df and name and not os.path.isabs(name) and _dir_of(src) != _dir_of(dst):
            out.append(Refusal(moved.path, f"names its external data file {name!r} relative to its "
                                           "directory; moving it to another directory would lose "
                                           "it", False))
    removed = real_top if keep == "base" else real_base
    # a block device (an LVM volume) is written in place, never renamed or removed
    moved = ((real_top, real_base) if keep == "base" else (real_base, real_top)) if (
        _needs_rename(keep, via)) else ()
    for name in dict.fromkeys((*moved, removed)):
        if _is_block_device(name):
            what = "removed" if name == removed and name not in moved else "renamed"
            out.append(Refusal(name, f"is a block device; merging --keep {keep} via {via} would "
                                     f"have it {what} (only a device at the kept name, written "
                                     "in place by commit, can take part)", False))
    if not os.access(_dir_of(removed), os.W_OK | os.X_OK, effective_ids=True):
        out.append(Refusal(_dir_of(removed), "directory is not writable; cannot remove "
                                             f"{removed}", False))
    # internal snapshots the merge would lose (TOP's always; BASE's when its file goes)
    n = _snapshot_count(top)
    if n:
        out.append(Refusal(top.path, f"has {n} internal snapshot(s) that merging would lose or "
                                     "change", True))
    n = _snapshot_count(base)
    if n and via == "stream":
        out.append(Refusal(base.path, f"has {n} internal snapshot(s) that merging via stream would "
                                      "lose", True))
    out += _bitmap_refusals(top, base, via)
    return out


def _bitmap_refusals(top, base, via: str) -> list[Refusal]:
    """Persistent bitmaps that could not stay valid in the merged image: the one
    written (``write_problems``) and the other's carried into it (``merge_problems``)."""
    from .. import bitmaps

    dest, src = (base, top) if via == "commit" else (top, base)
    out = []
    for why in bitmaps.write_problems(dest) + bitmaps.merge_problems(dest, src):
        path, sep, reason = why.partition(": ")
        out.append(Refusal(path, reason, True) if sep and os.path.exists(path)
                   else Refusal(dest.path, why, True))
    return out


def _general_refusals(top, base, keep: str, mode_locks: bool, retarget=()) -> list[Refusal]:
    out: list[Refusal] = []
    for img in (top, base):
        st = os.stat(img.path)
        if st.st_nlink > 1:
            out.append(Refusal(img.path, f"has {st.st_nlink} hard links; merging would leave the "
                                         "others naming the old file", True))
    users = dependents(base.path, exclude=(top.path,))
    if users:
        out.append(Refusal(base.path, "is also the backing file of " + ", ".join(users)
                                      + "; merging would change or remove what they read", True))
    if keep == "base":
        users = dependents(top.path, exclude=(base.path, *retarget))
        if users:
            out.append(Refusal(top.path, "is the backing file of " + ", ".join(users)
                                         + "; merging with --keep base removes it (use --keep top)",
                               True))
    if mode_locks:
        for img in (top, base):
            why = lock_conflict(img.path, LOCK_WRITE)
            if why:
                out.append(Refusal(img.path, f"image is in use: {why}", False))
    return out


def plan_merge(top_path, *, keep: str = "base", via: str = "auto", force: bool = False,
               retarget=(), _top=None, _probe_locks: bool = False) -> MergePlan:
    """The plan, from an open chain (``_top``) or one opened read-only here."""
    if keep not in ("base", "top"):
        raise OperationError(os.fspath(top_path), f"--keep must be 'base' or 'top', not {keep!r}")
    if via not in ("auto", "commit", "stream"):
        raise OperationError(os.fspath(top_path), f"--via must be auto, commit or stream, not {via!r}")
    top = _top if _top is not None else open_image(os.fspath(top_path), "r", force_share=True)
    try:
        return _plan(top, keep, via, force, _probe_locks, retarget)
    finally:
        if _top is None:
            top.close()


def _plan(top, keep: str, via: str, force: bool, probe_locks: bool, retarget=(),
          costs: tuple[int, int] | None = None) -> MergePlan:
    base = top.backing
    if base is None:
        raise BackingChainError(top.path, "image has no backing file: nothing to merge")
    if top.format != "qcow2":
        raise OperationError(top.path, "merge needs a qcow2 top image")
    if costs is not None:
        commit_bytes, stream_bytes = costs  # from the plan just shown (informational)
    else:
        commit_bytes, stream_bytes = merge_costs(top, base)
    retarget = [os.fspath(p) for p in retarget]
    per_dir = {d: _direction_refusals(top, base, keep, d) for d in ("commit", "stream")}
    if retarget:
        if keep != "base":
            raise OperationError(top.path, "overlays are repointed only when TOP's name goes "
                                           "(--keep base)")
        per_dir["stream"].append(Refusal(top.path, "has overlays; they cannot follow a rename, "
                                                   "merge them via commit", False))
    if via == "auto":
        cost = {"commit": commit_bytes, "stream": stream_bytes}
        # ties go to the direction that needs no rename
        order = sorted(("commit", "stream"),
                       key=lambda d: (cost[d], _needs_rename(keep, d)))
        # prefer a direction nothing stops, then one only --force lets through
        chosen = next((d for d in order if not per_dir[d]), None)
        if chosen is None:
            chosen = next((d for d in order if all(r.forceable for r in per_dir[d])), order[0])
    else:
        chosen = via
    kept = base.path if keep == "base" else top.path
    removed = top.path if keep == "base" else base.path
    bb = base.backing
    new_backing = new_fmt = None
    refusals = list(per_dir[chosen])
    if bb is not None:
        new_fmt = bb.format
        original = base.header.backing_file
        relative = not (original.startswith("file:") and os.path.isabs(original[5:])) \
            and not os.path.isabs(original)
        try:
            new_backing = backing_name(kept, bb.path, relative=relative)
        except QcowError as e:
            refusals.append(Refusal(kept, f"cannot name the backing file {bb.path} from here: "
                                          f"{e.message}", False))
    interim = new_backing
    if new_backing is not None and _needs_rename(keep, chosen) and not refusals_about_names(refusals):
        at = base.path if keep == "top" else top.path
        interim = _interim_name(new_backing, at, kept, bb.path)
        if interim is None:
            refusals.append(Refusal(at, "no backing file name reads the same file from its own "
                                        "directory and from the kept name's; the chain would be "
                                        "broken during the rename", False))
    refusals += _general_refusals(top, base, keep, probe_locks, retarget)
    # the external data file of the image whose file goes away
    df = _data_file(top if chosen == "commit" else base)
    removed_files = [df] if df else []
    steps = _steps(top, base, keep, chosen, commit_bytes, stream_bytes, new_backing, removed_files)
    if retarget and chosen == "commit":
        steps[-1 - len(removed_files):-1 - len(removed_files)] = [
            f"repoint {p} at {base.path}" for p in retarget]
    return MergePlan(
        top=top.path, base=base.path, keep=keep, kept_path=kept, removed_path=removed,
        via=chosen, commit_bytes=commit_bytes, stream_bytes=stream_bytes,
        new_backing=new_backing, new_backing_format=new_fmt, steps=steps,
        top_size=top.virtual_size, base_size=base.virtual_size,
        kept_format=base.format if chosen == "commit" else top.format,
        removed_files=removed_files, refusals=refusals, force=force, interim_backing=interim,
        retarget=retarget,
    )


def refusals_about_names(refusals: list[Refusal]) -> bool:
    return any("cannot name the backing file" in r.reason for r in refusals)


def _steps(top, base, keep, via, commit_bytes, stream_bytes, new_backing, removed_files):
    steps = []
    real_top, real_base = _real(top.path), _real(base.path)
    if via == "commit":
        steps.append(f"commit {top.path} into {base.path} ({commit_bytes} bytes)")
        if base.virtual_size > top.virtual_size:
            steps.append(f"shrink {base.path} to {top.virtual_size} bytes (TOP's size)")
        if keep == "base":
            steps.append(_remove_step(top.path))
        else:
            if base.format == "qcow2" and new_backing != (base.header.backing_file or None):
                steps.append(f"set backing of {base.path} to {new_backing}")
            steps.append(f"rename {real_base} -> {real_top}")
            if os.path.islink(base.path):
                steps.append(f"remove the link {base.path}")
    else:
        steps.append(f"stream {base.path} into {top.path} ({stream_bytes} bytes)")
        steps.append(f"set backing of {top.path} to {new_backing or 'none'}")
        if keep == "base":
            steps.append(f"rename {real_top} -> {real_base}")
            if os.path.islink(top.path):
                steps.append(f"remove the link {top.path}")
        else:
            steps.append(_remove_step(base.path))
    steps += [f"remove {p}" for p in removed_files]
    return steps


def _remove_step(name: str) -> str:
    if os.path.islink(name):
        return f"remove {_real(name)} and the link {name}"
    return f"remove {name}"


# -- running --------------------------------------------------------------------------------
def merge(top_path, *, keep: str = "base", via: str = "auto", dry_run: bool = False,
          progress=None, force: bool = False, xml_update=None, retarget=(),
          _record=None, _costs: tuple[int, int] | None = None) -> MergePlan:
    """Merge TOP into one image at the kept name (see the module docstring).

    ``xml_update``: the domain XML update that goes with it (the CLI's
    ``DomainXmlUpdate``: ``path``, ``target``, the planned ``chain`` and
    ``apply(kept_path, fmt)``); it runs after the images' commit point, under the
    same intent record.  ``_record``: an intent record being finished by
    :func:`pyqcow.ops.recover.recover` (not rewritten, not removed here).
    """
    from . import intent

    top_path = os.fspath(top_path)
    if dry_run:
        return plan_merge(top_path, keep=keep, via=via, force=force, retarget=retarget,
                          _probe_locks=True)
    if _record is not None:
        retarget = _record.data.get("retarget", retarget)
    if via == "auto":
        first = plan_merge(top_path, keep=keep, via=via, force=force, retarget=retarget)
        via, _costs = first.via, (first.commit_bytes, first.stream_bytes)
    # open with the modes the direction needs: QEMU's locks held from here to the end
    top = open_image(top_path, "r+" if via == "stream" else "r",
                     backing_mode="r+" if via == "commit" else "r")
    try:
        # the binding plan, under the locks; the byte counts (which only inform) come
        # from the plan made just before when the caller has one
        plan = _plan(top, keep, via, force, False, retarget, _costs)
        if _record is not None:
            plan.new_backing = _record.data.get("new_backing", plan.new_backing)
            plan.removed_files = _record.data.get("removed_files", plan.removed_files)
        plan.raise_refusals()
        record = _record if _record is not None else intent.begin_merge(plan, xml_update)
        _run(plan, top, progress)
    finally:
        top.close()
    if _record is None:
        if xml_update is not None:
            xml_update.apply(plan.kept_path, plan.kept_format)
        record.finish()
    plan.done = True
    return plan


def _run(plan: MergePlan, top, progress) -> None:
    base = top.backing
    dirty = _dirty_ranges(top, base)
    if plan.via == "commit":
        base = reopen_rw(top, base)
        # bitmaps first: merge_into checks them as they are on disk (the first write
        # flags the written image's bitmaps in use); the bits are stored on close
        _carry_bitmaps(dest=base, src=top, dirty=dirty)
        res = commit_mod.commit(None, None, drop=True, progress=progress, _top=top)
        plan.bytes_copied = res.bytes_copied
        if base.virtual_size > top.virtual_size:
            _shrink(base, top.virtual_size)
        if plan.keep == "base":
            for overlay in plan.retarget:
                _repoint(overlay, base)
            _remove(plan.top)
        else:
            final = plan.new_backing
            if base.format == "qcow2" and final != (base.header.backing_file or None):
                # valid from BASE's directory until the rename, and from TOP's after it
                base.set_backing(plan.interim_backing, plan.new_backing_format)
            base.flush()
            _take_mode(src_name=plan.top, file=base)
            _rename(plan.base, plan.top)
            if base.format == "qcow2" and (base.header.backing_file or None) != final:
                base.set_backing(final, plan.new_backing_format)
    else:
        _carry_bitmaps(dest=top, src=base, dirty=dirty)
        res = stream_mod.stream(None, _backing_target(top, plan), progress=progress,
                                backing_name=plan.interim_backing, _top=top)
        plan.bytes_copied = res.bytes_copied
        if plan.keep == "base":
            _take_mode(src_name=plan.base, file=top)
            top.flush()
            _rename(plan.top, plan.base)
            if (top.header.backing_file or None) != plan.new_backing:
                top.set_backing(plan.new_backing, plan.new_backing_format)
        else:
            _remove(plan.base)
    for p in plan.removed_files:
        _remove(p)


def _repoint(overlay: str, base) -> None:
    """Make ``overlay`` (backed by TOP) name BASE, which now reads what TOP read."""
    from ..image import QcowImage

    with QcowImage(overlay, "r+") as img:
        old = img.header.backing_file or ""
        relative = not os.path.isabs(old.removeprefix("file:"))
        img.set_backing(backing_name(overlay, base.path, relative=relative), base.format)


def _backing_target(top, plan: MergePlan) -> str | None:
    bb = top.backing.backing if top.backing is not None else None
    return bb.path if bb is not None else None


def _interim_name(final: str, at: str, kept: str, target: str) -> str | None:
    """The backing name for the file now at ``at`` that moves to ``kept`` by a rename.

    It must read ``target`` from both places, so that the chain stays readable
    at every instant: the final name if it does (same directory, or it happens
    to), else an absolute name if one fits, else None.
    """
    from ..chain import resolve_backing
    from ..names import validate_backing_name

    if os.path.isabs(final) or _dir_of(at) == _dir_of(kept):
        return final
    try:
        if os.path.samefile(resolve_backing(host_path(at), final), target):
            return final
    except OSError:
        pass
    absolute = host_path(target)
    try:
        validate_backing_name(at, absolute)
    except QcowError:
        return None
    return absolute


def _shrink(img, size: int) -> None:
    """Make ``img`` exactly ``size`` bytes of guest data (BASE was larger than TOP)."""
    if img.format == "qcow2":
        img.shrink(size)
    else:
        img.flush()
        img.resize(size)
        img.flush()


def _carry_bitmaps(*, dest, src, dirty) -> None:
    """The merged image carries the bitmaps of both; TOP's clusters are dirty in all."""
    from .. import bitmaps

    if dest.format == "qcow2" and src.format == "qcow2" and (
            src.header.bitmaps is not None or dest.header.bitmaps is not None):
        if bitmaps.merge_problems(dest, src):
            return  # refused in the plan; --force merges without carrying them
        bitmaps.merge_into(dest, src, dirty)


def _dirty_ranges(top, base) -> list[tuple[int, int]]:
    """Every range TOP allocates (taken before the copy: a stream fills TOP)."""
    from .. import bitmaps

    if any(i.format == "qcow2" and i.header.bitmaps is not None for i in (top, base)):
        return bitmaps.allocated_ranges(top)
    return []


def _take_mode(*, src_name: str, file) -> None:
    """The file about to be renamed to ``src_name`` takes that name's mode, owner, group."""
    st = os.stat(src_name)
    fd = file.hf.fd
    mine = os.fstat(fd)
    if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
        except PermissionError:
            raise OperationError(file.path, f"cannot give it the owner of {src_name} "
                                            "(permission denied)") from None
    if stat.S_IMODE(mine.st_mode) != stat.S_IMODE(st.st_mode):
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.fsync(fd)


def _rename(src_name: str, dst_name: str) -> None:
    """Rename the file ``src_name`` opens over the file ``dst_name`` opens.

    Symbolic links are followed on both sides, so a link at the kept name
    keeps pointing at the merged data; a link at the source name is removed
    afterwards (its target moved away).
    """
    src, dst = _real(src_name), _real(dst_name)
    os.replace(src, dst)
    fsync_dir(dst)
    if _dir_of(src) != _dir_of(dst):
        fsync_dir(src)
    if os.path.islink(src_name):
        os.unlink(src_name)
        fsync_dir(src_name)


def _remove(name: str) -> None:
    """Remove the file ``name`` opens, and ``name`` itself if it is a link."""
    real = _real(name)
    if os.path.lexists(real):
        os.unlink(real)
        fsync_dir(real)
    if os.path.islink(name):
        os.unlink(name)
        fsync_dir(name)


__all__ = ["MergePlan", "Refusal", "merge", "plan_merge", "same_file"]
