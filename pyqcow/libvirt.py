"""Keep a libvirt domain XML true to a disk image chain.

This module never opens an image.  It takes a chain description (absolute
paths and formats, top first) and rewrites one ``<disk>`` of a domain XML so
that its ``<driver type>``, ``<source file>`` and nested ``<backingStore>``
elements name exactly that chain, terminated by an empty ``<backingStore/>``
(libvirt then trusts the chain and does not probe the images)::

    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/top.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>

Formatting is preserved: the document is parsed with lxml (one hardened
parser, entities and network off) to find and check the disk, and the change
is then spliced into the original bytes.  Every byte outside the rewritten
``<disk>`` element is left as it was (XML declaration, comments, namespaced
``<metadata>``, quoting style, indentation); inside it, the children that are
not rewritten keep their text, and the new elements are indented like their
siblings.  Libvirt's references: ``docs/formatdomain.rst`` (disk, backingStore),
``docs/kbase/backing_chains.rst``, ``docs/formatsnapshot.rst`` and the RelaxNG
schemas in ``/usr/share/libvirt/schemas``.
"""

from __future__ import annotations

import codecs
import difflib
import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lxml import etree

from pyqcow.errors import DomainXMLError

__all__ = [
    "FORMATS",
    "SNAPSHOT_DISK_FORMATS",
    "SNAPSHOT_STATES",
    "ChainElement",
    "disk_chain",
    "disk_source",
    "read_domain",
    "rewrite_disk",
    "snapshot_xml",
    "unified_diff",
    "update_disk",
    "write_atomic",
]


@dataclass(frozen=True)
class ChainElement:
    """One image of a backing chain as the domain XML names it."""

    path: str  # absolute path of the image file
    format: str  # "qcow2" or "raw"


# --------------------------------------------------------------------------
# Limits and vocabularies
# --------------------------------------------------------------------------

#: Image formats a chain handed to :func:`rewrite_disk` may name.
FORMATS = frozenset({"qcow2", "raw"})

#: Formats allowed for an external snapshot overlay: the domainsnapshot schema
#: types ``<disk><driver type>`` as ``storageFormatBacking`` (cow, qcow, qcow2,
#: qed, vmdk), so a raw overlay does not validate.  pyqcow only makes qcow2.
SNAPSHOT_DISK_FORMATS = frozenset({"qcow2"})

#: ``<state>`` values of domainsnapshot.rng.
SNAPSHOT_STATES = frozenset(
    {"running", "blocked", "paused", "shutdown", "shutoff", "crashed", "disk-snapshot"}
)

#: A domain XML bigger than this is refused by :func:`read_domain`.
MAX_DOMAIN_XML_SIZE = 16 * 1024 * 1024

#: Encodings whose markup characters are the ASCII bytes, so that the byte
#: splicing below is exact.  libvirt itself only ever writes UTF-8.
_ASCII_COMPATIBLE_CODECS = frozenset({"utf-8", "ascii", "latin-1"})

# XML whitespace (S production) as bytes.
_WS = b" \t\r\n"

# --------------------------------------------------------------------------
# Parser and XPaths
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# A minimal lexer over the original bytes (the document is already known to
# be well-formed: lxml parsed it).  It finds the byte span of every element so
# that a change can be spliced in without re-serialising anything else.
# --------------------------------------------------------------------------

_NAME_RE = re.compile(rb"[^\s/>]+")
_START_TAG_RE = re.compile(rb"""<[^\s/>'"]+(?:[^>'"]|'[^']*'|"[^"]*")*>""")
_ATTR_RE = re.compile(rb"""([ \t\r\n]+)([^\s=/>]+)[ \t\r\n]*=[ \t\r\n]*(?:'([^']*)'|"([^"]*)")""")


class _LexError(ValueError):
    pass


@dataclass(slots=True)
class _Span:
    """Byte span of one element: ``start`` is its ``<``, ``tag_end`` is just
    past its start tag, ``end`` just past its end tag (== tag_end if empty)."""

    name: bytes
    start: int
    tag_end: int
    end: int
    children: list[int]


def _after(data: bytes, token: bytes, pos: int) -> int:
    k = data.find(token, pos)
    if k < 0:
        raise _LexError(f"unterminated markup, expected {token!r}")
    return k + len(token)


def _skip_doctype(data: bytes, pos: int) -> int:
    """Return the offset just past the ``<!DOCTYPE ...>`` starting at pos."""
    n = len(data)
    k = pos + 2
    while k < n:
        c = data[k]
        if c in (0x22, 0x27):  # quoted system/public literal
            k = _after(data, bytes([c]), k + 1)
        elif c == 0x5B:  # '[' internal subset
            k += 1
            while True:
                if k >= n:
                    raise _LexError("unterminated DOCTYPE internal subset")
                if data.startswith(b"<!--", k):
                    k = _after(data, b"-->", k + 4)
                    continue
                if data.startswith(b"<?", k):
                    k = _after(data, b"?>", k + 2)
                    continue
                c = data[k]
                if c in (0x22, 0x27):
                    k = _after(data, bytes([c]), k + 1)
                elif c == 0x5D:  # ']'
                    k += 1
                    break
                else:
                    k += 1
        elif c == 0x3E:  # '>'
            return k + 1
        else:
            k += 1
    raise _LexError("unterminated DOCTYPE")


def _prolog_doctype(data: bytes) -> tuple[int, int] | None:
    """Span of the DOCTYPE declaration in the prolog, if there is one."""
    k = 3 if data.startswith(codecs.BOM_UTF8) else 0
    n = len(data)
    while k < n:
        if data[k] in _WS:
            k += 1
        elif data.startswith(b"<?", k):
            k = _after(data, b"?>", k + 2)
        elif data.startswith(b"<!--", k):
            k = _after(data, b"-->", k + 4)
        elif data.startswith(b"<!DOCTYPE", k):
            return k, _skip_doctype(data, k)
        else:
            return None
    return None


def _scan(data: bytes) -> tuple[list[_Span], list[tuple[int, int]]]:
    """Element spans in document order, and every markup token's span."""
    spans: list[_Span] = []
    tokens: list[tuple[int, int]] = []
    stack: list[int] = []
    i = 0
    while True:
        j = data.find(b"<", i)
        if j < 0:
            break
        if data.startswith(b"<!--", j):
            i = _after(data, b"-->", j + 4)
        elif data.startswith(b"<![CDATA[", j):
            i = _after(data, b"]]>", j + 9)
        elif data.startswith(b"<?", j):
            i = _after(data, b"?>", j + 2)
        elif data.startswith(b"<!", j):
            i = _skip_doctype(data, j)
        elif data.startswith(b"</", j):
            i = _after(data, b">", j + 2)
            if not stack:
                raise _LexError("end tag without start tag")
            spans[stack.pop()].end = i
        else:
            m = _START_TAG_RE.match(data, j)
            if m is None:
                raise _LexError("malformed start tag")
            i = m.end()
            name = _NAME_RE.match(data, j + 1)
            assert name is not None
            empty = data[i - 2] == 0x2F  # '/>'
            index = len(spans)
            if stack:
                spans[stack[-1]].children.append(index)
            spans.append(_Span(name.group(), j, i, i if empty else -1, []))
            if not empty:
                stack.append(index)
        tokens.append((j, i))
    if stack:
        raise _LexError("unclosed element")
    return spans, tokens


# --------------------------------------------------------------------------
# Parsing with the hardened parser
# --------------------------------------------------------------------------


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
        doctype = _prolog_doctype(data)
    except _LexError:
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


# --------------------------------------------------------------------------
# Public reading API
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Checking what callers hand in
# --------------------------------------------------------------------------


def _bad_xml_chars(text: str) -> bool:
    for ch in text:
        o = ord(ch)
        if o < 0x20 or o == 0x7F or 0xD800 <= o <= 0xDFFF or o in (0xFFFE, 0xFFFF):
            return True
    return False


def _check_path(path: object, where: str, what: str) -> str:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    elif isinstance(path, os.PathLike):
        path = os.fspath(path)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
    if not isinstance(path, str) or not path:
        raise DomainXMLError(where, f"{what}: bad path {path!r}")
    if _bad_xml_chars(path):
        raise DomainXMLError(
            where, f"{what}: path {path!r} has control characters or is not valid UTF-8"
        )
    # libvirt's schema (absFilePath) requires an absolute path; relative names
    # would be resolved against nothing, so refuse them.
    if not path.startswith("/") or len(path) < 2:
        raise DomainXMLError(where, f"{what}: path {path!r} is not absolute")
    return path


def _check_chain(chain: Sequence[ChainElement], where: str) -> list[ChainElement]:
    if isinstance(chain, (str, bytes, ChainElement)) or not isinstance(chain, Iterable):
        raise DomainXMLError(where, "the chain must be a sequence of ChainElement")
    items = list(chain)
    if not items:
        raise DomainXMLError(where, "the chain is empty")
    checked: list[ChainElement] = []
    seen: set[str] = set()
    for index, element in enumerate(items):
        what = f"chain element {index}"
        if not hasattr(element, "path") or not hasattr(element, "format"):
            raise DomainXMLError(where, f"{what} is not a ChainElement: {element!r}")
        path = _check_path(element.path, where, what)
        fmt = element.format
        if fmt not in FORMATS:
            raise DomainXMLError(
                where, f"{what}: format {fmt!r} is not one of {', '.join(sorted(FORMATS))}"
            )
        if fmt == "raw" and index != len(items) - 1:
            raise DomainXMLError(where, f"{what}: a raw image ({path}) cannot have a backing file")
        if path in seen:
            raise DomainXMLError(where, f"{what}: {path} appears twice in the chain (a loop)")
        seen.add(path)
        checked.append(ChainElement(path, fmt))
    return checked


# --------------------------------------------------------------------------
# Rewriting
# --------------------------------------------------------------------------


def _escape_attr(value: str, quote: str) -> str:
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    value = value.replace("\t", "&#9;").replace("\n", "&#10;").replace("\r", "&#13;")
    return value.replace("'", "&apos;") if quote == "'" else value.replace('"', "&quot;")


def _escape_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _tag_attrs(tag: bytes) -> tuple[list[re.Match[bytes]], int]:
    """Attribute matches of a start tag, and the offset after the last one."""
    name = _NAME_RE.match(tag, 1)
    assert name is not None
    pos = name.end()
    found = []
    while (m := _ATTR_RE.match(tag, pos)) is not None:
        found.append(m)
        pos = m.end()
    return found, pos


def _tag_quote(tag: bytes, default: str) -> str:
    found, _ = _tag_attrs(tag)
    if found:
        return "'" if found[0].group(3) is not None else '"'
    return default


def _set_attr(tag: bytes, attr: str, value: str, quote: str, encoding: str) -> bytes:
    """Set one attribute in a start tag, keeping the others byte-for-byte."""
    found, pos = _tag_attrs(tag)
    name = attr.encode("ascii")
    for m in found:
        if m.group(2) == name:
            group = 3 if m.group(3) is not None else 4
            q = "'" if group == 3 else '"'
            s, e = m.span(group)
            return tag[:s] + _escape_attr(value, q).encode(encoding, "xmlcharrefreplace") + tag[e:]
    new = f" {attr}={quote}{_escape_attr(value, quote)}{quote}"
    return tag[:pos] + new.encode(encoding, "xmlcharrefreplace") + tag[pos:]


@dataclass(slots=True)
class _Layout:
    newline: str | None  # None: children are written on one line
    indent: str  # whitespace before a child of the disk (after the newline)
    unit: str  # one level of indentation
    inline: str  # separator between children in one-line mode
    quote: str

    def sep(self, depth: int) -> str:
        if self.newline is None:
            return self.inline
        return self.newline + self.indent + self.unit * depth

    def attr(self, name: str, value: str) -> str:
        return f"{name}={self.quote}{_escape_attr(value, self.quote)}{self.quote}"


def _trailing_ws(gap: bytes) -> bytes:
    return gap[len(gap.rstrip(_WS)) :]


def _infer_layout(data: bytes, disk: _Span, first_gap: bytes | None, quote: str) -> _Layout:
    ws = _trailing_ws(first_gap) if first_gap is not None else b""
    line_start = data.rfind(b"\n", 0, disk.start) + 1
    disk_indent = data[line_start : disk.start]
    if disk_indent.strip(_WS):
        disk_indent = b""
    if b"\n" not in ws:
        return _Layout(None, "", "", ws.decode("ascii"), quote)
    newline = "\r\n" if b"\r\n" in ws else "\n"
    indent = ws[ws.rfind(b"\n") + 1 :].replace(b"\r", b"")
    if indent.startswith(disk_indent) and len(indent) > len(disk_indent):
        unit = indent[len(disk_indent) :]
    else:
        unit = b"\t" if indent.startswith(b"\t") else b"  "
    return _Layout(newline, indent.decode("ascii"), unit.decode("ascii"), "", quote)


def _render_backing(rest: Sequence[ChainElement], layout: _Layout, depth: int) -> str:
    if not rest:
        return "<backingStore/>"
    head = rest[0]
    inner = layout.sep(depth + 1)
    return (
        f"<backingStore {layout.attr('type', 'file')}>"
        f"{inner}<format {layout.attr('type', head.format)}/>"
        f"{inner}<source {layout.attr('file', head.path)}/>"
        f"{inner}{_render_backing(rest[1:], layout, depth + 1)}"
        f"{layout.sep(depth)}</backingStore>"
    )


@dataclass(slots=True, eq=False)
class _Item:
    gap: bytes  # bytes between the previous child (or the disk start tag) and this one
    raw: bytes  # the child's own bytes
    tag: object  # lxml tag of the child (None for new items)
    tag_len: int = 0


def _locate(doc: _Document, element: etree._Element) -> tuple[list[_Span], int]:
    try:
        spans, _ = _scan(doc.data)
    except _LexError as exc:
        raise DomainXMLError(doc.where, f"cannot locate elements in the document: {exc}") from exc
    index = -1
    count = 0
    for count, node in enumerate(doc.root.iter(etree.Element), start=1):
        if node is element:
            index = count - 1
    if count != len(spans) or index < 0:
        raise DomainXMLError(doc.where, "cannot map the parsed document onto its bytes")
    return spans, index


def _rewrite(doc: _Document, disk: etree._Element, chain: list[ChainElement]) -> bytes:
    data, enc = doc.data, doc.encoding
    spans, index = _locate(doc, disk)
    span = spans[index]
    if span.name != b"disk" or span.end == span.tag_end:
        raise DomainXMLError(doc.where, "cannot map the disk element onto its bytes")
    children = list(disk.iterchildren(etree.Element))
    child_spans = [spans[i] for i in span.children]
    if len(children) != len(child_spans):
        raise DomainXMLError(doc.where, "cannot map the disk's children onto their bytes")

    items: list[_Item] = []
    pos = span.tag_end
    for child, cspan in zip(children, child_spans, strict=True):
        items.append(
            _Item(
                data[pos : cspan.start],
                data[cspan.start : cspan.end],
                child.tag,
                cspan.tag_end - cspan.start,
            )
        )
        pos = cspan.end
    close_start = data.rfind(b"</", pos, span.end)
    trailer = data[pos:close_start]

    quote = _tag_quote(data[span.start : span.tag_end], "'")
    layout = _infer_layout(data, span, items[0].gap if items else trailer, quote)
    new_gap = layout.sep(0).encode(enc)

    def edit(item: _Item, element: etree._Element, attr: str, value: str) -> None:
        if element.get(attr) == value:
            return  # keep the original bytes (and their escaping) untouched
        tag = item.raw[: item.tag_len]
        new_tag = _set_attr(tag, attr, value, _tag_quote(tag, quote), enc)
        item.raw = new_tag + item.raw[item.tag_len :]
        item.tag_len = len(new_tag)

    head = chain[0]
    driver_item = source_item = None
    for item, child in zip(items, children, strict=True):
        if child.tag == "driver":
            driver_item = item
            edit(item, child, "type", head.format)
        elif child.tag == "source":
            source_item = item
            edit(item, child, "file", head.path)

    # Drop every existing <backingStore>, remembering where the first one was.
    kept: list[_Item] = []
    first_backing: tuple[int, bytes] | None = None
    carry = b""
    for item in items:
        if carry:
            item.gap = carry + item.gap
            carry = b""
        if item.tag == "backingStore":
            if first_backing is None:
                first_backing = (len(kept), item.gap)
            else:
                # keep anything but the indentation in front of it (comments)
                carry = item.gap[: len(item.gap) - len(_trailing_ws(item.gap))]
            continue
        kept.append(item)
    trailer = carry + trailer
    items = kept

    backing = _Item(
        b"", _render_backing(chain[1:], layout, 0).encode(enc, "xmlcharrefreplace"), None
    )
    if first_backing is not None:
        backing.gap = first_backing[1]
        items.insert(first_backing[0], backing)

    if driver_item is None:
        driver_item = _Item(
            new_gap,
            f"<driver {layout.attr('name', 'qemu')} {layout.attr('type', head.format)}/>".encode(
                enc
            ),
            None,
        )
        at = items.index(source_item) if source_item is not None else 0
        if at == 0 and items:
            # the new first child takes the gap after the start tag
            driver_item.gap, items[0].gap = items[0].gap, new_gap
        items.insert(at, driver_item)
    if source_item is None:
        source_item = _Item(
            new_gap,
            f"<source {layout.attr('file', head.path)}/>".encode(enc, "xmlcharrefreplace"),
            None,
        )
        items.insert(items.index(driver_item) + 1, source_item)
    if first_backing is None:
        backing.gap = new_gap
        items.insert(items.index(source_item) + 1, backing)

    body = b"".join(item.gap + item.raw for item in items) + trailer
    return data[: span.tag_end] + body + data[close_start:]


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


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

#: temporary files next to the target: ".<name>.<8 random hex digits>.tmp"
_TEMP_ATTEMPTS = 100


def open_temp(target: str, mode: int = 0o666) -> tuple[int, str]:
    """Create and open (write-only) a new temporary file next to ``target``.

    Named ``.<target name>.<random>.tmp`` in ``target``'s directory, created
    with ``O_EXCL | O_NOFOLLOW`` and ``mode`` (the kernel applies the umask; the
    process-wide umask is never read or changed, which would not be
    thread-safe).  Returns (fd, path).  ``OSError`` passes through.
    """
    directory = os.path.dirname(target) or "."
    prefix = f".{os.path.basename(target)}."
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(_TEMP_ATTEMPTS):
        tmp = os.path.join(directory, f"{prefix}{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no usable temporary file name", os.path.join(directory, prefix))


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically.

    A temporary file in the same directory is written, fsynced, given the
    original file's mode (and owner and group when running as root; the group
    otherwise, when allowed), renamed over the target (a symlink is followed:
    the file it points to is replaced) and the directory fsynced.  On failure
    the temporary file is removed and the target is untouched.  ``OSError``
    passes through.
    """
    target = os.path.realpath(os.fspath(path))
    directory = os.path.dirname(target) or "."
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    # a new file gets 0666 minus the umask from the kernel, as open(2) would give
    # it; an existing file's mode is set with fchmod below (0600 until then)
    fd, tmp = open_temp(target, 0o666 if st is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if st is not None:
                if os.geteuid() == 0:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                elif st.st_gid != os.getegid():
                    try:
                        os.fchown(f.fileno(), -1, st.st_gid)
                    except PermissionError:
                        pass
                os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


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


# --------------------------------------------------------------------------
# Showing a change
# --------------------------------------------------------------------------

_DECL_ENCODING_RE = re.compile(
    rb"""^(?:\xef\xbb\xbf)?<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']"""
)


def _decode_for_diff(data: bytes) -> str:
    m = _DECL_ENCODING_RE.match(data)
    encoding = _codec_name(m.group(1).decode("ascii")) if m else "utf-8"
    return data.decode(encoding or "utf-8", errors="replace")


def unified_diff(old: bytes, new: bytes, name: str) -> str:
    """A unified diff of two versions of a document ('' if identical)."""
    a = _decode_for_diff(old).splitlines(keepends=True)
    b = _decode_for_diff(new).splitlines(keepends=True)
    out = []
    for line in difflib.unified_diff(a, b, fromfile=name, tofile=name):
        if not line.endswith("\n"):
            line += "\n\\ No newline at end of file\n"
        out.append(line)
    return "".join(out)


# --------------------------------------------------------------------------
# <domainsnapshot> for `virsh snapshot-create --redefine`
# --------------------------------------------------------------------------


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


def _check_name(value: object, where: str, what: str) -> str:
    if not isinstance(value, str) or not value or not value.strip():
        raise DomainXMLError(where, f"bad {what} {value!r}")
    if _bad_xml_chars(value):
        raise DomainXMLError(where, f"{what} {value!r} has control characters")
    return value


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
    where = "<domainsnapshot>"
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

    domain_text = None
    if domain_xml is not None:
        domain_where = f"{where} <domain>"
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
        skipped_names += [dev for dev in order if dev not in mentioned]

    q = "'"

    def attr(key: str, value: str) -> str:
        return f"{key}={q}{_escape_attr(value, q)}{q}"

    lines = ["<domainsnapshot>", f"  <name>{_escape_text(name)}</name>"]
    if description is not None:
        lines.append(f"  <description>{_escape_text(description)}</description>")
    lines.append(f"  <state>{state}</state>")
    if parent is not None:
        lines += ["  <parent>", f"    <name>{_escape_text(parent)}</name>", "  </parent>"]
    lines.append(f"  <creationTime>{creation_time}</creationTime>")
    lines.append(f"  <memory {attr('snapshot', 'no')}/>")
    lines.append("  <disks>")
    for disk_name, element in external:
        lines += [
            f"    <disk {attr('name', disk_name)} {attr('snapshot', 'external')} {attr('type', 'file')}>",
            f"      <driver {attr('type', element.format)}/>",
            f"      <source {attr('file', element.path)}/>",
            "    </disk>",
        ]
    for disk_name in skipped_names:
        lines.append(f"    <disk {attr('name', disk_name)} {attr('snapshot', 'no')}/>")
    lines.append("  </disks>")
    if domain_text is not None:
        lines.append(domain_text)
    lines.append("</domainsnapshot>")
    return ("\n".join(lines) + "\n").encode("utf-8")
