"""``pyqcow bitmap (--add | --remove | --clear | --enable | --disable | --merge SRC
[-b SRC_IMAGE [-F SRC_FMT]])... [-g GRANULARITY] [-f FMT] IMAGE NAME`` (as qemu-img bitmap).

The operations run in the order given; ``pyqcow info`` lists the bitmaps as
qemu-img info does.
"""

from __future__ import annotations

import argparse

from ..errors import OperationError
from ..ops.bitmap import BitmapOp, bitmap
from .cache import add_cache_options


class _Op(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        ops = list(getattr(namespace, "ops", None) or [])
        ops.append((self.const, values))
        namespace.ops = ops


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bitmap",
        help="add, remove, clear, enable, disable or merge persistent bitmaps (like qemu-img bitmap)",
        description=(
            "Change persistent dirty bitmap NAME of the qcow2 IMAGE; several operations run in "
            "the order given.  --add makes an empty, enabled bitmap (granularity -g, default "
            "the cluster size between 4k and 64k); --merge SRC sets in NAME every bit set in "
            "bitmap SRC (of IMAGE, or of -b SRC_IMAGE)."
        ),
    )
    for flag, kind, what in (
        ("--add", "add", "create bitmap NAME (empty, enabled)"),
        ("--remove", "remove", "delete bitmap NAME"),
        ("--clear", "clear", "clear every bit of NAME"),
        ("--enable", "enable", "NAME records guest writes from now on"),
        ("--disable", "disable", "NAME stops recording writes"),
    ):
        p.add_argument(flag, action=_Op, const=kind, nargs=0, help=what)
    p.add_argument("--merge", action=_Op, const="merge", metavar="SRC",
                   help="merge bitmap SRC into NAME")
    p.add_argument("-b", dest="source_image", metavar="SRC_IMAGE",
                   help="--merge: SRC is a bitmap of this image")
    p.add_argument("-F", dest="source_format", choices=("qcow2",), help="format of SRC_IMAGE")
    p.add_argument("-g", dest="granularity", metavar="GRANULARITY",
                   help="--add: bytes per bit (a power of two, 512 to 2G; k, M, G suffixes)")
    p.add_argument("-f", "--format", choices=("qcow2", "raw"), help="image format (qcow2)")
    add_cache_options(p)
    p.set_defaults(ops=None)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("name", metavar="NAME")
    return p


def run(args: argparse.Namespace) -> int:
    from ..units import parse_size

    gran = None
    if args.granularity is not None:
        try:
            gran = parse_size(args.granularity, what="granularity")
        except ValueError as e:
            raise OperationError(args.image, str(e)) from None
    ops = [BitmapOp(kind, value if kind == "merge" else None,
                    args.source_image if kind == "merge" else None,
                    args.source_format if kind == "merge" else None)
           for kind, value in args.ops or []]
    if args.source_image is not None and not any(o.kind == "merge" for o in ops):
        raise OperationError(args.image, "-b needs --merge")
    bitmap(args.image, args.name, ops, granularity=gran, format=args.format)
    return 0
