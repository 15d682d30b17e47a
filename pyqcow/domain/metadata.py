"""The metadata side of a domain operation: edits of the domain and snapshot XML
(file renames, disk sources), the plan shown to the user (DomainPlan with its
diffs), the domain's intent record, and applying the changes in libvirt's
order."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lxml import etree

from .. import libvirt as lvxml
from ..chain import host_path
from ..errors import OperationError
from .connection import Domain, DomainError, _parse


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
    from ..ops.intent import write_record

    try:
        write_record(path, data)
    except OSError as e:
        raise OperationError(path, f"cannot write the intent record: {e.strerror}") from None


def _remove_record(path: str) -> None:
    from ..hostfile import fsync_dir

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
