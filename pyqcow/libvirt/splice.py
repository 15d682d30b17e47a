"""The byte-preserving splice: rewrite one ``<disk>`` of a parsed document so
that it names a chain, changing only the bytes of that element.

The children that are not rewritten keep their bytes; ``<driver type>`` and
``<source file>`` are edited in place (other attributes untouched); every
``<backingStore>`` is replaced by one nested chain rendered with the
indentation and quote style the disk already uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lxml import etree

from pyqcow.errors import DomainXMLError

from .document import _Document
from .markup import (
    _WS,
    _escape_attr,
    _LexError,
    _scan,
    _set_attr,
    _Span,
    _tag_quote,
    _trailing_ws,
)
from .model import ChainElement


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


@dataclass(slots=True)
class _DiskBytes:
    """The ``<disk>`` element cut into its children's bytes."""

    span: _Span
    items: list[_Item]  # one per child element, in document order
    children: list[etree._Element]  # the same children as lxml sees them
    trailer: bytes  # between the last child and the end tag
    close_start: int  # offset of the end tag ``</disk>``


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


def _disk_bytes(doc: _Document, disk: etree._Element) -> _DiskBytes:
    data = doc.data
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
    return _DiskBytes(span, items, children, data[pos:close_start], close_start)


def _edit_attr(item: _Item, element: etree._Element, attr: str, value: str,
               quote: str, enc: str) -> None:
    if element.get(attr) == value:
        return  # keep the original bytes (and their escaping) untouched
    tag = item.raw[: item.tag_len]
    new_tag = _set_attr(tag, attr, value, _tag_quote(tag, quote), enc)
    item.raw = new_tag + item.raw[item.tag_len :]
    item.tag_len = len(new_tag)


def _edit_head(d: _DiskBytes, head: ChainElement, quote: str,
               enc: str) -> tuple[_Item | None, _Item | None]:
    """Point the existing ``<driver type>`` and ``<source file>`` at ``head``."""
    driver_item = source_item = None
    for item, child in zip(d.items, d.children, strict=True):
        if child.tag == "driver":
            driver_item = item
            _edit_attr(item, child, "type", head.format, quote, enc)
        elif child.tag == "source":
            source_item = item
            _edit_attr(item, child, "file", head.path, quote, enc)
    return driver_item, source_item


def _drop_backing(items: list[_Item],
                  trailer: bytes) -> tuple[list[_Item], bytes, tuple[int, bytes] | None]:
    """Every child but the ``<backingStore>`` ones; the trailer; where the first one was
    (its index among the kept children, and its gap)."""
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
    return kept, carry + trailer, first_backing


def _add_head(items: list[_Item], driver_item: _Item | None, source_item: _Item | None,
              head: ChainElement, layout: _Layout, new_gap: bytes, enc: str) -> _Item:
    """Create a missing ``<driver>`` and ``<source>``; returns the source item."""
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
    return source_item


def _rewrite(doc: _Document, disk: etree._Element, chain: list[ChainElement]) -> bytes:
    data, enc = doc.data, doc.encoding
    d = _disk_bytes(doc, disk)
    quote = _tag_quote(data[d.span.start : d.span.tag_end], "'")
    layout = _infer_layout(data, d.span, d.items[0].gap if d.items else d.trailer, quote)
    new_gap = layout.sep(0).encode(enc)
    head = chain[0]
    driver_item, source_item = _edit_head(d, head, quote, enc)
    items, trailer, first_backing = _drop_backing(d.items, d.trailer)
    backing = _Item(
        b"", _render_backing(chain[1:], layout, 0).encode(enc, "xmlcharrefreplace"), None
    )
    if first_backing is not None:
        backing.gap = first_backing[1]
        items.insert(first_backing[0], backing)
    source_item = _add_head(items, driver_item, source_item, head, layout, new_gap, enc)
    if first_backing is None:
        backing.gap = new_gap
        items.insert(items.index(source_item) + 1, backing)
    body = b"".join(item.gap + item.raw for item in items) + trailer
    return data[: d.span.tag_end] + body + data[d.close_start :]
