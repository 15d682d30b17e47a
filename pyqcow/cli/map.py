"""``pyqcow map [--output human|json] [--start-offset N] [--max-length N] IMAGE``

The chain's allocation map, merged into extents exactly as ``qemu-img map``
(7.2) merges and prints them.
"""

from __future__ import annotations

import sys

from ..chain import open_image
from ..errors import OperationError
from ..mapping import chain_status
from .output import map_human, map_json, parse_size

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    import argparse  # (argparse loads only when pyqcow.cli.fastargs cannot read the line)

INT64_MAX = (1 << 63) - 1


def _size(what: str):
    def parse(text: str) -> int:
        try:
            return parse_size(text, what=what)
        except ValueError as e:
            import argparse  # (argparse reports it: pyqcow.cli.fastargs declines)

            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "map",
        help="show which guest ranges are allocated where (like qemu-img map)",
        description="Show the allocation map of an image and its backing chain.",
    )
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="output format (json: exactly what qemu-img map prints)")
    p.add_argument("--start-offset", type=_size("start offset"), default=0, metavar="N",
                   help="first guest byte to map (suffixes k, M, G, ... allowed)")
    p.add_argument("--max-length", type=_size("max length"), default=INT64_MAX, metavar="N",
                   help="map at most N bytes")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the image even if another process (a VM) has it open")
    p.add_argument("-f", "--format", choices=("qcow2", "raw"), help="image format (default: probe)")
    p.add_argument("image", metavar="IMAGE")
    return p


def run(args: argparse.Namespace) -> int:
    with open_image(args.image, "r", format=args.format, force_share=args.force_share) as img:
        start = args.start_offset
        end = min(start + args.max_length, img.virtual_size)
        extents = chain_status(img, start, end - start) if start < end else []
        if args.output == "json":
            if not extents:
                # qemu-img prints its empty initial entry
                sys.stdout.write(map_json([{"start": start, "length": 0, "depth": 0,
                                            "present": False, "zero": False, "data": False}]))
            else:
                sys.stdout.write(map_json([e.as_json() for e in extents]))
            return 0
        for i, e in enumerate(extents):
            if e.data and not e.zero and e.offset is None:
                sys.stdout.write(map_human(extents[:i]))
                raise OperationError(
                    img.path,
                    "the image has compressed clusters, which have no host offset to show; "
                    "use --output=json",
                )
        sys.stdout.write(map_human(extents))
    return 0
