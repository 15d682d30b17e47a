"""``pyqcow create [-f qcow2] [-b BACKING [-F FMT]] [-u] [-o opt=val,...] IMAGE [SIZE]``

Like ``qemu-img create``.  With ``-b`` this takes an external snapshot
offline: IMAGE becomes a new, empty qcow2 overlay over BACKING (size from
BACKING unless given; the backing name is stored as given, relative names
relative to IMAGE's directory).  Without ``-F`` the backing format is probed
and a notice names it.

``--domain-xml FILE --disk TARGET`` (with ``-b``): the disk, which must name
BACKING now, is rewritten to name IMAGE -> BACKING's chain; ``--snapshot-xml
FILE [--snapshot-name NAME]`` also writes the ``<domainsnapshot>`` document
``virsh snapshot-create DOMAIN FILE --redefine`` accepts.  Both documents are
planned before IMAGE is created; ``--dry-run`` prints them and creates nothing.
"""

from __future__ import annotations

import os
import sys
import time

from ..chain import host_path, probe_format, resolve_backing
from ..errors import OperationError
from ..newimage import create, parse_options, refuse_backing_loop, round_size
from ..units import format_size, parse_size
from .progress import notice
from .xml import DomainXmlUpdate, add_domain_xml_args, image_chain

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    import argparse  # (loaded only when pyqcow.cli.fastargs cannot read the line)

    from ..libvirt import ChainElement


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "create",
        help="create a qcow2 image or an overlay (external snapshot), like qemu-img create",
        description="Create a qcow2 image of SIZE, or with -b an empty overlay over BACKING.",
    )
    p.add_argument("-f", dest="format", default="qcow2", choices=("qcow2",),
                   help="image format (only qcow2)")
    p.add_argument("-b", dest="backing", metavar="BACKING",
                   help="backing file (stored as given; relative to IMAGE's directory)")
    p.add_argument("-F", dest="backing_format", choices=("qcow2", "raw"), metavar="FMT",
                   help="backing file format: qcow2 or raw (default: probe, with a notice)")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not check the backing file (it may not exist yet; needs SIZE or -F)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="opt=val,... : cluster_size, compat, lazy_refcounts, extended_l2, "
                        "compression_type, refcount_bits, preallocation, backing_file, backing_fmt")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    p.add_argument("--freeze-to", metavar="FROZEN",
                   help="keep IMAGE's name: move its content to FROZEN (a hard link, same "
                        "directory or file system) and make IMAGE an empty qcow2 overlay over it; "
                        "IMAGE reads the same at every instant")
    p.add_argument("--force", action="store_true",
                   help="create over an existing image even if it holds data or other images "
                        "are backed by it (never over a file of BACKING's chain)")
    add_domain_xml_args(p)
    g = p.add_argument_group("libvirt snapshot XML")
    g.add_argument("--snapshot-xml", metavar="FILE",
                   help="with -b: also write a <domainsnapshot> document for "
                        "`virsh snapshot-create DOMAIN FILE --redefine` (needs --disk)")
    g.add_argument("--snapshot-name", metavar="NAME",
                   help="name of the snapshot (default: the current time in seconds, as libvirt)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("size", metavar="SIZE", nargs="?",
                   help="virtual size (k, M, G, T suffixes); default: the backing file's")
    return p


def _create_kwargs(args: argparse.Namespace) -> tuple[dict, int | None]:
    """(keyword arguments of create, size) from the command line."""
    image = args.image
    kwargs: dict = {}
    for opts in args.options:
        kwargs.update(parse_options(image, opts))
    if args.backing is not None:
        kwargs["backing"] = args.backing
    if args.backing_format is not None:
        kwargs["backing_format"] = args.backing_format
    size = None
    if args.size is not None:
        try:
            size = parse_size(args.size)
        except ValueError as e:
            raise OperationError(image, str(e)) from None
    return kwargs, size


def _check_xml_args(args: argparse.Namespace, backing: str | None) -> None:
    image = args.image
    if (args.domain_xml or args.snapshot_xml) and backing is None:
        raise OperationError(image, "--domain-xml and --snapshot-xml need -b BACKING "
                                    "(they describe an external snapshot)")
    if args.snapshot_xml and not args.disk:
        raise OperationError(args.snapshot_xml, "--snapshot-xml needs --disk TARGET")
    if args.snapshot_name is not None and not args.snapshot_xml:
        raise OperationError(image, "--snapshot-name needs --snapshot-xml FILE")


def _plan_xml(args: argparse.Namespace, backing: str | None, backing_format: str | None):
    """(DomainXmlUpdate or None, <domainsnapshot> document or None), planned before
    IMAGE exists."""
    image = args.image
    update = DomainXmlUpdate.prepare(args)
    snapshot_doc = None
    new_chain: list[ChainElement] | None = None
    if backing is not None and (update is not None or args.snapshot_xml):
        from .. import libvirt  # lxml: only when XML is in play (start-up time)
        from ..libvirt import ChainElement

        bpath = resolve_backing(image, backing)
        if not os.path.exists(bpath):
            raise OperationError(
                image, f"backing file {backing!r} not found ({bpath}); cannot describe the "
                       "chain in the XML"
            )
        bfmt = backing_format or probe_format(bpath)
        new_chain = [ChainElement(host_path(image), "qcow2"), *image_chain(bpath, bfmt)]
        if update is not None:
            update.require_source(bpath, "the backing file")
            update.plan(new_chain)
        if args.snapshot_xml:
            name = args.snapshot_name or str(int(time.time()))
            snapshot_doc = libvirt.snapshot_xml(
                name, {args.disk: new_chain[0]},
                domain_xml=update.old if update is not None else None,
            )
    return update, snapshot_doc


def _dry_run(args, size, kwargs, update, snapshot_doc) -> int:
    image = args.image
    backing = kwargs.get("backing") or None
    backing_format = kwargs.get("backing_format")
    # every check the real run makes (the lock on an existing IMAGE included)
    create(image, size, unsafe=args.unsafe, force=args.force, dry_run=True, **kwargs)
    desc = f"would create {image} (qcow2"
    if size is not None:
        desc += f", {format_size(round_size(size))}"
    if backing is not None:
        desc += f", backing {backing}"
        if backing_format:
            desc += f" ({backing_format})"
    sys.stdout.write(desc + ")\n")
    if update is not None:
        update.print_diff()
    if snapshot_doc is not None:
        sys.stdout.write(f"would write {args.snapshot_xml}:\n")
        sys.stdout.write(snapshot_doc.decode("utf-8"))
    return 0


def run(args: argparse.Namespace) -> int:
    image = args.image
    if args.freeze_to is not None:
        return _freeze(args)
    kwargs, size = _create_kwargs(args)
    backing = kwargs.get("backing") or None
    _check_xml_args(args, backing)
    if backing is not None and os.path.exists(image):
        refuse_backing_loop(image, backing)  # before the XML is planned

    # 1. plan the XML documents before the image exists
    update, snapshot_doc = _plan_xml(args, backing, kwargs.get("backing_format"))
    if args.dry_run:
        return _dry_run(args, size, kwargs, update, snapshot_doc)

    # 2. the image
    if update is not None:
        update.begin("create", image)
    try:
        probed = create(image, size, unsafe=args.unsafe, force=args.force, **kwargs)
    except BaseException as e:
        if update is not None:
            update.abandon(e)
        raise
    if probed is not None:
        notice(args, f"{image}: backing file format not given; probed {probed} "
                     f"(pass -F {probed} to say so)")

    # 3. the documents
    if update is not None:
        update.apply(image, "qcow2")
    if snapshot_doc is not None:
        from .. import libvirt

        libvirt.write_atomic(args.snapshot_xml, snapshot_doc)
    return 0


def _freeze(args: argparse.Namespace) -> int:
    from ..ops.freeze import freeze

    if args.backing or args.size or args.options or args.domain_xml or args.snapshot_xml:
        raise OperationError(args.image, "--freeze-to takes only IMAGE (its size, format and "
                                         "backing come from the image itself)")
    if args.dry_run:
        sys.stdout.write(f"would move {args.image}'s content to {args.freeze_to} and make "
                         f"{args.image} an empty overlay over it\n")
        return 0
    freeze(args.image, args.freeze_to)
    return 0
