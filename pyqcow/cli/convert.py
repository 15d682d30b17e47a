"""``pyqcow convert [-f FMT] [-O raw] [-p] [-q] [-U] SRC DST``

Writes the guest view of SRC (its whole backing chain) to DST.  ``-O raw``
makes a sparse raw file of the virtual size: ranges that read as zeros become
holes.  Output formats are looked up in ``OUTPUT_FORMATS``; a writer for
another format registers ``OUTPUT_FORMATS["qcow2"] = fn`` (and its options in
``register``), where ``fn(args, src_image, progress) -> None``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..chain import open_image
from ..errors import OperationError
from ..ops.convert import convert_to_raw
from .output import Progress

Writer = Callable[[argparse.Namespace, object, Progress], None]


def _write_raw(args: argparse.Namespace, src, progress: Progress) -> None:
    convert_to_raw(src, args.dst, progress)


#: -O value -> writer.  qcow2 output is added by the writer side.
OUTPUT_FORMATS: dict[str, Writer] = {"raw": _write_raw}


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="copy an image's guest data into a new image (like qemu-img convert)",
        description="Copy the guest view of SRC (through its backing chain) into DST.",
    )
    p.add_argument("-O", dest="output_format", default="raw", metavar="FMT",
                   help="output format: " + ", ".join(OUTPUT_FORMATS) + " (default raw)")
    p.add_argument("-f", "--format", choices=("qcow2", "raw"),
                   help="source format (default: probe)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="read SRC even if another process (a VM) has it open")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    return p


def run(args: argparse.Namespace) -> int:
    writer = OUTPUT_FORMATS.get(args.output_format)
    if writer is None:
        raise OperationError(
            args.dst,
            f"output format {args.output_format!r} is not supported "
            f"(supported: {', '.join(OUTPUT_FORMATS)})",
        )
    with open_image(args.src, "r", format=args.format, force_share=args.force_share) as src:
        progress = Progress(args.progress and not args.quiet)
        writer(args, src, progress)
        progress.finish()
    return 0
