"""``pyqcow resize [--shrink] [-f FMT] [-q] IMAGE [+|-]SIZE`` (as qemu-img resize).

Prints ``Image resized.`` on success (nothing with ``-q``).  ``-SIZE`` may be
given without ``--`` (the last argument is always the size, as in qemu-img).
"""

from __future__ import annotations

import argparse

from ..errors import OperationError
from ..ops.resize import resize
from .cache import add_cache_options


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--format", choices=("qcow2", "raw"),
                   help="image format (default: probe)")
    p.add_argument("--shrink", action="store_true",
                   help="allow cutting off data past the new end (without it a shrink is "
                        "refused while data lies there)")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "resize",
        help="grow or shrink an image's virtual disk (like qemu-img resize)",
        description=(
            "Set the virtual size of IMAGE (qcow2 or raw) to SIZE, or grow (+SIZE) or shrink "
            "(-SIZE) it by that much.  Sizes take the suffixes k, M, G, T, P, E.  A qcow2 "
            "size must be a multiple of 512.  Growing zeroes the new area when the backing "
            "file is longer.  Shrinking is refused while data lies past the new end unless "
            "--shrink is given; then the clusters past the end are freed."
        ),
    )
    _add_options(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="[+|-]SIZE")
    add_cache_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    # the last argument is the size even if it starts with '-' (qemu-img does the same)
    rest = [a for a in args.rest if a != "--"]
    if not rest:
        raise OperationError(args.image, "missing the new size ([+|-]SIZE)")
    size = rest.pop()
    if rest:
        extra = argparse.ArgumentParser(prog="pyqcow resize", add_help=False)
        _add_options(extra)
        extra.add_argument("-t", dest="cache")
        try:
            more, unknown = extra.parse_known_args(rest)
        except SystemExit:
            raise OperationError(args.image, f"bad arguments: {' '.join(rest)}") from None
        if unknown:
            raise OperationError(args.image, f"unexpected arguments: {' '.join(unknown)}")
        args.shrink = args.shrink or more.shrink
        args.quiet = args.quiet or more.quiet
        args.format = more.format or args.format
        if more.cache is not None:
            from ..hostfile import set_cache_mode

            try:
                set_cache_mode(more.cache)
            except ValueError as e:
                raise OperationError(args.image, str(e)) from None
    resize(args.image, size, shrink=args.shrink, format=args.format)
    if not args.quiet:
        print("Image resized.")
    return 0
