"""``pyqcow commit [-f FMT] [-b BASE] [-d] [-p] [-q] TOP``

Like ``qemu-img commit``: copy every range TOP (and every image between TOP
and BASE) allocates into BASE (TOP's backing file without ``-b``), then empty
TOP unless ``-d``; ``-b`` implies ``-d``, as in qemu-img.  The images' backing
headers are not changed, so the chain seen from TOP stays TOP -> ... -> BASE.

``--domain-xml FILE --disk TARGET``: the disk (which must name TOP) is written
to name that chain, exactly as the headers have it after the commit.
``--dry-run`` prints the number of bytes that would be copied and the XML
diff, and touches nothing.  A base that other overlays also use draws a
warning (committing changes what they read).
"""

from __future__ import annotations

import sys

from ..chain import chain_description, open_image
from ..ops import commit as commit_op
from ..ops.common import locate_base
from ..ops.plan import data_bytes
from ..units import format_size
from .cache import add_cache_options
from .progress import add_progress_args, progress_from_args
from .xml import DomainXmlUpdate, add_domain_xml_args

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    import argparse  # (argparse loads only when pyqcow.cli.fastargs cannot read the line)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "commit",
        help="copy an overlay's data into its backing file (like qemu-img commit)",
        description="Copy the data TOP (and every image above BASE) holds into BASE.",
    )
    p.add_argument("-b", dest="base", metavar="BASE",
                   help="the image of TOP's chain to commit into (default: TOP's backing "
                        "file); implies -d")
    p.add_argument("-d", dest="drop", action="store_true",
                   help="do not empty TOP after the commit")
    p.add_argument("-f", dest="format", choices=("qcow2", "raw"), metavar="FMT",
                   help="format of TOP: qcow2 or raw (default: probe); only a qcow2 image "
                        "has a backing file to commit into")
    add_progress_args(p)
    add_domain_xml_args(p)
    p.add_argument("top", metavar="TOP")
    add_cache_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    update = DomainXmlUpdate.prepare(args)
    with open_image(args.top, "r", format=args.format, force_share=True) as top:
        _parent, base_img = locate_base(top, args.base)
        base_path = base_img.path
        # (planned here for --dry-run only: commit plans again under its locks)
        nbytes = data_bytes(commit_op.plan_commit(top, base_img)) if args.dry_run else 0
        chain = chain_description(top)
    if update is not None:
        update.require_source(args.top, "the image")
        update.plan(chain)
    drop = args.drop or args.base is not None
    if args.dry_run:
        sys.stdout.write(
            f"would commit {format_size(nbytes)} ({nbytes} bytes) from {args.top} into "
            f"{base_path}; {args.top} would be {'kept as it is' if drop else 'emptied'}\n"
        )
        if update is not None:
            update.print_diff()
        return 0
    if update is not None:
        update.begin("commit", args.top)
    bar = progress_from_args(args)
    try:
        commit_op.commit(args.top, base_path if args.base is not None else None,
                         drop=drop, progress=bar)
    except BaseException as e:
        bar.abort()
        if update is not None:
            update.abandon(e)
        raise
    bar.finish()
    if update is not None:
        update.apply(args.top, "qcow2")
    return 0
