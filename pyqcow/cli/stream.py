"""``pyqcow stream [-b BASE] [-p] [-q] TOP``

Pull into TOP every range it does not allocate from the images above BASE
(all of its backing chain without ``-b``), then point TOP's backing at BASE
(none without ``-b``) -- what ``qemu-img rebase -b BASE`` or libvirt's
blockpull does.  Zero ranges stay sparse.

``--domain-xml FILE --disk TARGET``: the disk (which must name TOP) is written
to name TOP -> BASE's chain (TOP alone without ``-b``).  ``--dry-run`` prints
the bytes that would be copied and the XML diff, and touches nothing.
"""

from __future__ import annotations

import sys

from ..chain import chain_description, open_image
from ..ops import stream as stream_op
from ..ops.common import locate_base
from ..units import format_size
from .cache import add_cache_options
from .progress import add_progress_args, progress_from_args
from .xml import DomainXmlUpdate, add_domain_xml_args

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    import argparse  # (argparse loads only when pyqcow.cli.fastargs cannot read the line)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "stream",
        help="pull backing data into an image and shorten its chain (like libvirt blockpull)",
        description="Copy into TOP what the images above BASE provide, then make BASE "
                    "(or nothing) TOP's backing file.",
    )
    p.add_argument("-b", dest="base", metavar="BASE",
                   help="keep this image of TOP's chain as TOP's new backing file "
                        "(default: pull everything; TOP ends with no backing file)")
    add_progress_args(p)
    add_domain_xml_args(p)
    p.add_argument("top", metavar="TOP")
    add_cache_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    update = DomainXmlUpdate.prepare(args)
    with open_image(args.top, "r", force_share=True) as top:
        full = chain_description(top)
        base_img = None
        if args.base is not None:
            _parent, base_img = locate_base(top, args.base)
            index = next(i for i, img in enumerate(top.chain) if img is base_img)
            chain = [full[0], *full[index:]]
        else:
            chain = full[:1]
        # (counted here for --dry-run only: stream plans under its locks)
        nbytes = stream_op.stream_bytes(top, base_img) if args.dry_run else 0
        base_path = base_img.path if base_img is not None else None
    if update is not None:
        update.require_source(args.top, "the image")
        update.plan(chain)
    if args.dry_run:
        sys.stdout.write(
            f"would stream {format_size(nbytes)} ({nbytes} bytes) into {args.top}; its backing "
            f"file would be {base_path or 'none'}\n"
        )
        if update is not None:
            update.print_diff()
        return 0
    if update is not None:
        update.begin("stream", args.top)
    bar = progress_from_args(args)
    try:
        stream_op.stream(args.top, base_path, progress=bar)
    except BaseException as e:
        bar.abort()
        if update is not None:
            update.abandon(e)
        raise
    bar.finish()
    if update is not None:
        update.apply(args.top, "qcow2")
    return 0
