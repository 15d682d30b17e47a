"""libvirt-managed domains: offline external snapshots, merges and reverts through
the libvirt API, with the domain definition and every snapshot's metadata kept true.

libvirt-python is an optional extra (``pyqcow[libvirt]``), imported only here.
Functions take a connection (``libvirt.virConnect``) or a URI; without one,
``$LIBVIRT_DEFAULT_URI`` else ``qemu:///system`` (virsh's rule).

The model (libvirt's own, for a disk-only external snapshot of a shut-off
domain): snapshot NAME of a disk whose file is ``base.qcow2`` creates the
overlay ``base.NAME``; the domain then writes to the overlay; the snapshot's
``<disks>`` names the overlay, and its embedded ``<domain>`` names the files as
they were (the *frozen* files).  Deleting (merging) snapshot S merges S's
overlay (TOP) with its frozen file (BASE) on every disk it covers, with the
engine's merge; every reference to the file that goes away, in the domain
definition and in every remaining snapshot (``<disks>`` and embedded domain),
then names the kept file, and S's metadata is removed (libvirt re-parents its
children).

Every check happens before the first write; an intent record (one per disk
merge, plus one for the metadata) lets :func:`sync` finish after a crash.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field

from lxml import etree

from . import libvirt as lvxml
from .chain import host_path, open_image
from .errors import DomainXMLError, OperationError, QcowError

DEFAULT_URI = "qemu:///system"


class DomainError(QcowError):
    """A libvirt domain or snapshot cannot be used as asked."""


# -- connecting ------------------------------------------------------------------------
_EVENT_LOOP = False


def _libvirt():
    try:
        import libvirt
    except ImportError:
        raise DomainError(None, "libvirt-python is not installed (pip install 'pyqcow[libvirt]')") \
            from None
    global _EVENT_LOOP
    if not _EVENT_LOOP:
        # the embedded driver (qemu:///embed) needs an event loop; silence libvirt's
        # own printing of errors: they come back as exceptions
        libvirt.virEventRegisterDefaultImpl()
        libvirt.registerErrorHandler(lambda *_: None, None)
        _EVENT_LOOP = True
    return libvirt


def connect(uri: str | None = None):
    """A read-write connection: ``uri``, else $LIBVIRT_DEFAULT_URI, else qemu:///system."""
    lv = _libvirt()
    uri = uri or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI
    try:
        return lv.open(uri)
    except lv.libvirtError as e:
        raise DomainError(uri, f"cannot connect to libvirt: {e.get_error_message()}") from None


def _conn(conn_or_uri):
    if conn_or_uri is None or isinstance(conn_or_uri, str):
        return connect(conn_or_uri)
    return conn_or_uri


def lookup(conn, name: str):
    lv = _libvirt()
    for how in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return how(name)
        except lv.libvirtError:
            continue
    raise DomainError(name, "no such domain (by name or UUID)")


# -- reading a domain ------------------------------------------------------------------------
@dataclass
class Disk:
    target: str
    type: str
    device: str
    source: str | None
    format: str
    readonly: bool = False


@dataclass
class Snapshot:
    name: str
    parent: str | None
    current: bool
    xml: bytes
    #: target -> overlay file the snapshot created (its <disks>, snapshot='external')
    overlays: dict[str, str] = field(default_factory=dict)
    #: target -> (file, format) as the embedded domain names it (the frozen files)
    frozen: dict[str, tuple[str, str]] = field(default_factory=dict)
    creation_time: int = 0


def _parse(xml: bytes | str, where: str):
    if isinstance(xml, str):
        xml = xml.encode()
    try:
        return etree.fromstring(xml, lvxml.PARSER)
    except etree.XMLSyntaxError as e:
        raise DomainXMLError(where, f"bad XML from libvirt: {e}") from None


def _disks_of(domain_el) -> list[Disk]:
    out = []
    for d in domain_el.findall("devices/disk"):
        t = d.find("target")
        if t is None or not t.get("dev"):
            continue
        src = d.find("source")
        drv = d.find("driver")
        path = None
        if src is not None:
            path = src.get("file") or src.get("dev") or src.get("name") or src.get("volume")
        out.append(Disk(target=t.get("dev"), type=d.get("type", "file"),
                        device=d.get("device", "disk"), source=path,
                        format=(drv.get("type") if drv is not None and drv.get("type") else "raw"),
                        readonly=d.find("readonly") is not None))
    return out


class Domain:
    """A libvirt domain as pyqcow sees it: its inactive definition and snapshots."""

    def __init__(self, conn, name: str) -> None:
        self.lv = _libvirt()
        self.conn = conn
        self.dom = lookup(conn, name)
        self.name = self.dom.name()

    # -- state
    def is_active(self) -> bool:
        return bool(self.dom.isActive())

    def require_inactive(self) -> None:
        if self.is_active():
            state = self.dom.state()[0]
            what = "paused" if state == self.lv.VIR_DOMAIN_PAUSED else "running"
            raise DomainError(self.name, f"domain is {what}; pyqcow works on shut-off domains "
                                         "only (shut it down first)")

    def xml(self) -> bytes:
        flags = self.lv.VIR_DOMAIN_XML_INACTIVE | self.lv.VIR_DOMAIN_XML_SECURE
        return self.dom.XMLDesc(flags).encode()

    def disks(self) -> list[Disk]:
        return _disks_of(_parse(self.xml(), self.name))

    def snapshots(self) -> list[Snapshot]:
        out = []
        for s in self.dom.listAllSnapshots(0):
            xml = s.getXMLDesc(self.lv.VIR_DOMAIN_SNAPSHOT_XML_SECURE).encode()
            out.append(_snapshot_from_xml(xml, s.isCurrent(0)))
        by_time = sorted(out, key=lambda x: (x.creation_time, x.name))
        return by_time

    def snapshot(self, name: str) -> Snapshot:
        for s in self.snapshots():
            if s.name == name:
                return s
        raise DomainError(self.name, f"no snapshot named {name!r}")

    # -- writing metadata
    def define(self, xml: bytes) -> None:
        try:
            self.conn.defineXML(xml.decode())
        except self.lv.libvirtError as e:
            raise DomainError(self.name, f"libvirt refused the new definition: "
                                         f"{e.get_error_message()}") from None

    def redefine_snapshot(self, xml: bytes, current: bool) -> None:
        flags = self.lv.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
        if current:
            flags |= self.lv.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
        try:
            self.dom.snapshotCreateXML(xml.decode(), flags)
        except self.lv.libvirtError as e:
            raise DomainError(self.name, f"libvirt refused the snapshot metadata: "
                                         f"{e.get_error_message()}") from None

    def delete_snapshot_metadata(self, name: str) -> None:
        try:
            snap = self.dom.snapshotLookupByName(name, 0)
        except self.lv.libvirtError:
            return  # already gone (idempotent)
        try:
            snap.delete(self.lv.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        except self.lv.libvirtError as e:
            raise DomainError(self.name, f"libvirt refused to drop snapshot {name!r}: "
                                         f"{e.get_error_message()}") from None


def _snapshot_from_xml(xml: bytes, current: bool) -> Snapshot:
    root = _parse(xml, "<domainsnapshot>")
    name = root.findtext("name")
    parent = root.findtext("parent/name")
    ct = root.findtext("creationTime")
    snap = Snapshot(name=name, parent=parent, current=bool(current), xml=xml,
                    creation_time=int(ct) if ct and ct.isdigit() else 0)
    for d in root.findall("disks/disk"):
        if d.get("snapshot") == "external":
            src = d.find("source")
            if src is not None and src.get("file"):
                snap.overlays[d.get("name")] = src.get("file")
    dom = root.find("domain")
    if dom is not None:
        for disk in _disks_of(dom):
            if disk.source:
                snap.frozen[disk.target] = (disk.source, disk.format)
    return snap


# -- XML edits ---------------------------------------------------------------------------------
def _serialize(el) -> bytes:
    return etree.tostring(el, encoding="unicode").encode() + b"\n"


def _norm(xml: bytes) -> bytes:
    """libvirt's XML in the serialization the edited copies use (for honest diffs)."""
    return _serialize(_parse(xml, "<libvirt XML>"))


def _set_disk(domain_el, target: str, path: str, fmt: str) -> None:
    for d in domain_el.findall("devices/disk"):
        t = d.find("target")
        if t is None or t.get("dev") != target:
            continue
        src = d.find("source")
        if src is None:
            src = etree.SubElement(d, "source")
        src.set("file", path)
        drv = d.find("driver")
        if drv is None:
            drv = etree.Element("driver", name="qemu")
            d.insert(0, drv)
        drv.set("type", fmt)
        for bs in d.findall("backingStore"):
            d.remove(bs)  # libvirt reads the chain from the images
        return
    raise DomainError(target, "no such disk in the domain")


def _rename_files(el, renames: dict[str, tuple[str, str]]) -> bool:
    """Every ``<source file>`` naming a key of ``renames`` names its value (path, format)."""
    changed = False
    for src in el.iter("source"):
        f = src.get("file")
        if f is None:
            continue
        new = renames.get(f) or renames.get(host_path(f))
        if new is None:
            continue
        src.set("file", new[0])
        parent = src.getparent()
        drv = parent.find("driver")
        if drv is not None and drv.get("type") and parent.tag == "disk":
            drv.set("type", new[1])
        fmt = parent.find("format")
        if fmt is not None and parent.tag == "backingStore":
            fmt.set("type", new[1])
        changed = True
    # a backingStore naming the file that went away is dropped (the images hold the chain)
    for bs in list(el.iter("backingStore")):
        src = bs.find("source")
        if src is not None and src.get("file") is not None and not os.path.exists(src.get("file")):
            bs.getparent().remove(bs)
            changed = True
    return changed


@dataclass
class MetadataChange:
    """One libvirt object rewritten: the domain or a snapshot."""

    what: str  # "domain" or "snapshot NAME"
    old: bytes
    new: bytes
    current: bool = False

    def diff(self) -> str:
        return lvxml.unified_diff(self.old, self.new, self.what)


# -- the plan of an operation -------------------------------------------------------------------
@dataclass
class DomainPlan:
    operation: str
    domain: str
    snapshot: str | None
    image_steps: list[str] = field(default_factory=list)
    changes: list[MetadataChange] = field(default_factory=list)
    delete_snapshot: str | None = None
    unused_files: list[str] = field(default_factory=list)
    merges: list[dict] = field(default_factory=list)
    done: bool = False

    def as_json(self) -> dict:
        return {
            "operation": self.operation, "domain": self.domain, "snapshot": self.snapshot,
            "image_steps": self.image_steps, "merges": self.merges,
            "metadata": [{"object": c.what, "diff": c.diff()} for c in self.changes],
            "delete_snapshot_metadata": self.delete_snapshot,
            "unused_files": self.unused_files, "done": self.done,
        }

    def human(self) -> str:
        lines = [f"{self.operation} {self.domain}" + (f" {self.snapshot}" if self.snapshot else "")]
        lines += [f"  {i}. {s}" for i, s in enumerate(self.image_steps, 1)]
        if self.delete_snapshot:
            lines.append(f"  drop snapshot metadata {self.delete_snapshot!r} "
                         "(its children are re-parented)")
        for f in self.unused_files:
            lines.append(f"  no longer used (not deleted): {f}")
        text = "\n".join(lines) + "\n"
        for c in self.changes:
            text += c.diff()
        return text


# -- record (metadata step) -------------------------------------------------------------------------
def _record_path(domain: Domain, anchor: str) -> str:
    d = os.path.dirname(host_path(anchor))
    return os.path.join(d, f".{domain.dom.UUIDString()}.pyqcow-domain.json")


def _write_record(path: str, data: dict) -> None:
    from .ops.intent import _write

    try:
        _write(path, data)
    except OSError as e:
        raise OperationError(path, f"cannot write the intent record: {e.strerror}") from None


def _remove_record(path: str) -> None:
    from .hostfile import fsync_dir

    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(path)


def _apply_metadata(domain: Domain, changes: list[MetadataChange], delete: str | None) -> None:
    """Define the domain, drop ``delete``'s metadata, then redefine the snapshots.

    The deletion comes before the redefinitions: libvirt's own deletion rewrites
    the children's embedded domains as if the overlay had been committed into
    its backing file, which is wrong when the other name was kept.
    """
    for c in changes:
        if c.what == "domain":
            domain.define(c.new)
    if delete:
        domain.delete_snapshot_metadata(delete)
    for c in changes:
        if c.what.startswith("snapshot "):
            domain.redefine_snapshot(c.new, c.current)


def _metadata_with(domain: Domain, renames: dict[str, tuple[str, str]], *,
                   skip: str | None = None) -> list[MetadataChange]:
    """The domain and every snapshot (but ``skip``) with ``renames`` applied."""
    out = []
    old = _norm(domain.xml())
    el = _parse(old, domain.name)
    if _rename_files(el, renames):
        out.append(MetadataChange("domain", old, _serialize(el)))
    snaps = domain.snapshots()
    gone = next((s for s in snaps if s.name == skip), None)
    for s in snaps:
        if s.name == skip:
            continue
        el = _parse(s.xml, f"snapshot {s.name}")
        changed = False
        if gone is not None and s.parent == gone.name:
            # re-parented to the deleted snapshot's parent (as libvirt does)
            p = el.find("parent")
            if gone.parent:
                p.find("name").text = gone.parent
            else:
                el.remove(p)
            changed = True
        if _rename_files(el, renames) or changed:
            out.append(MetadataChange(f"snapshot {s.name}", _norm(s.xml), _serialize(el),
                                      s.current))
    return out


# -- snapshot ------------------------------------------------------------------------------------------
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
    from .newimage import create as create_image

    for d, a, b in pairs:
        if keep_name:
            from .ops.freeze import freeze

            freeze(a, b)
        else:
            create_image(a, None, backing=b, backing_format=d.format)
    _apply_metadata(domain, plan.changes, None)
    _remove_record(rec)
    plan.done = True
    return plan


def _require_unlocked(path: str) -> None:
    from .hostfile import LOCK_WRITE, lock_conflict

    why = lock_conflict(path, LOCK_WRITE)
    if why:
        raise DomainError(path, f"image is in use: {why}")


# -- merge ------------------------------------------------------------------------------------------
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
            from .chain import resolve_backing

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
    from .ops import merge as merge_op

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


# -- revert -------------------------------------------------------------------------------------------
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
    from .newimage import create as create_image

    for new, frozen, fmt in creates:
        create_image(new, None, backing=frozen, backing_format=fmt)
    _apply_metadata(domain, plan.changes, None)
    _remove_record(rec)
    plan.done = True
    return plan


# -- sync ----------------------------------------------------------------------------------------------
def sync(conn_or_uri, domain_name: str, *, dry_run: bool = False) -> DomainPlan:
    """Make the definition and every snapshot's metadata true to the images on disk after
    an interruption, from the intent records (idempotent)."""
    from .ops import intent

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
                plan.image_steps += intent._finish(rec, dry_run)
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


def _all_files(domain: Domain, snaps: list[Snapshot] | None = None) -> set[str]:
    """Every file the definition (file disks) and the snapshots' metadata name."""
    out = {d.source for d in domain.disks() if d.source and d.type == "file"}
    for s in domain.snapshots() if snaps is None else snaps:
        out.update(s.overlays.values())
        out.update(f for f, _ in s.frozen.values())
    return out


# -- show ------------------------------------------------------------------------------------------------
def show(conn_or_uri, domain_name: str) -> dict:
    """The snapshot tree, each disk's chain with sizes, and each snapshot's merge costs."""
    from .ops.merge import plan_merge

    domain = Domain(_conn(conn_or_uri), domain_name)
    out: dict = {"domain": domain.name, "uuid": domain.dom.UUIDString(),
                 "active": domain.is_active(), "disks": [], "snapshots": []}
    for d in domain.disks():
        entry: dict = {"target": d.target, "type": d.type, "device": d.device,
                       "source": d.source, "format": d.format, "layers": []}
        if d.type == "file" and d.source and os.path.exists(d.source):
            try:
                with open_image(d.source, "r", format=d.format, force_share=True) as img:
                    for layer in img.chain:
                        st = os.stat(layer.path)
                        entry["layers"].append({
                            "file": host_path(layer.path), "format": layer.format,
                            "virtual_size": layer.virtual_size,
                            "allocated_bytes": st.st_blocks * 512,
                            "dirty_bytes": _own_bytes(layer),
                        })
            except QcowError as e:
                entry["error"] = str(e)
        out["disks"].append(entry)
    for s in domain.snapshots():
        snap = {"name": s.name, "parent": s.parent, "current": s.current,
                "creation_time": s.creation_time, "disks": []}
        for target, top in s.overlays.items():
            frozen = s.frozen.get(target, (None, None))[0]
            disk = {"disk": target, "overlay": top, "frozen": frozen}
            try:
                mp = plan_merge(top, keep="base")
                disk.update(commit_bytes=mp.commit_bytes, stream_bytes=mp.stream_bytes)
            except (QcowError, OSError) as e:
                disk["error"] = str(e)
            snap["disks"].append(disk)
        out["snapshots"].append(snap)
    return out


def _own_bytes(img) -> int:
    """Guest bytes this layer itself holds (what it changed over its backing)."""
    if img.format != "qcow2":
        return os.stat(img.path).st_blocks * 512
    from .mapping import allocated_bytes

    return allocated_bytes(img)


def show_human(info: dict) -> str:
    lines = [f"domain {info['domain']} ({info['uuid']})"
             + (" [active]" if info["active"] else " [shut off]")]
    for d in info["disks"]:
        lines.append(f"  disk {d['target']} ({d['type']}, {d['device']}): {d['source']}")
        for i, layer in enumerate(d["layers"]):
            lines.append(f"    {'└─' if i else '  '} {layer['file']} ({layer['format']}, "
                         f"{layer['virtual_size']} bytes, allocated {layer['allocated_bytes']}, "
                         f"dirty {layer['dirty_bytes']})")
        if d.get("error"):
            lines.append(f"    error: {d['error']}")
    if info["snapshots"]:
        lines.append("  snapshots:")
        children: dict = {}
        for s in info["snapshots"]:
            children.setdefault(s["parent"], []).append(s)

        def walk(parent, depth):
            for s in children.get(parent, []):
                lines.append("    " + "  " * depth + f"{s['name']}"
                             + (" (current)" if s["current"] else ""))
                for d in s["disks"]:
                    cost = (f"merge copies commit {d['commit_bytes']} / stream "
                            f"{d['stream_bytes']} bytes" if "commit_bytes" in d
                            else d.get("error", ""))
                    lines.append("    " + "  " * depth + f"  {d['disk']}: {d['overlay']} over "
                                 f"{d['frozen']}; {cost}")
                walk(s["name"], depth + 1)

        walk(None, 0)
    return "\n".join(lines) + "\n"


__all__ = ["DomainError", "DomainPlan", "connect", "merge", "revert", "show",
           "snapshot", "sync"]
