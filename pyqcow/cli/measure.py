"""``pyqcow measure [--output human|json] [-O raw|qcow2] [-o OPTS] (--size N | [-f FMT] IMAGE)``

As qemu-img measure: the bytes a new image needs (``required``) and would need
with every cluster allocated (``fully-allocated``), plus ``bitmaps`` (the space
of the source's persistent bitmaps) for a qcow2 image measured into v3 qcow2.
The JSON is byte-identical to qemu-img 7.2's.
"""

from __future__ import annotations

import argparse
import json

from ..chain import open_image
from ..errors import OperationError
from ..ops.measure import measure
from ..units import parse_size


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "measure",
        help="how large a new image would be (like qemu-img measure)",
        description=(
            "Print the size a new image of format -O needs for the guest data of IMAGE "
            "(through its backing chain), or for an empty disk of --size bytes: "
            "'required' (the clusters that hold data, plus all metadata) and "
            "'fully-allocated' (every cluster).  A qcow2 IMAGE measured into v3 qcow2 also "
            "gives 'bitmaps', the space of its persistent bitmaps."
        ),
    )
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="output format (default human)")
    p.add_argument("-O", dest="output_format", choices=("raw", "qcow2"), default="raw",
                   help="format of the image to measure for (default raw)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTS",
                   help="qcow2 creation options: cluster_size, compat, extended_l2, "
                        "refcount_bits, preallocation, ... (as create)")
    p.add_argument("--size", metavar="N", help="measure an empty disk of N bytes (k, M, G...)")
    p.add_argument("-f", "--format", choices=("qcow2", "raw"),
                   help="format of IMAGE (default: probe)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="read IMAGE even if another process (a VM) has it open")
    p.add_argument("image", nargs="?", metavar="IMAGE")
    return p


def run(args: argparse.Namespace) -> int:
    from ..newimage import parse_options

    where = args.image or "measure"
    if args.size is not None and args.image is not None:
        raise OperationError(where, "--size N cannot be used together with an image")
    if args.size is None and args.image is None:
        raise OperationError(where, "either --size N or one image must be given")
    opts = ",".join(args.options or [])
    # preallocation: measure knows every mode (create writes off and metadata only)
    prealloc = None
    kept = []
    for item in opts.split(",") if opts else []:
        key, _, val = item.partition("=")
        if key.strip() == "preallocation":
            if val not in ("off", "metadata", "falloc", "full"):
                raise OperationError(where, f"invalid value {val!r} for option preallocation: "
                                            "supported: off, metadata, falloc, full")
            prealloc = val
        else:
            kept.append(item)
    options = parse_options(where, ",".join(kept)) if kept else {}
    if prealloc is not None:
        options["preallocation"] = prealloc
    if opts and args.output_format == "raw":
        raise OperationError(where, "-o options need -O qcow2 (raw has no creation options)")
    if args.size is not None:
        try:
            size = parse_size(args.size)
        except ValueError as e:
            raise OperationError(where, str(e)) from None
        result = measure(size=size, output_format=args.output_format, options=options)
    else:
        with open_image(args.image, "r", format=args.format,
                        force_share=args.force_share) as img:
            result = measure(image=img, output_format=args.output_format, options=options)
    if args.output == "json":
        print(json.dumps(result, indent=4))
    else:
        print(f"required size: {result['required']}")
        print(f"fully allocated size: {result['fully-allocated']}")
        if "bitmaps" in result:
            print(f"bitmaps size: {result['bitmaps']}")
    return 0
