"""Renderers shared by the subcommands: qemu-style JSON, map lines, progress.

qemu-img prints its JSON from a QDict, whose iteration order is its hash
table's (qobject/qdict.c: ``tdb_hash(key) % 512`` buckets, newest entry first
within a bucket), and pretty-prints it with qobject/qjson.c's rules.
``qemu_json`` reproduces both, so ``pyqcow info --output=json`` is
byte-for-byte what ``qemu-img info --output=json`` prints when the dicts are
built with their keys in QAPI declaration order (the order qemu inserts them).
"""

from __future__ import annotations

import sys
import time

from ..units import format_size, parse_size

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterable  # (collections: ~2 ms of start-up)
    from typing import Any, TextIO

__all__ = [
    "Progress",
    "format_size",
    "human_info",
    "map_human",
    "map_json",
    "parse_size",
    "qdict_order",
    "qemu_json",
]

_QDICT_BUCKETS = 512


def _tdb_hash(key: str) -> int:
    data = key.encode("utf-8")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys: Iterable[str]) -> list[str]:
    """The order in which a QDict holding ``keys`` (inserted in this order) iterates."""
    buckets: dict[int, list[str]] = {}
    for k in keys:
        buckets.setdefault(_tdb_hash(k) % _QDICT_BUCKETS, []).insert(0, k)
    return [k for b in sorted(buckets) for k in buckets[b]]


def _escape(s: str) -> str:
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif 0xDC80 <= cp <= 0xDCFF:  # surrogateescape'd invalid byte
            out.append("\\uFFFD")
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _to_json(obj: Any, indent: int, out: list[str]) -> None:
    def newline(level: int) -> None:
        out.append("\n" + "    " * level)

    if isinstance(obj, dict):
        out.append("{")
        sep = ""
        for k in qdict_order(obj):
            out.append(sep)
            newline(indent + 1)
            out.append(_escape(k) + ": ")
            _to_json(obj[k], indent + 1, out)
            sep = ","
        newline(indent)
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append("[")
        sep = ""
        for v in obj:
            out.append(sep)
            newline(indent + 1)
            _to_json(v, indent + 1, out)
            sep = ","
        newline(indent)
        out.append("]")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif obj is None:
        out.append("null")
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, float):
        out.append(repr(obj))
    elif isinstance(obj, str):
        out.append(_escape(obj))
    else:
        raise TypeError(f"cannot render {type(obj).__name__} as JSON")


def qemu_json(obj: Any) -> str:
    """``obj`` pretty-printed as qemu does (dict keys in QDict order), no final newline."""
    out: list[str] = []
    _to_json(obj, 0, out)
    return "".join(out)


# -- map ----------------------------------------------------------------------------
def map_json(extents: list[dict]) -> str:
    """qemu-img map --output=json text (qemu-img.c dump_map_entry), with final newline."""
    parts = []
    for e in extents:
        line = (
            f'{{ "start": {e["start"]}, "length": {e["length"]}, "depth": {e["depth"]},'
            f' "present": {_b(e["present"])}, "zero": {_b(e["zero"])}, "data": {_b(e["data"])}'
        )
        if e.get("offset") is not None:
            line += f', "offset": {e["offset"]}'
        parts.append(line + "}")
    return "[" + ",\n".join(parts) + "]\n"


def _b(v: bool) -> str:
    return "true" if v else "false"


def map_human(extents) -> str:
    """qemu-img map's human table: data ranges only ("Offset Length Mapped to File")."""
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in extents:
        if e.data and not e.zero:
            lines.append(
                f"{_hex16(e.start)}{_hex16(e.length)}{_hex16(e.offset or 0)}{e.filename or ''}"
            )
    return "\n".join(lines) + "\n"


def _hex16(v: int) -> str:
    # printf("%#-16"PRIx64): 0 prints as "0", others with 0x
    return f"{f'{v:#x}' if v else '0':<16}"


# -- progress ---------------------------------------------------------------------
class Progress:
    """``-p``: qemu-img style "    (12.34/100%)" on stderr, redrawn in place."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._last = -1.0
        self._last_time = 0.0
        if enabled:
            self._draw(0.0)

    def _draw(self, pct: float) -> None:
        self.stream.write(f"    ({pct:.2f}/100%)\r")
        self.stream.flush()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        pct = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        if pct - self._last >= 1.0 or (pct >= 100.0 and self._last < 100.0) or now - self._last_time > 0.5:
            self._last, self._last_time = pct, now
            self._draw(pct)

    def finish(self) -> None:
        if self.enabled:
            self._draw(100.0)
            self.stream.write("\n")
            self.stream.flush()


def _ljust_bytes(text: str, width: int) -> str:
    """printf's %-Ns: pads by bytes, not characters (non-ASCII names)."""
    n = len(text.encode("utf-8", "surrogateescape"))
    return text + " " * max(0, width - n)


def snapshot_row(
    id_str: str, name: str, vm_state_size: int, date_sec: int, vm_clock_nsec: int,
    icount: int | None,
) -> str:
    """One snapshot row as qemu's bdrv_snapshot_dump prints it ("%-9s %-16s %8s%20s%13s%11s")."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(date_sec))
    secs = vm_clock_nsec // 1_000_000_000
    clock = (
        f"{secs // 3600:02d}:{(secs // 60) % 60:02d}:{secs % 60:02d}."
        f"{(vm_clock_nsec // 1_000_000) % 1000:03d}"
    )
    return (
        f"{_ljust_bytes(id_str, 9)} {_ljust_bytes(name, 16)} {format_size(vm_state_size):>8}"
        f"{date:>20}{clock:>13}{'' if icount is None else icount:>11}"
    )


# -- human output (block/qapi.c bdrv_image_info_dump) --------------------------------
def human_info(info: dict) -> str:
    """One ImageInfo dict (pyqcow.info) as qemu-img info prints it for humans."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {format_size(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}")
        for sn in info["snapshots"]:
            lines.append(_snapshot_line(sn))
    if "format-specific" in info:
        lines.append("Format specific information:")
        _dump(info["format-specific"]["data"], 1, lines)
    return "\n".join(lines) + "\n"


def _snapshot_line(sn: dict) -> str:
    return snapshot_row(
        sn["id"], sn["name"], sn["vm-state-size"], sn["date-sec"],
        sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"], sn.get("icount"),
    )


def _scalar(v) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    return str(v)


def _dump(obj, indent: int, lines: list[str]) -> None:
    pad = "    " * indent
    if isinstance(obj, dict):
        for k in qdict_order(obj):
            v = obj[k]
            key = k.replace("-", " ")
            if isinstance(v, dict | list):
                lines.append(f"{pad}{key}:")
                _dump(v, indent + 1, lines)
            else:
                lines.append(f"{pad}{key}: {_scalar(v)}")
    else:
        for i, v in enumerate(obj):
            if isinstance(v, dict | list):
                lines.append(f"{pad}[{i}]:")
                _dump(v, indent + 1, lines)
            else:
                lines.append(f"{pad}[{i}]: {_scalar(v)}")
