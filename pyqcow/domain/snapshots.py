"""Offline external disk-only snapshots (``snapshot``), and reverting to one
(``revert``: new overlays over the snapshot's frozen files)."""

from __future__ import annotations

import copy
import os
import time

from .. import libvirt as lvxml
from ..chain import host_path
from .connection import Disk, Domain, DomainError, _conn, _parse
from .metadata import (
    DomainPlan,
    MetadataChange,
    _apply_metadata,
    _norm,
    _record_path,
    _remove_record,
    _serialize,
    _set_disk,
    _write_record,
)


def overlay_name(path: str, snapshot: str) -> str:
    """libvirt's name for the overlay of ``path``: its last extension replaced by NAME."""
    d, base = os.path.split(path)
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return os.path.join(d, f"{stem}.{snapshot}")


def _disks_to_snapshot(domain: Domain, targets) -> tuple[list[Disk], list[str]]:
    disks = domain.disks()
    by_target = {d.target: d for d in disks}
    if targets:
        unknown = [t for t in targets if t not in by_target]
        if unknown:
            raise DomainError(domain.name, f"no disk {', '.join(unknown)} (disks: "
                                           f"{', '.join(by_target)})")
        chosen = [by_target[t] for t in targets]
    else:
        chosen = [d for d in disks if d.device == "disk" and not d.readonly]
    for d in chosen:
        if d.type != "file" or not d.source:
            raise DomainError(domain.name, f"disk '{d.target}' is not file-backed "
                                           f"(type '{d.type}'); pyqcow snapshots file-backed "
                                           "disks only (pick others with --disk)")
        if d.format not in ("qcow2", "raw"):
            raise DomainError(d.source, f"disk '{d.target}' has format {d.format!r}; pyqcow "
                                        "handles qcow2 and raw")
        if not os.path.exists(d.source):
            raise DomainError(d.source, f"disk '{d.target}' names a file that does not exist")
    if not chosen:
        raise DomainError(domain.name, "no file-backed disk to snapshot")
    skipped = [d.target for d in disks if d not in chosen]
    return chosen, skipped


def snapshot(conn_or_uri, domain_name: str, name: str | None = None, *, disks=(),
             keep_name: bool = False, description: str | None = None,
             dry_run: bool = False) -> DomainPlan:
    """An offline external disk-only snapshot, as ``virsh snapshot-create-as --disk-only``.

    ``keep_name``: the live disk keeps its file name (the content moves to the
    frozen name ``base.NAME`` and the file becomes an empty overlay over it), so
    the domain's ``<source>`` never changes.
    """
    domain = Domain(_conn(conn_or_uri), domain_name)
    domain.require_inactive()
    name = name or str(int(time.time()))
    if any(s.name == name for s in domain.snapshots()):
        raise DomainError(domain.name, f"snapshot {name!r} already exists")
    chosen, skipped = _disks_to_snapshot(domain, disks)
    old = _norm(domain.xml())
    new_el = _parse(old, domain.name)
    plan = DomainPlan("snapshot", domain.name, name)
    overlays: dict[str, lvxml.ChainElement] = {}
    pairs = []
    for d in chosen:
        src = host_path(d.source)
        new = overlay_name(src, name)
        if os.path.lexists(new):
            raise DomainError(new, f"overlay for disk '{d.target}' already exists")
        _require_unlocked(src)
        if keep_name:
            plan.image_steps.append(f"freeze {src} as {new}; {src} becomes an empty overlay "
                                    "over it")
            overlays[d.target] = lvxml.ChainElement(src, "qcow2")
            _set_disk(new_el, d.target, src, "qcow2")  # a raw file becomes a qcow2 overlay
            pairs.append((d, src, new))
        else:
            plan.image_steps.append(f"create {new} (qcow2, backing {src} ({d.format}))")
            overlays[d.target] = lvxml.ChainElement(new, "qcow2")
            _set_disk(new_el, d.target, new, "qcow2")
            pairs.append((d, new, src))
    embedded = old
    if keep_name:
        # the embedded domain names the frozen files; the live definition is unchanged
        emb_el = _parse(old, domain.name)
        for d, _src, frozen in pairs:
            _set_disk(emb_el, d.target, frozen, d.format)
        embedded = _serialize(emb_el)
    current = next((s.name for s in domain.snapshots() if s.current), None)
    snap_xml = lvxml.snapshot_xml(name, overlays, description=description, skipped=skipped,
                                  state="shutoff", parent=current, domain_xml=embedded)
    if _serialize(new_el) != old:
        plan.changes.append(MetadataChange("domain", old, _serialize(new_el)))
    plan.changes.append(MetadataChange(f"snapshot {name}", b"", snap_xml, True))
    if dry_run:
        return plan
    rec = _record_path(domain, chosen[0].source)
    _write_record(rec, {"version": 1, "op": "domain-snapshot", "domain": domain.dom.UUIDString(),
                        "snapshot": name, "created": int(time.time()),
                        "disks": {d.target: [a, b] for d, a, b in pairs},
                        "keep_name": keep_name})
    from ..newimage import create as create_image

    for d, a, b in pairs:
        if keep_name:
            from ..ops.freeze import freeze

            freeze(a, b)
        else:
            create_image(a, None, backing=b, backing_format=d.format)
    _apply_metadata(domain, plan.changes, None)
    _remove_record(rec)
    plan.done = True
    return plan


def _require_unlocked(path: str) -> None:
    from ..hostfile import LOCK_WRITE, lock_conflict

    why = lock_conflict(path, LOCK_WRITE)
    if why:
        raise DomainError(path, f"image is in use: {why}")


def revert(conn_or_uri, domain_name: str, snapshot_name: str, *, dry_run: bool = False) -> DomainPlan:
    """libvirt's external revert, offline: new overlays over the snapshot's frozen files,
    the domain redefined as the snapshot recorded it.  Files no longer used are named,
    not deleted."""
    domain = Domain(_conn(conn_or_uri), domain_name)
    domain.require_inactive()
    snaps = domain.snapshots()
    snap = next((s for s in snaps if s.name == snapshot_name), None)
    if snap is None:
        raise DomainError(domain.name, f"no snapshot named {snapshot_name!r}")
    snap_dom = _parse(snap.xml, f"snapshot {snap.name}").find("domain")
    if snap_dom is None:
        raise DomainError(domain.name, f"snapshot {snap.name!r} has no embedded domain; "
                                       "cannot revert")
    dom_el = copy.deepcopy(snap_dom)
    plan = DomainPlan("revert", domain.name, snap.name)
    creates = []
    for target in snap.overlays:
        frozen, fmt = snap.frozen.get(target, (None, None))
        if frozen is None or not os.path.exists(frozen):
            raise DomainError(domain.name, f"snapshot {snap.name!r}, disk '{target}': frozen "
                                           f"file {frozen} is missing")
        n = 1
        while True:
            new = overlay_name(host_path(frozen), f"{snap.name}-{n}")
            if not os.path.lexists(new):
                break
            n += 1
        plan.image_steps.append(f"create {new} (qcow2, backing {frozen} ({fmt}))")
        _set_disk(dom_el, target, new, "qcow2")
        creates.append((new, frozen, fmt))
    plan.changes.append(MetadataChange("domain", _norm(domain.xml()), _serialize(dom_el)))
    # the snapshot's <disks> now name the overlays in use over its frozen files
    snap_el = _parse(snap.xml, f"snapshot {snap.name}")
    for d in snap_el.findall("disks/disk"):
        if d.get("snapshot") == "external" and d.get("name") in snap.overlays:
            new = dict(zip(snap.overlays, (c[0] for c in creates), strict=False))[d.get("name")]
            d.find("source").set("file", new)
    plan.changes.append(MetadataChange(f"snapshot {snap.name}", _norm(snap.xml),
                                       _serialize(snap_el), True))
    referenced = set()
    for s in snaps:
        referenced.update(s.overlays.values())
        referenced.update(f for f, _ in s.frozen.values())
    plan.unused_files = sorted(
        d.source for d in domain.disks()
        if d.source and d.source not in referenced and os.path.exists(d.source))
    if dry_run:
        return plan
    rec = _record_path(domain, creates[0][1])
    _write_record(rec, {"version": 1, "op": "domain-revert", "domain": domain.dom.UUIDString(),
                        "snapshot": snap.name, "created": int(time.time())})
    from ..newimage import create as create_image

    for new, frozen, fmt in creates:
        create_image(new, None, backing=frozen, backing_format=fmt)
    _apply_metadata(domain, plan.changes, None)
    _remove_record(rec)
    plan.done = True
    return plan
