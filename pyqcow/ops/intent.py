"""Intent records: finish a multi-file operation (images + domain XML) after a crash.

Before the first change, a merge writes a small JSON record next to the kept
image (``.<kept name>.pyqcow-intent.json``, written atomically and fsynced);
after the last step (the domain XML, if one was given) it removes it.  If the
process dies or a later step fails (the XML's directory became read-only, the
XML was edited meanwhile, power was lost), the record says what was meant, and
:func:`pyqcow.ops.recover.recover` (``pyqcow recover PATH``, also run by
``pyqcow xml sync``) completes it from the state the files are in:

- before the commit point (TOP's name still reads TOP through BASE) the merge is
  run again: every step before the commit point is idempotent;
- after it, only the clean-up steps remain (the final backing name, removing
  the other file's external data file) and the XML update.

The record never holds guest data; removing it by hand only loses the ability
to finish automatically (the images are consistent at every instant).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from ..chain import host_path
from ..errors import OperationError, QcowError
from ..hostfile import fsync_dir

SUFFIX = ".pyqcow-intent.json"
VERSION = 1


def record_path(kept_path: str) -> str:
    d, name = os.path.split(host_path(kept_path))
    return os.path.join(d, f".{name}{SUFFIX}")


@dataclass
class Record:
    path: str
    data: dict

    def finish(self) -> None:
        """The operation is complete: forget it (durably)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        fsync_dir(self.path)

    @property
    def xml(self) -> dict | None:
        return self.data.get("xml")


def write_record(path: str, data: dict) -> None:
    """Write a JSON record durably: a temporary file, fsynced, renamed, directory fsynced."""
    tmp = f"{path}.tmp{os.getpid()}"
    body = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(path)


def xml_intent(xml_update) -> dict | None:
    """What the CLI's domain XML update will write: file, disk, chain."""
    if xml_update is None:
        return None
    return {
        "path": host_path(xml_update.path),
        "disk": xml_update.target,
        "chain": [[e.path, e.format] for e in (xml_update.chain or [])],
    }


def begin_merge(plan, xml_update=None) -> Record:
    data = {
        "version": VERSION,
        "op": "merge",
        "created": int(time.time()),
        "top": host_path(plan.top),
        "base": host_path(plan.base),
        "keep": plan.keep,
        "via": plan.via,
        "kept": host_path(plan.kept_path),
        "new_backing": plan.new_backing,
        "new_backing_format": plan.new_backing_format,
        "removed_files": [host_path(p) for p in plan.removed_files],
        "force": plan.force,
        "retarget": [host_path(p) for p in plan.retarget],
        "xml": xml_intent(xml_update),
    }
    path = record_path(plan.kept_path)
    try:
        write_record(path, data)
    except OSError as e:
        raise OperationError(path, f"cannot write the intent record: {e.strerror}") from None
    return Record(path, data)


def begin_xml(op: str, image: str, xml_update) -> Record:
    """A single-image operation followed by an XML update (create -b, commit, stream, rebase)."""
    data = {"version": VERSION, "op": op, "created": int(time.time()),
            "kept": host_path(image), "xml": xml_intent(xml_update)}
    path = record_path(image)
    try:
        write_record(path, data)
    except OSError as e:
        raise OperationError(path, f"cannot write the intent record: {e.strerror}") from None
    return Record(path, data)


# -- finding records -----------------------------------------------------------------------
def load(path: str) -> Record:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise OperationError(path, f"unreadable intent record: {e}") from None
    if not isinstance(data, dict) or data.get("version") != VERSION or "op" not in data:
        raise OperationError(path, "not a pyqcow intent record (or a newer version)")
    return Record(path, data)


def _records_in(directory: str) -> list[Record]:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [load(os.path.join(directory, n)) for n in names
            if n.startswith(".") and n.endswith(SUFFIX)]


def _xml_dirs(xml_path: str) -> list[str]:
    """Directories of the files a domain XML's disks name (where their records live)."""
    from lxml import etree

    from .. import libvirt

    try:
        root = etree.fromstring(libvirt.read_domain(xml_path), libvirt.PARSER)
    except (QcowError, etree.XMLSyntaxError):
        return []
    names = root.xpath("/domain/devices/disk//source/@file")
    return [os.path.dirname(str(n)) for n in names if os.path.isabs(str(n))]


def find(path: str, *, target: str | None = None) -> list[Record]:
    """Records about ``path``: a directory (all of them), an image, or a domain XML."""
    path = host_path(path)
    if os.path.isdir(path):
        return _records_in(path)
    out = []
    seen = set()
    dirs = [os.path.dirname(path)] + _xml_dirs(path)
    for d in dirs:
        for rec in _records_in(d):
            if rec.path in seen:
                continue
            seen.add(rec.path)
            d_ = rec.data
            names = {d_.get("top"), d_.get("base"), d_.get("kept")}
            xml = d_.get("xml") or {}
            if path in names or (xml.get("path") == path and (target is None
                                                               or xml.get("disk") == target)):
                out.append(rec)
    return out


__all__ = ["Record", "begin_merge", "begin_xml", "find", "load", "record_path",
           "write_record"]
