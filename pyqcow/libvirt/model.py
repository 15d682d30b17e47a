"""What callers hand in: a chain element (path + format), the vocabularies the
libvirt schemas allow, and the checks of names, paths and chains before any of
them is written into a document."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyqcow.errors import DomainXMLError


@dataclass(frozen=True)
class ChainElement:
    """One image of a backing chain as the domain XML names it."""

    path: str  # absolute path of the image file
    format: str  # "qcow2" or "raw"


#: Image formats a chain handed to :func:`pyqcow.libvirt.rewrite_disk` may name.
FORMATS = frozenset({"qcow2", "raw"})

#: Formats allowed for an external snapshot overlay: the domainsnapshot schema
#: types ``<disk><driver type>`` as ``storageFormatBacking`` (cow, qcow, qcow2,
#: qed, vmdk), so a raw overlay does not validate.  pyqcow only makes qcow2.
SNAPSHOT_DISK_FORMATS = frozenset({"qcow2"})

#: ``<state>`` values of domainsnapshot.rng.
SNAPSHOT_STATES = frozenset(
    {"running", "blocked", "paused", "shutdown", "shutoff", "crashed", "disk-snapshot"}
)


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


def _check_name(value: object, where: str, what: str) -> str:
    if not isinstance(value, str) or not value or not value.strip():
        raise DomainXMLError(where, f"bad {what} {value!r}")
    if _bad_xml_chars(value):
        raise DomainXMLError(where, f"{what} {value!r} has control characters")
    return value
