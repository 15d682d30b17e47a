"""Markup at the byte level: a minimal lexer over a document's original bytes,
start-tag attribute edits that keep every other byte, and escaping.

The lexer runs only on documents lxml has already parsed (so known to be
well-formed): it finds the byte span of every element so that a change can be
spliced in without re-serialising anything else.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

# XML whitespace (S production) as bytes.
_WS = b" \t\r\n"

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


def _trailing_ws(gap: bytes) -> bytes:
    return gap[len(gap.rstrip(_WS)) :]


# --------------------------------------------------------------------------
# Escaping and start-tag attributes
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
