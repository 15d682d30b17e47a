"""Keep a libvirt domain XML true to a disk image chain.

This package never opens an image.  It takes a chain description (absolute
paths and formats, top first) and rewrites one ``<disk>`` of a domain XML so
that its ``<driver type>``, ``<source file>`` and nested ``<backingStore>``
elements name exactly that chain, terminated by an empty ``<backingStore/>``
(libvirt then trusts the chain and does not probe the images)::

    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/top.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>

Formatting is preserved: the document is parsed with lxml (one hardened
parser, entities and network off) to find and check the disk, and the change
is then spliced into the original bytes.  Every byte outside the rewritten
``<disk>`` element is left as it was (XML declaration, comments, namespaced
``<metadata>``, quoting style, indentation); inside it, the children that are
not rewritten keep their text, and the new elements are indented like their
siblings.  Libvirt's references: ``docs/formatdomain.rst`` (disk, backingStore),
``docs/kbase/backing_chains.rst``, ``docs/formatsnapshot.rst`` and the RelaxNG
schemas in ``/usr/share/libvirt/schemas``.

Modules (each imports only those above it in this list, and of pyqcow only
``pyqcow.errors``):

- ``markup``: the lexer over the original bytes (element spans), start-tag
  attribute edits that keep every other byte, escaping;
- ``model``: ``ChainElement``, the format and state vocabularies, the checks of
  names, paths and chains handed in;
- ``document``: the one hardened parser, the named XPaths, ``read_domain``;
- ``atomic``: ``open_temp``, ``write_atomic``;
- ``diff``: ``unified_diff``;
- ``splice``: rewriting one ``<disk>`` in the original bytes;
- ``disk``: ``disk_chain``, ``disk_source``, ``rewrite_disk``, ``update_disk``;
- ``snapshot``: ``snapshot_xml`` (a ``<domainsnapshot>`` for ``--redefine``).
"""

from __future__ import annotations

from .atomic import open_temp as open_temp
from .atomic import write_atomic
from .diff import unified_diff
from .disk import disk_chain, disk_source, rewrite_disk, update_disk
from .document import PARSER as PARSER
from .document import XPATH_BACKING_STORE as XPATH_BACKING_STORE
from .document import XPATH_DISK_BY_TARGET as XPATH_DISK_BY_TARGET
from .document import XPATH_DISK_TARGETS as XPATH_DISK_TARGETS
from .document import XPATH_DISKS as XPATH_DISKS
from .document import XPATH_DRIVER as XPATH_DRIVER
from .document import XPATH_FORMAT as XPATH_FORMAT
from .document import XPATH_SOURCE as XPATH_SOURCE
from .document import XPATH_TARGET_DEV as XPATH_TARGET_DEV
from .document import read_domain
from .markup import _scan as _scan
from .model import FORMATS, SNAPSHOT_DISK_FORMATS, SNAPSHOT_STATES, ChainElement
from .snapshot import snapshot_xml

__all__ = [
    "FORMATS",
    "SNAPSHOT_DISK_FORMATS",
    "SNAPSHOT_STATES",
    "ChainElement",
    "disk_chain",
    "disk_source",
    "read_domain",
    "rewrite_disk",
    "snapshot_xml",
    "unified_diff",
    "update_disk",
    "write_atomic",
]
