"""Reading a document the hardened way: the one lxml parser (entities, network
and DTDs off), the named XPaths, and the checks every document passes before
anything looks at it (no entities, no external DTD, the expected root, an
ASCII-compatible encoding so that byte splicing is exact)."""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass

from lxml import etree

from pyqcow.errors import DomainXMLError

from . import markup

#: A domain XML bigger than this is refused by :func:`read_domain`.
MAX_DOMAIN_XML_SIZE = 16 * 1024 * 1024

#: Encodings whose markup characters are the ASCII bytes, so that the byte
#: splicing is exact.  libvirt itself only ever writes UTF-8.
_ASCII_COMPATIBLE_CODECS = frozenset({"utf-8", "ascii", "latin-1"})

#: The one parser used for every document: nothing is fetched, no entity is
#: expanded, no DTD is loaded; comments and whitespace survive.
PARSER = etree.XMLParser(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    huge_tree=False,
    remove_blank_text=False,
    remove_comments=False,
    remove_pis=False,
    strip_cdata=False,
)

#: The disk(s) of the domain whose ``<target dev>`` is ``$t``.
XPATH_DISK_BY_TARGET = etree.XPath("devices/disk[target/@dev=$t]")
#: Every disk target of the domain, for error messages.
XPATH_DISK_TARGETS = etree.XPath("devices/disk/target/@dev")
#: Disks of the domain (snapshot cross-checks).
XPATH_DISKS = etree.XPath("devices/disk")
#: Children of a ``<disk>`` or ``<backingStore>``.
XPATH_DRIVER = etree.XPath("driver")
XPATH_SOURCE = etree.XPath("source")
XPATH_FORMAT = etree.XPath("format")
XPATH_BACKING_STORE = etree.XPath("backingStore")
XPATH_TARGET_DEV = etree.XPath("target/@dev")

_DEFAULT_WHERE = "<domain XML>"


def _where(xml_path: str | os.PathLike | None) -> str:
    return os.fspath(xml_path) if xml_path is not None else _DEFAULT_WHERE


@dataclass(slots=True)
class _Document:
    data: bytes
    root: etree._Element
    encoding: str  # Python codec name
    where: str


def _codec_name(encoding: str | None) -> str | None:
    try:
        name = codecs.lookup(encoding or "utf-8").name
    except LookupError:
        return None
    if name in _ASCII_COMPATIBLE_CODECS or name.startswith(("iso8859", "cp125")):
        return name
    return None


def _parse(xml: bytes, where: str, *, root_name: str = "domain") -> _Document:
    if not isinstance(xml, (bytes, bytearray, memoryview)):
        raise DomainXMLError(where, f"expected the XML document as bytes, got {type(xml).__name__}")
    data = bytes(xml)
    # Refuse entity declarations before libxml2 sees them at all.
    try:
        doctype = markup._prolog_doctype(data)
    except markup._LexError:
        doctype = None  # not well-formed: lxml says why below
    if doctype is not None and b"<!ENTITY" in data[doctype[0] : doctype[1]]:
        raise DomainXMLError(where, "the DOCTYPE declares entities; refusing to parse it")
    try:
        root = etree.fromstring(data, PARSER)
    except etree.XMLSyntaxError as exc:
        raise DomainXMLError(where, f"not well-formed XML: {exc}") from exc
    except ValueError as exc:  # e.g. an encoding lxml does not know
        raise DomainXMLError(where, f"cannot parse XML: {exc}") from exc
    docinfo = root.getroottree().docinfo
    dtd = docinfo.internalDTD
    if dtd is not None and any(True for _ in dtd.entities()):
        raise DomainXMLError(where, "the DOCTYPE declares entities; refusing to parse it")
    if docinfo.system_url or docinfo.public_id:
        raise DomainXMLError(
            where, "the DOCTYPE names an external DTD; pyqcow does not fetch or trust it"
        )
    if next(root.iter(etree.Entity), None) is not None:
        raise DomainXMLError(where, "the document contains entity references; refusing it")
    if root.tag != root_name:
        qname = etree.QName(root)
        shown = f"{{{qname.namespace}}}{qname.localname}" if qname.namespace else qname.localname
        raise DomainXMLError(where, f"root element is <{shown}>, not <{root_name}>")
    encoding = _codec_name(docinfo.encoding)
    if encoding is None:
        raise DomainXMLError(
            where, f"encoding {docinfo.encoding!r} is not supported (libvirt writes UTF-8)"
        )
    return _Document(data, root, encoding, where)


def _single(nodes: list, what: str, where: str) -> etree._Element | None:
    if len(nodes) > 1:
        raise DomainXMLError(where, f"{what} has {len(nodes)} <{nodes[0].tag}> elements")
    return nodes[0] if nodes else None


def read_domain(path: str | os.PathLike) -> bytes:
    """Read a domain XML file; DomainXMLError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DOMAIN_XML_SIZE + 1)
    except OSError as exc:
        raise DomainXMLError(path, f"cannot read domain XML: {exc.strerror or exc}") from exc
    if len(data) > MAX_DOMAIN_XML_SIZE:
        raise DomainXMLError(path, f"domain XML is larger than {MAX_DOMAIN_XML_SIZE} bytes")
    return data
