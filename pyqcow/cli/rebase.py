"""``pyqcow rebase [-u] -b BACKING [-F FMT] [-p] [-q] IMAGE``

Like ``qemu-img rebase``.  Safe mode (default) keeps IMAGE's guest content:
where IMAGE allocates nothing, the old and the new backing chain are compared
and the ranges that differ are copied into IMAGE; then the header names
BACKING.  ``-u`` (unsafe) rewrites the header only.  ``-b ""`` removes the
backing file (safe mode first copies everything IMAGE reads through it).
BACKING is stored as given (relative names relative to IMAGE's directory);
names longer than 1023 bytes are refused.

``--domain-xml FILE --disk TARGET``: the disk (which must name IMAGE) is
written to name IMAGE -> BACKING's chain.  ``--dry-run`` prints the change and
the XML diff, and touches nothing.
"""

from __future__ import annotations

import os
import sys

from ..chain import host_path
from ..errors import OperationError
from ..ops import rebase as rebase_op
from .cache import add_cache_options
from .progress import add_progress_args, progress_from_args
from .xml import DomainXmlUpdate, add_domain_xml_args, image_chain

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    import argparse  # (argparse loads only when pyqcow.cli.fastargs cannot read the line)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "rebase",
        help="change an image's backing file (like qemu-img rebase)",
        description="Make BACKING the backing file of IMAGE, keeping IMAGE's guest content "
                    "(unless -u).",
    )
    p.add_argument("-b", dest="backing", metavar="BACKING", required=True,
                   help='the new backing file ("" for none); stored as given')
    p.add_argument("-F", dest="backing_format", choices=("qcow2", "raw"), metavar="FMT",
                   help="format of the new backing file: qcow2 or raw (default: probe)")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="unsafe: only rewrite the header (the new backing must hold the "
                        "same data)")
    p.add_argument("-f", dest="format", choices=("qcow2", "raw"), metavar="FMT",
                   help="format of IMAGE: qcow2 or raw (default: probe); only a qcow2 image "
                        "has a backing file")
    add_progress_args(p)
    add_domain_xml_args(p)
    p.add_argument("image", metavar="IMAGE")
    add_cache_options(p, source=True)
    return p


def run(args: argparse.Namespace) -> int:
    image = args.image
    backing = args.backing or None
    rebase_op.validate(image, backing, args.backing_format, image_format=args.format)
    update = DomainXmlUpdate.prepare(args)
    bpath, bfmt = rebase_op.backing_target(image, backing, args.backing_format)
    if update is not None:
        from ..libvirt import ChainElement  # lxml: only when XML is in play (start-up time)

        update.require_source(image, "the image")
        chain = [ChainElement(host_path(image), "qcow2")]
        if bpath is not None:
            if not os.path.exists(bpath):
                raise OperationError(
                    image, f"new backing file {backing!r} not found ({bpath}); cannot describe "
                           "the chain in the XML"
                )
            chain += image_chain(bpath, bfmt)
        update.plan(chain)
    if args.dry_run:
        how = "header only (unsafe)" if args.unsafe else "keeping the guest content"
        target = f"{backing} ({bfmt or 'format unknown'})" if backing else "none"
        sys.stdout.write(f"would set the backing file of {image} to {target}, {how}\n")
        if update is not None:
            update.print_diff()
        return 0
    if update is not None:
        update.begin("rebase", image)
    bar = progress_from_args(args)
    try:
        rebase_op.rebase(image, backing, backing_format=args.backing_format,
                         unsafe=args.unsafe, progress=bar)
    except BaseException as e:
        bar.abort()
        if update is not None:
            update.abandon(e)
        raise
    bar.finish()
    if update is not None:
        update.apply(image, "qcow2")
    return 0
