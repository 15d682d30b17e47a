"""Deleting an external snapshot offline: the engine's merge on every disk it
covers, then every reference to the file that went away renamed in the domain
and the remaining snapshots, and the snapshot's metadata dropped."""

from __future__ import annotations

import os
import time

from ..chain import host_path, open_image
from ..errors import QcowError
from .connection import Domain, DomainError, Snapshot, _all_files, _conn
from .metadata import (
    DomainPlan,
    _apply_metadata,
    _metadata_with,
    _record_path,
    _remove_record,
    _write_record,
)


def _pairs(domain: Domain, snap: Snapshot) -> list[tuple[str, str, str]]:
    """(target, TOP, BASE) for every disk the snapshot covers."""
    out = []
    for target, top in snap.overlays.items():
        if target not in snap.frozen:
            raise DomainError(domain.name, f"snapshot {snap.name!r}: disk '{target}' has no "
                                           "frozen file in its embedded domain")
        base = snap.frozen[target][0]
        if not os.path.exists(top):
            raise DomainError(top, f"snapshot {snap.name!r}, disk '{target}': the overlay is "
                                   "missing (run `pyqcow domain sync` first?)")
        if not os.path.exists(base):
            raise DomainError(base, f"snapshot {snap.name!r}, disk '{target}': the frozen file "
                                    "is missing")
        with open_image(top, "r", force_share=True) as img:
            b = img.backing
            if b is None or not os.path.samefile(b.path, base):
                raise DomainError(top, f"snapshot {snap.name!r}, disk '{target}': the overlay's "
                                       f"backing file is not {base}")
        out.append((target, host_path(top), host_path(base)))
    if not out:
        raise DomainError(domain.name, f"snapshot {snap.name!r} has no external disk")
    return out


def _overlays_of(path: str, domain: Domain, snaps: list[Snapshot]) -> list[str]:
    """Files the domain's metadata knows whose backing file is ``path``."""
    out = []
    for f in sorted(_all_files(domain, snaps)):
        if not os.path.exists(f) or os.path.samefile(f, path):
            continue
        try:
            with open_image(f, "r", force_share=True, backing=False) as img:
                name = img.header.backing_file if img.format == "qcow2" else None
        except QcowError:
            continue
        if name:
            from ..chain import resolve_backing

            try:
                if os.path.samefile(resolve_backing(f, name), path):
                    out.append(host_path(f))
            except OSError:
                continue
    return out


def merge(conn_or_uri, domain_name: str, snapshot_name: str, *, keep: str = "base",
          via: str = "auto", dry_run: bool = False, progress=None) -> DomainPlan:
    """Delete external snapshot S offline: merge its overlay with its frozen file on
    every disk it covers (leaf or middle layer), keep the metadata true."""
    from ..ops import merge as merge_op

    domain = Domain(_conn(conn_or_uri), domain_name)
    domain.require_inactive()
    snaps = domain.snapshots()
    snap = next((s for s in snaps if s.name == snapshot_name), None)
    if snap is None:
        raise DomainError(domain.name, f"no snapshot named {snapshot_name!r}")
    plan = DomainPlan("merge", domain.name, snap.name, delete_snapshot=snap.name)
    renames: dict[str, tuple[str, str]] = {}
    jobs = []
    for target, top, base in _pairs(domain, snap):
        above = _overlays_of(top, domain, snaps) if keep == "base" else []
        mp = merge_op.plan_merge(top, keep=keep, via=via, retarget=above, _probe_locks=True)
        block = mp.blocking()
        if block:
            raise DomainError(block[0].path, f"disk '{target}': {block[0].reason}"
                              + "".join(f"; {r.line()}" for r in block[1:]))
        kept, gone = (base, top) if keep == "base" else (top, base)
        renames[gone] = (kept, mp.kept_format)
        renames[kept] = (kept, mp.kept_format)
        plan.image_steps += [f"[{target}] {s}" for s in mp.steps]
        plan.merges.append({"disk": target, **mp.as_json()})
        jobs.append((target, top, mp, above))
    plan.changes = _metadata_with(domain, renames, skip=snap.name)
    if dry_run:
        return plan
    rec = _record_path(domain, jobs[0][1])
    _write_record(rec, {"version": 1, "op": "domain-merge", "domain": domain.dom.UUIDString(),
                        "snapshot": snap.name, "created": int(time.time()),
                        "renames": {k: list(v) for k, v in renames.items()}})
    for _target, top, mp, above in jobs:
        merge_op.merge(top, keep=keep, via=mp.via, progress=progress, retarget=above,
                       _costs=(mp.commit_bytes, mp.stream_bytes))
    # recompute against the files as they are now (idempotent), then apply
    changes = _metadata_with(domain, renames, skip=snap.name)
    _apply_metadata(domain, changes, snap.name)
    _remove_record(rec)
    plan.done = True
    return plan
