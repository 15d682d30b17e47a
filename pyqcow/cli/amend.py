"""``pyqcow amend [-p] [-q] [-f qcow2] [-t CACHE] -o OPTS IMAGE`` (as qemu-img amend)."""

from __future__ import annotations

import argparse

from ..errors import OperationError
from ..ops.amend import amend, parse_amend_options
from .cache import add_cache_options
from .output import Progress


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "amend",
        help="change the format options of a qcow2 image (like qemu-img amend)",
        description=(
            "Change format options of IMAGE in place: compat=0.10|1.1 (v2|v3; a downgrade is "
            "refused where v2 cannot hold the image: extended L2, zstd, bitmaps, external data "
            "file, internal snapshots), lazy_refcounts=on|off, refcount_bits=1..64 (the "
            "refcount structures are rewritten, crash-safe), data_file=NAME (a new name for "
            "the external data file), data_file_raw=off, size=SIZE (as resize)."
        ),
    )
    p.add_argument("-o", dest="options", action="append", required=True, metavar="OPTS",
                   help="key=value[,key=value...]")
    p.add_argument("-f", "--format", choices=("qcow2",), help="image format (qcow2 only)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    add_cache_options(p)
    p.add_argument("image", metavar="IMAGE")
    return p


def run(args: argparse.Namespace) -> int:
    from ..chain import probe_format

    fmt = args.format or probe_format(args.image)
    if fmt != "qcow2":
        raise OperationError(args.image, f"amend needs a qcow2 image (this one is {fmt})")
    options = parse_amend_options(args.image, ",".join(args.options))
    progress = Progress(args.progress and not args.quiet)
    amend(args.image, options, progress=progress)
    progress.finish()
    return 0
