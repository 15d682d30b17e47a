"""One ``<disk>`` of a domain XML and the chain it names: reading it
(``disk_chain``, ``disk_source``), rewriting it through the splice
(``rewrite_disk``, self-checked) and updating a file (``update_disk``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from lxml import etree

from pyqcow.errors import DomainXMLError

from .atomic import write_atomic
from .document import (
    XPATH_BACKING_STORE,
    XPATH_DISK_BY_TARGET,
    XPATH_DISK_TARGETS,
    XPATH_DRIVER,
    XPATH_FORMAT,
    XPATH_SOURCE,
    _Document,
    _parse,
    _single,
    _where,
    read_domain,
)
from .model import ChainElement, _check_chain
from .splice import _rewrite


def _find_disk(doc: _Document, target: str) -> etree._Element:
    where = doc.where
    if not isinstance(target, str) or not target:
        raise DomainXMLError(where, f"bad disk target {target!r}")
    disks = XPATH_DISK_BY_TARGET(doc.root, t=target)
    if not disks:
        targets = [str(t) for t in XPATH_DISK_TARGETS(doc.root)]
        known = ", ".join(targets) if targets else "the domain has no disks"
        raise DomainXMLError(where, f"no disk with target dev='{target}' (disk targets: {known})")
    if len(disks) > 1:
        raise DomainXMLError(where, f"{len(disks)} disks have target dev='{target}'")
    disk = disks[0]
    disk_type = disk.get("type", "file")  # libvirt's default disk type is file
    if disk_type != "file":
        raise DomainXMLError(
            where,
            f"disk '{target}' is type='{disk_type}', not type='file'; "
            "only file-backed disks name an image chain",
        )
    return disk


def _disk_source(disk: etree._Element, target: str, where: str) -> ChainElement:
    what = f"disk '{target}'"
    driver = _single(XPATH_DRIVER(disk), what, where)
    source = _single(XPATH_SOURCE(disk), what, where)
    if source is None:
        raise DomainXMLError(where, f"{what} has no <source>")
    path = source.get("file")
    if not path:
        raise DomainXMLError(where, f"{what} has no <source file=...>")
    # Without <driver type>, libvirt's qemu driver uses raw (no probing).
    fmt = driver.get("type") if driver is not None else None
    return ChainElement(path, fmt or "raw")


def _disk_chain(disk: etree._Element, target: str, where: str) -> list[ChainElement]:
    chain = [_disk_source(disk, target, where)]
    node = disk
    while True:
        what = (
            f"disk '{target}'"
            if node is disk
            else f"backing store {len(chain) - 1} of disk '{target}'"
        )
        backing = _single(XPATH_BACKING_STORE(node), what, where)
        # No <backingStore>: libvirt would probe the image; the XML names no more.
        # <backingStore/> without type: the explicit end of the chain.
        if backing is None or backing.get("type") is None:
            return chain
        what = f"backing store {len(chain)} of disk '{target}'"
        kind = backing.get("type")
        if kind != "file":
            raise DomainXMLError(
                where, f"{what} is type='{kind}', not type='file'; only file chains are handled"
            )
        fmt_el = _single(XPATH_FORMAT(backing), what, where)
        fmt = fmt_el.get("type") if fmt_el is not None else None
        if not fmt:
            raise DomainXMLError(where, f"{what} has no <format type=...>")
        source = _single(XPATH_SOURCE(backing), what, where)
        path = source.get("file") if source is not None else None
        if not path:
            raise DomainXMLError(where, f"{what} has no <source file=...>")
        chain.append(ChainElement(path, fmt))
        node = backing


def disk_chain(
    xml: bytes, target: str, *, xml_path: str | os.PathLike | None = None
) -> list[ChainElement]:
    """The chain the XML names for disk ``target``: its source, then each
    ``<backingStore>`` in turn.  A disk without ``<backingStore>`` gives a
    chain of length 1 (libvirt would probe the rest; the XML does not say)."""
    doc = _parse(xml, _where(xml_path))
    disk = _find_disk(doc, target)
    return _disk_chain(disk, target, doc.where)


def disk_source(
    xml: bytes, target: str, *, xml_path: str | os.PathLike | None = None
) -> ChainElement:
    """The disk's ``<source file>`` and ``<driver type>`` (raw if absent)."""
    doc = _parse(xml, _where(xml_path))
    disk = _find_disk(doc, target)
    return _disk_source(disk, target, doc.where)


def rewrite_disk(
    xml: bytes,
    target: str,
    chain: Sequence[ChainElement],
    *,
    xml_path: str | os.PathLike | None = None,
) -> bytes:
    """Return the document with disk ``target`` naming exactly ``chain``.

    ``chain[0]`` becomes ``<driver type>`` (a ``<driver name='qemu'>`` is
    created if missing) and ``<source file>`` (other attributes and children
    of ``<source>`` stay); ``chain[1:]`` becomes a nested ``<backingStore>``
    chain ending with ``<backingStore/>``, replacing any existing one.  Every
    byte outside that ``<disk>`` element is unchanged.  Paths must be
    absolute; formats ``qcow2`` or ``raw`` (raw only as the last element).
    """
    where = _where(xml_path)
    checked = _check_chain(chain, where)
    doc = _parse(xml, where)
    disk = _find_disk(doc, target)
    new = _rewrite(doc, disk, checked)
    # Self-check: the result parses and names the chain we were asked for.
    try:
        result = disk_chain(new, target, xml_path=xml_path)
    except DomainXMLError as exc:
        raise DomainXMLError(where, f"internal error: rewritten XML does not parse: {exc}") from exc
    if result != checked:
        raise DomainXMLError(where, "internal error: rewritten XML does not name the chain")
    return new


def update_disk(
    domain_xml_path: str | os.PathLike, target: str, chain: Sequence[ChainElement]
) -> bytes:
    """Read the domain XML, rewrite disk ``target`` to name ``chain`` and write
    it back atomically (not at all if nothing changes).  Returns the new bytes."""
    old = read_domain(domain_xml_path)
    new = rewrite_disk(old, target, chain, xml_path=domain_xml_path)
    if new != old:
        write_atomic(domain_xml_path, new)
    return new
