"""Reaching libvirt and reading what it holds: the connection (libvirt-python,
imported only here, on first use), the domain (state, inactive definition,
disks) and its snapshots' metadata; writing metadata back (define, redefine,
drop) with libvirt's refusals as DomainError."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lxml import etree

from .. import libvirt as lvxml
from ..errors import DomainXMLError, QcowError

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


def _all_files(domain: Domain, snaps: list[Snapshot] | None = None) -> set[str]:
    """Every file the definition (file disks) and the snapshots' metadata name."""
    out = {d.source for d in domain.disks() if d.source and d.type == "file"}
    for s in domain.snapshots() if snaps is None else snaps:
        out.update(s.overlays.values())
        out.update(f for f, _ in s.frozen.values())
    return out
