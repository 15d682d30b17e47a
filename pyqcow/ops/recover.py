"""Finishing an interrupted multi-file operation from its intent record
(:mod:`pyqcow.ops.intent`): ``pyqcow recover PATH``, also run by ``pyqcow xml
sync`` and ``pyqcow domain sync``.

- a merge before its commit point (TOP's name still reads TOP through BASE) is
  run again: every step before the commit point is idempotent;
- after it, only the clean-up steps remain (the final backing name, removing
  the other file's external data file) and the XML update;
- a single-image operation followed by an XML update that did not complete
  leaves the XML as it is.
"""

from __future__ import annotations

import os

from ..chain import chain_description, open_image, peek_header, resolve_backing
from ..errors import DomainXMLError, OperationError, QcowError
from . import merge as merge_mod
from .intent import Record, find


def recover(path: str, *, dry_run: bool = False, target: str | None = None) -> list[str]:
    """Finish every interrupted operation recorded about ``path``; the steps taken."""
    done: list[str] = []
    for rec in find(path, target=target):
        done += finish(rec, dry_run)
    return done


def finish(rec: Record, dry_run: bool) -> list[str]:
    """Finish one interrupted operation from its record; the steps taken (or, with
    ``dry_run``, the steps it would take)."""
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



__all__ = ["finish", "recover"]
