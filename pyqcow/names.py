"""Backing file names as QEMU reads them: the rules a name stored in a qcow2 header
must follow (length, no NUL, no protocol prefix).  Light on purpose: chain and
the writer import it on every start."""

from __future__ import annotations

from . import spec
from .errors import BackingChainError


def protocol_prefix(name: str) -> str | None:
    """QEMU's path_has_protocol(): a ':' before any '/' makes the name a protocol."""
    colon = name.find(":")
    if colon < 0:
        return None
    slash = name.find("/")
    if 0 <= slash < colon:
        return None
    return name[:colon]

def validate_backing_name(image_path: str, name: str) -> None:
    """Refuse a backing name QEMU would not read as the plain file meant."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > spec.MAX_BACKING_FILE_NAME:
        raise BackingChainError(
            image_path, f"backing file name is {len(raw)} bytes long; qcow2 allows at most "
            f"{spec.MAX_BACKING_FILE_NAME} (too long)"
        )
    if not name or "\0" in name:
        raise BackingChainError(image_path, f"backing file name {name!r} is empty or has a NUL")
    if protocol_prefix(name) is not None:
        raise BackingChainError(
            image_path,
            f"backing file name {name!r} has a ':' before any '/': QEMU reads it as a protocol "
            f"prefix (write './{name}' or an absolute path)",
        )
