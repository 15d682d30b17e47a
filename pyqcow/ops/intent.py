"""Intent records: finish a multi-file operation (images + domain XML) after a crash.

Before the first change, a merge writes a small JSON record next to the kept
image (``.<kept name>.pyqcow-intent.json``, written atomically and fsynced);
after the last step (the domain XML, if one was given) it removes it.  If the
process dies or a later step fails (the XML's directory became read-only, the
XML was edited meanwhile, power was lost), the record says what was meant, and
:func:`recover` (``pyqcow recover PATH``, also run by ``pyqcow xml sync``)
completes it from the state the files are in:

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

from ..chain import host_path, open_image, resolve_backing
from ..errors import DomainXMLError, OperationError, QcowError
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


def _write(path: str, data: dict) -> None:
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
        _write(path, data)
    except OSError as e:
        raise OperationError(path, f"cannot write the intent record: {e.strerror}") from None
    return Record(path, data)


def begin_xml(op: str, image: str, xml_update) -> Record:
    """A single-image operation followed by an XML update (create -b, commit, stream, rebase)."""
    data = {"version": VERSION, "op": op, "created": int(time.time()),
            "kept": host_path(image), "xml": xml_intent(xml_update)}
    path = record_path(image)
    try:
        _write(path, data)
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


# -- finishing -------------------------------------------------------------------------------
def recover(path: str, *, dry_run: bool = False, target: str | None = None) -> list[str]:
    """Finish every interrupted operation recorded about ``path``; the steps taken."""
    done: list[str] = []
    for rec in find(path, target=target):
        done += _finish(rec, dry_run)
    return done


def _finish(rec: Record, dry_run: bool) -> list[str]:
    d = rec.data
    steps: list[str] = []
    if d["op"] == "merge":
        steps += _finish_merge(rec, dry_run)
    elif rec.xml and not _image_step_done(rec):
        # a single-image operation that did not finish: the images are as before (or
        # as the operation left them, consistent), and the XML still names them
        steps.append(f"{d['op']} of {d.get('kept')} did not complete; the domain XML "
                     f"{rec.xml['path']} is left as it is")
        if dry_run:
            return [f"would note: {s}" for s in steps] + [f"would remove {rec.path}"]
        rec.finish()
        return steps + [f"removed {rec.path}"]
    if rec.xml:
        steps += _finish_xml(rec, dry_run)
    if dry_run:
        return [f"would {s}" for s in steps] + [f"would remove {rec.path}"]
    rec.finish()
    return steps + [f"removed {rec.path}"]


def _image_step_done(rec: Record) -> bool:
    """The images' chain is the one the XML update was planned for."""
    from ..chain import chain_description

    chain = [(p, f) for p, f in (rec.xml or {}).get("chain", [])]
    if not chain:
        return False
    try:
        with open_image(chain[0][0], "r", format=chain[0][1], force_share=True) as img:
            return chain_description(img) == chain
    except (QcowError, OSError):
        return False


def _backing_of(path: str) -> str | None:
    """The file ``path``'s header names as its backing file (resolved), or None."""
    from ..chain import peek_header

    h = peek_header(path)
    return resolve_backing(path, h.backing_file) if h is not None and h.backing_file else None


def _points_at(path: str, target: str) -> bool:
    b = _backing_of(path)
    if b is None:
        return False
    try:
        return os.path.samefile(b, target)
    except OSError:
        return False


def _finish_merge(rec: Record, dry_run: bool) -> list[str]:
    from . import merge as merge_mod

    d = rec.data
    top, base, keep, via, kept = d["top"], d["base"], d["keep"], d["via"], d["kept"]
    top_there = os.path.lexists(top)
    base_there = os.path.lexists(base)
    steps: list[str] = []
    chain_intact = top_there and base_there and _points_at(top, base)
    if chain_intact:
        # before the commit point: run the merge again (every step so far is idempotent)
        steps.append(f"merge {top} again (--keep {keep} --via {via})")
        if not dry_run:
            plan = merge_mod.merge(top, keep=keep, via=via, force=d.get("force", False),
                                   _record=rec)
            steps.append(f"merged into {plan.kept_path}")
        return steps
    # the images no longer form TOP -> BASE: the data moved; what remains is the move
    if via == "stream" and top_there and keep == "base":
        steps.append(f"rename {top} -> {base}")
        if not dry_run:
            with open_image(top, "r+", backing=False) as img:
                if base_there:
                    merge_mod._take_mode(src_name=base, file=img)
            merge_mod._rename(top, base)
    elif via == "stream" and base_there and keep == "top" and top_there:
        steps.append(f"remove {base}")
        if not dry_run:
            merge_mod._remove(base)
    elif top_there and base_there or not os.path.lexists(kept):
        raise OperationError(
            kept, f"the files are not in a state the interrupted merge ({keep=}, {via=}) can "
                  f"leave; nothing done (record {rec.path} left in place)")
    # after the commit point: the final backing name, the other file's data file
    want = d.get("new_backing")
    if want and os.path.exists(kept):
        from ..chain import peek_header

        h = peek_header(kept)
        have = h.backing_file if h is not None else want
        if have != want:
            steps.append(f"set backing of {kept} to {want}")
            if not dry_run:
                with open_image(kept, "r+", backing=False) as img:
                    img.set_backing(want, d.get("new_backing_format"))
    for p in d.get("removed_files", []):
        if os.path.lexists(p):
            steps.append(f"remove {p}")
            if not dry_run:
                merge_mod._remove(p)
    return steps


def _finish_xml(rec: Record, dry_run: bool) -> list[str]:
    from .. import libvirt
    from ..libvirt import ChainElement

    x = rec.xml
    assert x is not None
    xml_path, disk = x["path"], x["disk"]
    chain = [ChainElement(p, f) for p, f in x["chain"]]
    if not chain:
        return []
    old = libvirt.read_domain(xml_path)
    src = libvirt.disk_source(old, disk, xml_path=xml_path)
    names_ok = {e.path for e in chain}
    d = rec.data
    names_ok.update(n for n in (d.get("top"), d.get("base"), d.get("kept")) if n)
    if src.path not in names_ok:
        raise DomainXMLError(
            xml_path, f"disk '{disk}' names {src.path}, which the interrupted operation did not "
                      f"touch; not rewriting it (record {rec.path} left in place)")
    new = libvirt.rewrite_disk(old, disk, chain, xml_path=xml_path)
    if new == old:
        return []
    if dry_run:
        return [f"rewrite disk '{disk}' of {xml_path} to name {chain[0].path}"]
    libvirt.write_atomic(xml_path, new)
    return [f"rewrote disk '{disk}' of {xml_path} to name {chain[0].path}"]


__all__ = ["Record", "begin_merge", "begin_xml", "find", "load", "recover", "record_path"]
