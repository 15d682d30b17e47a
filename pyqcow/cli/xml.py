"""``pyqcow xml sync DOMAIN_XML --disk TARGET [--source FILE] [--dry-run]``, and the
``--domain-xml FILE --disk TARGET [--dry-run]`` plumbing shared by the chain
commands (``create -b``, ``commit``, ``stream``, ``rebase``, ``merge``).

Plan, then apply (as virt-xml does):

1. :meth:`DomainXmlUpdate.prepare` reads the domain XML, finds the disk and
   proves the XML's directory writable (creates and removes a temporary file
   as ``write_atomic`` will) before any image is touched, so an unreadable or
   unwritable XML or an unknown target fails first and nothing is created or
   written (``--dry-run`` shows the same refusal);
2. the command computes the chain the disk will name after the operation
   (absolute paths, formats) and :meth:`DomainXmlUpdate.plan` renders the new
   document with :func:`pyqcow.libvirt.rewrite_disk` (which validates it);
3. ``--dry-run`` prints the unified diff and stops; otherwise the image
   operation runs, and only when it succeeded :meth:`DomainXmlUpdate.apply`
   writes the document atomically.  A failed operation leaves the XML
   byte-identical.

After the operation ``apply`` re-reads the chain from the images; if it is not
the one planned (it should always be), the images win and a warning says so.

``xml sync`` when the disk's ``<source>`` no longer exists (a plain ``merge``
removed it): ``--source FILE`` names the new top (a file of the disk's chain in
the XML, or an image whose backing chain contains one of them); without it,
the existing files of the XML's chain that are not below another one in the
images' chains are the candidates, and exactly one is used, with a warning;
otherwise the sync is refused, listing what exists.  (An interrupted
operation's intent record, when there is one, goes first:
``_pending_operation``.)

``xml sync`` never guesses a format: the top image is opened with the format
the disk's ``<driver type>`` gives (libvirt's own rule: a raw disk is never
probed, so a guest cannot make the host follow a backing file it wrote into a
raw disk); the backing formats come from the images' headers.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

from ..chain import open_image
from ..errors import DomainXMLError, OperationError

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:  # pyqcow.libvirt (and lxml) load on first use
    import argparse  # (loaded only when pyqcow.cli.fastargs cannot read the line)

    from ..libvirt import ChainElement

__all__ = ["DomainXmlUpdate", "add_domain_xml_args", "image_chain", "register", "run"]


# -- chains of images ------------------------------------------------------------------
def image_chain(path: str, fmt: str | None = None) -> list[ChainElement]:
    """The chain ``path`` heads, read from the images (absolute paths), top first."""
    from ..chain import chain_description
    from ..libvirt import ChainElement

    with open_image(path, "r", format=fmt, force_share=True) as img:
        return [ChainElement(p, f) for p, f in chain_description(img)]


def same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_writable(xml_path: str) -> None:
    """Prove that the XML can be replaced: create and remove a temporary file where
    ``write_atomic`` will (next to the file a symlink names, with its naming
    scheme).  DomainXMLError otherwise, before any image is touched."""
    from .. import libvirt

    target = os.path.realpath(xml_path)
    directory = os.path.dirname(target) or "."
    try:
        fd, tmp = libvirt.open_temp(target, 0o600)
    except OSError as e:
        raise DomainXMLError(
            xml_path, f"cannot write a file in its directory {directory} ({e.strerror or e}); "
                      "it could not be updated after the operation, so nothing was done"
        ) from e
    os.close(fd)
    os.unlink(tmp)


# -- the shared options ------------------------------------------------------------------
def add_domain_xml_args(p: argparse.ArgumentParser, *, dry_run: bool = True) -> None:
    g = p.add_argument_group("libvirt domain XML")
    g.add_argument("--domain-xml", metavar="FILE",
                   help="after the operation, rewrite this domain XML so that disk TARGET "
                        "names the resulting image chain")
    g.add_argument("--disk", metavar="TARGET",
                   help="the disk of --domain-xml to rewrite, by its <target dev> (e.g. vda)")
    if dry_run:
        p.add_argument("--dry-run", action="store_true",
                       help="show what would change (plan, XML diff) and touch nothing")


class DomainXmlUpdate:
    """One pending change of one disk of one domain XML file."""

    def __init__(self, path: str, target: str, old: bytes) -> None:
        self.path = path
        self.target = target
        self.old = old
        self.new: bytes | None = None
        self.chain: list[ChainElement] | None = None
        self._record = None

    # 1. before anything else
    @classmethod
    def prepare(cls, args: argparse.Namespace) -> DomainXmlUpdate | None:
        """Read ``--domain-xml`` and check ``--disk`` (None if no XML was asked for)."""
        xml_path = getattr(args, "domain_xml", None)
        target = getattr(args, "disk", None)
        if xml_path is None:
            if target is not None and not getattr(args, "snapshot_xml", None):
                raise OperationError(None, "--disk needs --domain-xml FILE")
            return None
        if not target:
            raise DomainXMLError(xml_path, "--domain-xml needs --disk TARGET (e.g. --disk vda)")
        from .. import libvirt  # lxml loads only when XML is in play (start-up time)

        old = libvirt.read_domain(xml_path)
        libvirt.disk_source(old, target, xml_path=xml_path)  # checks the document and disk
        check_writable(xml_path)
        return cls(xml_path, target, old)

    def source(self) -> ChainElement:
        from .. import libvirt

        return libvirt.disk_source(self.old, self.target, xml_path=self.path)

    def require_source(self, image: str, what: str) -> None:
        """The disk must name ``image`` now (else the rewrite would hit the wrong disk)."""
        src = self.source()
        if not same_path(src.path, image):
            raise DomainXMLError(
                self.path,
                f"disk '{self.target}' names {src.path}, not {what} {os.path.abspath(image)}; "
                "refusing to point it at another chain (check --disk, or run "
                "`pyqcow xml sync` first)",
            )

    # 2. plan
    def plan(self, chain: Sequence[ChainElement | tuple[str, str]]) -> bytes:
        """The new document for ``chain`` (elements, or (path, format) pairs as
        ``chain_description`` gives them: the commands that take --domain-xml
        do not load the libvirt package unless it is given)."""
        from .. import libvirt

        self.chain = [e if isinstance(e, libvirt.ChainElement) else libvirt.ChainElement(*e)
                      for e in chain]
        self.new = libvirt.rewrite_disk(self.old, self.target, self.chain, xml_path=self.path)
        return self.new

    def diff(self) -> str:
        from .. import libvirt

        assert self.new is not None
        return libvirt.unified_diff(self.old, self.new, self.path)

    def print_diff(self) -> None:
        text = self.diff()
        if text:
            sys.stdout.write(text)
        else:
            sys.stdout.write(f"{self.path}: disk '{self.target}' already names this chain\n")

    # 2b. just before the image operation's first change
    def begin(self, op: str, image: str) -> None:
        """Write the intent record (images + this XML) that `pyqcow recover` finishes."""
        from ..ops import intent

        self._record = intent.begin_xml(op, image, self)

    def abandon(self, exc: BaseException) -> None:
        """The image operation failed cleanly (an error, not a crash or Ctrl-C): there
        is nothing to finish, the XML keeps naming the images as they were."""
        from ..errors import QcowError

        if self._record is not None and isinstance(exc, (QcowError, OSError)):
            self._record.finish()
            self._record = None

    # 3. after the operation succeeded
    def apply(self, actual_top: str | None = None, actual_format: str | None = None) -> bytes:
        """Write the planned document (checked against the images' actual chain)."""
        from .. import libvirt

        assert self.new is not None and self.chain is not None
        new = self.new
        if actual_top is not None:
            try:
                actual = image_chain(actual_top, actual_format)
            except Exception:  # noqa: BLE001 - the plan stands if the images cannot be read
                actual = None
            if actual is not None and actual != self.chain:
                warnings.warn(
                    f"{self.path}: the images' chain ({' -> '.join(e.path for e in actual)}) "
                    f"is not the planned one; disk '{self.target}' names the images' chain",
                    stacklevel=2,
                )
                new = self.plan(actual)
        current = libvirt.read_domain(self.path)
        if current != self.old:
            raise DomainXMLError(
                self.path,
                "the domain XML changed while the operation ran; not rewriting it "
                f"(run `pyqcow xml sync {self.path} --disk {self.target}`)",
            )
        if new != self.old:
            libvirt.write_atomic(self.path, new)
        if self._record is not None:
            self._record.finish()
            self._record = None
        return new


# -- xml sync ------------------------------------------------------------------------------
def register(subparsers) -> argparse.ArgumentParser:
    import argparse  # (start-up time: create and rebase import this module)

    p = subparsers.add_parser(
        "xml",
        help="keep a libvirt domain XML true to the image chains",
        description="Edit libvirt domain XML to match image chains.",
    )
    sub = p.add_subparsers(dest="xml_command", metavar="ACTION", required=True)
    s = sub.add_parser(
        "sync",
        help="rewrite a disk's <source>/<backingStore> chain to match the images",
        description="Read the backing chain from the images the disk's <source> names and "
                    "rewrite the disk's <driver>, <source> and <backingStore> elements to "
                    "name exactly that chain (absolute paths, formats, terminated).",
    )
    s.add_argument("domain_xml", metavar="DOMAIN_XML")
    s.add_argument("--disk", metavar="TARGET", required=True,
                   help="the disk to rewrite, by its <target dev> (e.g. vda)")
    s.add_argument("--source", metavar="FILE",
                   help="the image the disk names from now on (its new top): a file of "
                        "the disk's chain in the XML, or an image whose backing chain "
                        "contains one of them; needed when <source> no longer exists and "
                        "the XML's chain does not say which file replaced it")
    s.add_argument("--dry-run", action="store_true",
                   help="print the unified diff of the change and write nothing")
    s.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    # sub-subparsers do not inherit the error behaviour of the root parser
    for parser in (p, s):
        parser.error_status = 1
    return p


def run(args: argparse.Namespace) -> int:
    if args.xml_command == "sync":
        return _sync(args)
    raise OperationError(None, f"unknown xml action {args.xml_command!r}")  # pragma: no cover


def _pending_operation(xml_path: str, target: str):
    """The interrupted multi-file operations (intent records) that concern disk
    ``target`` of the domain XML ``xml_path`` (an empty list if none)."""
    from ..ops import intent

    return intent.find(xml_path, target=target)


def _exists(path: str) -> bool:
    return os.path.isfile(path)


def _heads(elements: list[ChainElement]) -> list[ChainElement]:
    """The existing files of ``elements`` that are not in the backing chain (read
    from the images) of another existing one: the candidates for the new top."""
    existing = [e for e in elements if _exists(e.path)]
    below: list[str] = []
    for e in existing:
        try:
            below += [c.path for c in image_chain(e.path, e.format)[1:]]
        except Exception:  # noqa: BLE001, S112 - an unreadable image is still a candidate
            continue
    return [e for e in existing if not any(same_path(e.path, b) for b in below)]


def _explicit_source(update: DomainXmlUpdate, xml_chain: list[ChainElement], name: str) -> ChainElement:
    """``--source FILE``: a file of the XML's chain, or an image whose chain
    contains one of them (its format: the XML's for a file of the chain, else
    the disk's ``<driver type>``, never probed)."""
    from ..libvirt import ChainElement

    path = os.path.abspath(name)
    if not _exists(path):
        raise OperationError(name, "--source: no such file")
    for e in xml_chain:
        if same_path(e.path, path):
            return ChainElement(path, e.format)
    fmt = xml_chain[0].format
    try:
        chain = image_chain(path, fmt)
    except Exception as e:  # noqa: BLE001 - reported as the reason
        raise DomainXMLError(update.path, f"--source {name}: cannot read its chain ({e})") from e
    if not any(same_path(c.path, e.path) for c in chain for e in xml_chain if _exists(e.path)):
        names = ", ".join(e.path for e in xml_chain)
        raise DomainXMLError(
            update.path,
            f"--source {path} is not a file of disk '{update.target}' ({names}) and its "
            "backing chain contains none of them; refusing to point the disk at another disk",
        )
    return ChainElement(path, fmt)


def _choose_top(update: DomainXmlUpdate, source: str | None, quiet: bool) -> ChainElement:
    """The image the disk names after the sync (see ``xml sync --help``)."""
    from .. import libvirt

    src = update.source()
    xml_chain = libvirt.disk_chain(update.old, update.target, xml_path=update.path)
    if source is not None:
        return _explicit_source(update, xml_chain, source)
    if _exists(src.path) or not os.path.isabs(src.path):
        return src
    pending = _pending_operation(update.path, update.target)
    if pending:
        raise DomainXMLError(
            update.path, f"disk '{update.target}': {src.path} no longer exists and an "
                         f"interrupted operation concerns it; run `pyqcow recover` first"
        )
    heads = _heads(xml_chain[1:])
    if len(heads) == 1:
        new = heads[0]
        if not quiet:
            warnings.warn(
                f"{update.path}: disk '{update.target}' names {src.path}, which no longer "
                f"exists; using {new.path}, the one remaining file of its chain in the XML "
                "(name another with --source FILE)",
                stacklevel=2,
            )
        return new
    existing = [e.path for e in xml_chain if _exists(e.path)]
    if not existing:
        what = "no file of its chain in the XML exists"
        if len(xml_chain) == 1:
            what = "the XML names no backing file of it"
        raise DomainXMLError(
            update.path, f"disk '{update.target}' names {src.path}, which no longer exists, "
                         f"and {what}; name the image with --source FILE"
        )
    raise DomainXMLError(
        update.path, f"disk '{update.target}' names {src.path}, which no longer exists, and "
                     f"more than one file of its chain does ({', '.join(existing)}); name the "
                     "new top with --source FILE"
    )


def _sync(args: argparse.Namespace) -> int:
    # an interrupted operation's intent record goes first: finish it (pyqcow recover)
    from .. import libvirt

    if _pending_operation(args.domain_xml, args.disk):
        from ..ops.recover import recover

        steps = recover(args.domain_xml, dry_run=args.dry_run, target=args.disk)
        if not args.quiet:
            for step in steps:
                sys.stdout.write(step + "\n")
        if args.dry_run:
            return 0
    update = DomainXmlUpdate.prepare(args)
    assert update is not None
    src = _choose_top(update, getattr(args, "source", None), args.quiet)
    if not os.path.isabs(src.path):
        raise DomainXMLError(update.path, f"disk '{update.target}' source {src.path!r} is not absolute")
    if src.format not in libvirt.FORMATS:
        raise DomainXMLError(
            update.path, f"disk '{update.target}' has format {src.format!r}; pyqcow reads qcow2 and raw"
        )
    if src.format == "raw" and not args.quiet:
        from ..chain import probe_format

        try:
            if probe_format(src.path) == "qcow2":
                warnings.warn(
                    f"{src.path}: disk '{update.target}' is raw in the XML but the file has a "
                    "qcow2 header; not trusting it (set <driver type='qcow2'/> if it is qcow2)",
                    stacklevel=2,
                )
        except Exception:  # noqa: BLE001, S110 - the open below reports a missing file
            pass
    chain = image_chain(src.path, src.format)
    update.plan(chain)
    if args.dry_run:
        update.print_diff()
        return 0
    update.apply()
    return 0
