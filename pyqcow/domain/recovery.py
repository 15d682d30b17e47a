"""``sync``: finish after an interruption, from the images' and the domain's
intent records, so that the definition and every snapshot name the files on
disk."""

from __future__ import annotations

import json
import os

from ..chain import host_path
from .connection import Domain, DomainError, _all_files, _conn
from .metadata import DomainPlan, _apply_metadata, _metadata_with, _remove_record


def sync(conn_or_uri, domain_name: str, *, dry_run: bool = False) -> DomainPlan:
    """Make the definition and every snapshot's metadata true to the images on disk after
    an interruption, from the intent records (idempotent)."""
    from ..ops import intent
    from ..ops.recover import finish

    domain = Domain(_conn(conn_or_uri), domain_name)
    domain.require_inactive()
    plan = DomainPlan("sync", domain.name, None)
    snaps = domain.snapshots()
    files = _all_files(domain, snaps)
    dirs = sorted({os.path.dirname(host_path(f)) for f in files})
    # 1. the images: finish interrupted merges (their own records)
    for d in dirs:
        for rec in intent.find(d):
            if rec.data.get("op") == "merge" and (rec.data.get("top") in files
                                                   or rec.data.get("base") in files):
                plan.image_steps += finish(rec, dry_run)
    # 2. the metadata: the domain records
    uuid = domain.dom.UUIDString()
    for d in dirs:
        path = os.path.join(d, f".{uuid}.pyqcow-domain.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        op = data.get("op")
        if op == "domain-merge":
            renames = {k: tuple(v) for k, v in data["renames"].items()}
            changes = _metadata_with(domain, renames, skip=data["snapshot"])
            plan.changes += changes
            plan.delete_snapshot = data["snapshot"]
            if not dry_run:
                _apply_metadata(domain, changes, data["snapshot"])
        elif op == "domain-snapshot":
            plan.image_steps.append(f"snapshot {data['snapshot']!r} was interrupted; its "
                                    "overlays are kept, the domain keeps its files")
            for _target, (a, _b) in data.get("disks", {}).items():
                if not data.get("keep_name") and os.path.exists(a):
                    plan.unused_files.append(a)
        if not dry_run:
            _remove_record(path)
        plan.image_steps.append(f"{'would remove' if dry_run else 'removed'} {path}")
    # 3. anything still naming a missing file is reported
    missing = sorted(f for f in _all_files(domain) if not os.path.exists(f))
    if missing and not dry_run:
        raise DomainError(domain.name, "metadata still names missing files: "
                                       + ", ".join(missing))
    plan.done = not dry_run
    return plan
