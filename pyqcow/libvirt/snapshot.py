"""``<domainsnapshot>`` documents for ``virsh snapshot-create --redefine``:
an external disk-only snapshot, checked against the domainsnapshot schema's
vocabulary and, when the domain as it was is given, against its disks."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from pyqcow.errors import DomainXMLError

from .document import XPATH_DISKS, XPATH_SOURCE, XPATH_TARGET_DEV, _Document, _parse, _single
from .markup import _WS, _escape_attr, _escape_text, _LexError, _scan
from .model import (
    SNAPSHOT_DISK_FORMATS,
    SNAPSHOT_STATES,
    ChainElement,
    _bad_xml_chars,
    _check_name,
    _check_path,
)

_WHERE = "<domainsnapshot>"


def _embedded_domain(domain_xml: bytes, where: str) -> tuple[str, _Document]:
    """The <domain> element of domain_xml, verbatim but indented one level."""
    doc = _parse(domain_xml, where)
    if not doc.root.get("type"):
        raise DomainXMLError(where, "<domain> has no type attribute; libvirt cannot use it")
    try:
        spans, tokens = _scan(doc.data)
    except _LexError as exc:
        raise DomainXMLError(where, f"cannot locate elements in the document: {exc}") from exc
    root = spans[0]
    pieces: list[bytes] = []
    pos = root.start
    for start, end in tokens:
        if start < root.start or end > root.end:
            continue
        gap = doc.data[pos:start]
        if gap and not gap.strip(_WS):
            gap = gap.replace(b"\n", b"\n  ")
        pieces.append(gap)
        pieces.append(doc.data[start:end])
        pos = end
    return "  " + b"".join(pieces).decode(doc.encoding), doc


def _check_fields(name: str, description: str | None, parent: str | None, state: str,
                  creation_time: int | None) -> int:
    """Check the snapshot's own fields; the creation time (now if None)."""
    where = _WHERE
    _check_name(name, where, "snapshot name")
    if "/" in name:
        raise DomainXMLError(where, f"snapshot name {name!r} contains '/'")
    if description is not None and (
        not isinstance(description, str)
        or _bad_xml_chars(description.replace("\n", " ").replace("\t", " ").replace("\r", " "))
    ):
        raise DomainXMLError(where, f"bad description {description!r}")
    if parent is not None:
        _check_name(parent, where, "parent snapshot name")
    if state not in SNAPSHOT_STATES:
        raise DomainXMLError(
            where, f"state {state!r} is not one of {', '.join(sorted(SNAPSHOT_STATES))}"
        )
    if creation_time is None:
        creation_time = int(time.time())
    if isinstance(creation_time, bool) or not isinstance(creation_time, int) or creation_time < 0:
        raise DomainXMLError(where, f"bad creation time {creation_time!r}")
    return creation_time


def _check_disks(disks: Mapping[str, ChainElement],
                 skipped: Iterable[str]) -> tuple[list[tuple[str, ChainElement]], list[str]]:
    """The external overlays (name, element) and the skipped disk names, checked."""
    where = _WHERE
    if not isinstance(disks, Mapping) or not disks:
        raise DomainXMLError(where, "a snapshot needs at least one disk")
    external: list[tuple[str, ChainElement]] = []
    for disk_name, element in disks.items():
        _check_name(disk_name, where, "disk name")
        what = f"disk '{disk_name}'"
        if not hasattr(element, "path") or not hasattr(element, "format"):
            raise DomainXMLError(where, f"{what}: not a ChainElement: {element!r}")
        path = _check_path(element.path, where, what)
        if element.format not in SNAPSHOT_DISK_FORMATS:
            raise DomainXMLError(
                where, f"{what}: an external snapshot overlay must be qcow2, not {element.format!r}"
            )
        external.append((disk_name, ChainElement(path, element.format)))
    skipped_names = [_check_name(s, where, "skipped disk name") for s in skipped]
    names = [n for n, _ in external] + skipped_names
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DomainXMLError(where, f"disk {', '.join(duplicates)} named more than once")
    return external, skipped_names


def _domain_disks(domain_xml: bytes, names: list[str]) -> tuple[str, list[str]]:
    """The embedded domain's text, and its disks that ``names`` do not mention (by
    target, source file or source dev); names it does not know are refused."""
    domain_where = f"{_WHERE} <domain>"
    domain_text, doc = _embedded_domain(domain_xml, domain_where)
    known: dict[str, str] = {}
    order: list[str] = []
    for disk in XPATH_DISKS(doc.root):
        devs = XPATH_TARGET_DEV(disk)
        if not devs:
            continue
        dev = str(devs[0])
        order.append(dev)
        known[dev] = dev
        source = _single(XPATH_SOURCE(disk), f"disk '{dev}'", domain_where)
        for attr in ("file", "dev"):
            if source is not None and source.get(attr):
                known[source.get(attr)] = dev
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DomainXMLError(
            domain_where,
            f"no disk named {', '.join(unknown)} (disk targets: {', '.join(order) or 'none'})",
        )
    mentioned = {known[n] for n in names}
    return domain_text, [dev for dev in order if dev not in mentioned]


_Q = "'"  # the quote of every attribute written


def _attr(key: str, value: str) -> str:
    return f"{key}={_Q}{_escape_attr(value, _Q)}{_Q}"


def _render(name: str, description: str | None, state: str, parent: str | None,
            creation_time: int, external: list[tuple[str, ChainElement]],
            skipped_names: list[str], domain_text: str | None) -> bytes:
    lines = ["<domainsnapshot>", f"  <name>{_escape_text(name)}</name>"]
    if description is not None:
        lines.append(f"  <description>{_escape_text(description)}</description>")
    lines.append(f"  <state>{state}</state>")
    if parent is not None:
        lines += ["  <parent>", f"    <name>{_escape_text(parent)}</name>", "  </parent>"]
    lines.append(f"  <creationTime>{creation_time}</creationTime>")
    lines.append(f"  <memory {_attr('snapshot', 'no')}/>")
    lines.append("  <disks>")
    for disk_name, element in external:
        lines += [
            f"    <disk {_attr('name', disk_name)} {_attr('snapshot', 'external')} "
            f"{_attr('type', 'file')}>",
            f"      <driver {_attr('type', element.format)}/>",
            f"      <source {_attr('file', element.path)}/>",
            "    </disk>",
        ]
    for disk_name in skipped_names:
        lines.append(f"    <disk {_attr('name', disk_name)} {_attr('snapshot', 'no')}/>")
    lines.append("  </disks>")
    if domain_text is not None:
        lines.append(domain_text)
    lines.append("</domainsnapshot>")
    return ("\n".join(lines) + "\n").encode("utf-8")


def snapshot_xml(
    name: str,
    disks: Mapping[str, ChainElement],
    *,
    description: str | None = None,
    skipped: Iterable[str] = (),
    creation_time: int | None = None,
    state: str = "disk-snapshot",
    parent: str | None = None,
    domain_xml: bytes | None = None,
) -> bytes:
    """A ``<domainsnapshot>`` document describing an external disk snapshot.

    ``disks`` maps a disk target (``vda``) to the new overlay it now writes to
    (qcow2); ``skipped`` names disks left out (``snapshot='no'``).

    ``virsh snapshot-create DOMAIN FILE --redefine`` needs ``<name>``,
    ``<creationTime>`` (seconds since the epoch; default now) and ``<state>``
    (``disk-snapshot`` for a disk-only snapshot); for a snapshot libvirt does
    not know yet it also needs the full ``<domain>`` as it was when the
    snapshot was taken (the disks still naming the old, now backing, files):
    pass that as ``domain_xml``.  Its UUID must be the domain's.  When it is
    given, every disk it names and ``disks``/``skipped`` do not mention is
    added with ``snapshot='no'`` (libvirt would otherwise invent overlay
    names for them), and names it does not know are refused.  ``parent``
    names the parent snapshot, if any.
    """
    creation_time = _check_fields(name, description, parent, state, creation_time)
    external, skipped_names = _check_disks(disks, skipped)
    domain_text = None
    if domain_xml is not None:
        names = [n for n, _ in external] + skipped_names
        domain_text, unmentioned = _domain_disks(domain_xml, names)
        skipped_names += unmentioned
    return _render(name, description, state, parent, creation_time, external, skipped_names,
                   domain_text)
