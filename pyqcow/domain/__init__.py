"""libvirt-managed domains: offline external snapshots, merges and reverts through
the libvirt API, with the domain definition and every snapshot's metadata kept true.

libvirt-python is an optional extra (``pyqcow[libvirt]``), imported only in
``connection``.
Functions take a connection (``libvirt.virConnect``) or a URI; without one,
``$LIBVIRT_DEFAULT_URI`` else ``qemu:///system`` (virsh's rule).

The model (libvirt's own, for a disk-only external snapshot of a shut-off
domain): snapshot NAME of a disk whose file is ``base.qcow2`` creates the
overlay ``base.NAME``; the domain then writes to the overlay; the snapshot's
``<disks>`` names the overlay, and its embedded ``<domain>`` names the files as
they were (the *frozen* files).  Deleting (merging) snapshot S merges S's
overlay (TOP) with its frozen file (BASE) on every disk it covers, with the
engine's merge; every reference to the file that goes away, in the domain
definition and in every remaining snapshot (``<disks>`` and embedded domain),
then names the kept file, and S's metadata is removed (libvirt re-parents its
children).

Every check happens before the first write; an intent record (one per disk
merge, plus one for the metadata) lets :func:`sync` finish after a crash.

Modules (each imports only those above it in this list):

- ``connection``: connecting, the domain and its snapshots as libvirt holds them;
- ``metadata``: XML edits, the plan (DomainPlan), the domain's intent record,
  applying metadata changes;
- ``snapshots``: ``snapshot`` and ``revert``;
- ``merging``: ``merge`` (snapshot deletion);
- ``recovery``: ``sync``;
- ``overview``: ``show`` and ``show_human``.

This package is the layer above :mod:`pyqcow.ops`; nothing below imports it.
"""

from __future__ import annotations

from .connection import DEFAULT_URI, Disk, Domain, DomainError, Snapshot, connect, lookup
from .connection import _all_files as _all_files
from .merging import merge
from .metadata import DomainPlan, MetadataChange
from .overview import show, show_human
from .recovery import sync
from .snapshots import overlay_name, revert, snapshot

__all__ = ["DEFAULT_URI", "Disk", "Domain", "DomainError", "DomainPlan", "MetadataChange",
           "Snapshot", "connect", "lookup", "merge", "overlay_name", "revert", "show",
           "show_human", "snapshot", "sync"]
