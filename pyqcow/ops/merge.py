"""merge: TOP and its backing BASE become one image, at the name the user keeps.

Directions (``via``): *commit* copies TOP's allocated clusters into BASE;
*stream* copies BASE's clusters that TOP does not override into TOP.  When the
surviving file is not the one that received the data, an atomic rename puts it
at the kept name.

Crash promise: at every instant, TOP's file name, while it exists, reads TOP's
guest content (through its chain); once TOP's name is gone (removed, or
replaced by the rename), the kept name reads that content.  The rename (or, for
keep=base via commit, the removal of TOP) is the commit point.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ..errors import BackingChainError, OperationError, QcowError
from ..hostfile import fsync_dir
from . import commit as commit_mod
from . import stream as stream_mod
from .common import backing_name_for, dependents, open_chain, same_file
from .plan import data_bytes


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

    def as_json(self) -> dict:
        return asdict(self)


def plan_merge(top_path, *, keep: str = "base", via: str = "auto", _top=None) -> MergePlan:
    if keep not in ("base", "top"):
        raise OperationError(os.fspath(top_path), f"--keep must be 'base' or 'top', not {keep!r}")
    if via not in ("auto", "commit", "stream"):
        raise OperationError(os.fspath(top_path), f"--via must be auto, commit or stream, not {via!r}")
    top = _top if _top is not None else open_chain(top_path, "r")
    try:
        base = top.backing
        if base is None:
            raise BackingChainError(top.path, "image has no backing file: nothing to merge")
        if top.format != "qcow2":
            raise OperationError(top.path, "merge needs a qcow2 top image")
        commit_bytes = data_bytes(commit_mod.plan_commit(top, base))
        stream_bytes = data_bytes(stream_mod.plan_stream(top, base.backing))
        if via == "auto":
            # ties go to the direction that needs no rename
            if commit_bytes < stream_bytes or (commit_bytes == stream_bytes and keep == "base"):
                chosen = "commit"
            else:
                chosen = "stream"
        else:
            chosen = via
        if chosen == "commit" and base.format != "qcow2" and keep == "top":
            pass  # a raw base renamed to the top's name becomes a raw image: allowed
        kept = base.path if keep == "base" else top.path
        removed = top.path if keep == "base" else base.path
        bb = base.backing
        new_backing = None
        new_fmt = None
        if bb is not None:
            new_fmt = bb.format
            new_backing = backing_name_for(kept, bb.path, base.header.backing_file)
            if os.path.dirname(os.path.abspath(top.path)) != os.path.dirname(os.path.abspath(base.path)):
                new_backing = os.path.abspath(bb.path)
        steps = []
        if chosen == "commit":
            steps.append(f"commit {top.path} into {base.path} ({commit_bytes} bytes)")
            if keep == "base":
                steps.append(f"remove {top.path}")
            else:
                if base.format == "qcow2" and new_backing != (base.header.backing_file or None):
                    steps.append(f"set backing of {base.path} to {new_backing}")
                steps.append(f"rename {base.path} -> {top.path}")
        else:
            steps.append(f"stream {base.path} into {top.path} ({stream_bytes} bytes)")
            steps.append(f"set backing of {top.path} to {new_backing or 'none'}")
            if keep == "base":
                steps.append(f"rename {top.path} -> {base.path}")
            else:
                steps.append(f"remove {base.path}")
        return MergePlan(
            top=top.path, base=base.path, keep=keep, kept_path=kept, removed_path=removed,
            via=chosen, commit_bytes=commit_bytes, stream_bytes=stream_bytes,
            new_backing=new_backing, new_backing_format=new_fmt, steps=steps,
        )
    finally:
        if _top is None:
            top.close()


def _check_kept_name(plan: MergePlan, force: bool) -> None:
    for p in (plan.top, plan.base):
        if os.path.islink(p):
            raise OperationError(p, "is a symbolic link; merge renames files and would replace the link")
        st = os.stat(p)
        if st.st_nlink > 1:
            raise OperationError(p, f"has {st.st_nlink} hard links; merging would leave the others stale")
    # internal snapshots: TOP's file is removed (commit) or loses its backing
    # data (stream); BASE's file is removed by a stream
    for p, lost in ((plan.top, True), (plan.base, plan.via == "stream")):
        n = _snapshot_count(p)
        if lost and n and not force:
            raise OperationError(
                p, f"has {n} internal snapshot(s) that merging would lose or change "
                "(use --force to merge anyway)")
    users = dependents(plan.base, exclude=(plan.top,))
    if users and not force:
        raise OperationError(
            plan.base,
            "is also the backing file of " + ", ".join(users)
            + "; merging would change or remove what they read (use --force to merge anyway)",
        )
    if plan.keep == "base":
        # TOP's name goes away: overlays of TOP would lose their backing file
        users = dependents(plan.top, exclude=(plan.base,))
        if users and not force:
            raise OperationError(
                plan.top,
                "is the backing file of " + ", ".join(users)
                + "; merging with --keep base removes it (use --keep top, or --force)",
            )


def _snapshot_count(path: str) -> int:
    from ..header import parse_header

    try:
        with open(path, "rb") as f:
            head = f.read(65536)
        if head[:4] != b"QFI\xfb":
            return 0
        return parse_header(path, head, os.path.getsize(path)).nb_snapshots
    except (OSError, QcowError):
        return 0


def merge(top_path, *, keep: str = "base", via: str = "auto", dry_run: bool = False,
          progress=None, force: bool = False) -> MergePlan:
    top_path = os.fspath(top_path)
    plan = plan_merge(top_path, keep=keep, via=via)
    if dry_run:
        return plan
    _check_kept_name(plan, force)
    if plan.via == "commit":
        res = commit_mod.commit(plan.top, None, drop=True, progress=progress)
        plan.bytes_copied = res.bytes_copied
        if keep == "base":
            os.unlink(plan.top)
            fsync_dir(plan.top)
        else:
            _fix_backing_name(plan.base, plan.new_backing, plan.new_backing_format)
            os.replace(plan.base, plan.top)
            fsync_dir(plan.top)
            if os.path.dirname(os.path.abspath(plan.base)) != os.path.dirname(os.path.abspath(plan.top)):
                fsync_dir(plan.base)
    else:
        res = stream_mod.stream(plan.top, _base_backing_path(plan), progress=progress,
                                backing_name=plan.new_backing)
        plan.bytes_copied = res.bytes_copied
        if keep == "base":
            os.replace(plan.top, plan.base)
            fsync_dir(plan.base)
            if os.path.dirname(os.path.abspath(plan.base)) != os.path.dirname(os.path.abspath(plan.top)):
                fsync_dir(plan.top)
        else:
            os.unlink(plan.base)
            fsync_dir(plan.base)
    plan.done = True
    return plan


def _base_backing_path(plan: MergePlan) -> str | None:
    if plan.new_backing is None:
        return None
    from ..chain import resolve_backing

    return resolve_backing(plan.kept_path if plan.via == "stream" and plan.keep == "top" else plan.top,
                           plan.new_backing)


def _fix_backing_name(path: str, name: str | None, fmt: str | None) -> None:
    """Before renaming BASE to TOP's name: make its backing name right for the new place."""
    from ..chain import probe_format
    from ..image import QcowImage

    if probe_format(path) != "qcow2":
        return
    with QcowImage(path, "r+") as img:
        if (img.header.backing_file or None) != name:
            img.set_backing(name, fmt)


__all__ = ["MergePlan", "merge", "plan_merge", "same_file"]
