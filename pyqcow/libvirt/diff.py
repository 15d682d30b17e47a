"""Showing a change of a document: a unified diff decoded with the document's
own declared encoding."""

from __future__ import annotations

import difflib
import re

from .document import _codec_name

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
