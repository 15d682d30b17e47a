"""``pyqcow convert [-f FMT] [-O raw|qcow2] [-c] [-o OPTS] [-B BACKING [-F FMT]] [-l SNAPSHOT] [-p] [-q] [-U] SRC DST``

Writes the guest view of SRC (its whole backing chain) to DST.  ``-O raw``
makes a sparse raw file of the virtual size: ranges that read as zeros become
holes.  ``-l SNAPSHOT`` copies an internal snapshot of SRC instead (qemu-img's
``-l``: ``ID_OR_NAME`` or ``snapshot.id=ID,snapshot.name=NAME``).  Output
formats are looked up in ``OUTPUT_FORMATS``; a writer for another format registers ``OUTPUT_FORMATS["qcow2"] = fn`` (and its options in
``register``), where ``fn(args, src_image, progress) -> None``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..chain import open_image
from ..errors import OperationError
from ..ops.convert import convert_to_raw, snapshot_source
from .output import Progress

Writer = Callable[[argparse.Namespace, object, Progress], None]


def _write_raw(args: argparse.Namespace, src, progress: Progress) -> None:
    convert_to_raw(src, args.dst, progress)


def _write_qcow2(args: argparse.Namespace, src, progress: Progress) -> None:
    from ..create import parse_options
    from ..ops.convert import convert_to_qcow2

    options = parse_options(args.dst, getattr(args, "options", None) or "")
    backing = getattr(args, "backing", None)
    backing_fmt = getattr(args, "backing_format", None)
    if backing_fmt and not backing:
        raise OperationError(args.dst, "-F needs -B (a backing file)")
    convert_to_qcow2(
        src,
        args.dst,
        compress=getattr(args, "compress", False),
        options=options,
        backing=backing,
        backing_format=backing_fmt,
        progress=progress,
    )


#: -O value -> writer.
OUTPUT_FORMATS: dict[str, Writer] = {"raw": _write_raw, "qcow2": _write_qcow2}


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
    p.add_argument("-c", dest="compress", action="store_true",
                   help="qcow2 output: write compressed clusters")
    p.add_argument("-o", dest="options", metavar="OPTS",
                   help="qcow2 output: creation options (cluster_size=..., compat=..., ...)")
    p.add_argument("-B", dest="backing", metavar="BACKING",
                   help="qcow2 output: make DST an overlay of BACKING; write only what differs")
    p.add_argument("-F", dest="backing_format", choices=("qcow2", "raw"),
                   help="format of the -B backing file (default: probe)")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                   help="copy internal snapshot SNAPSHOT of SRC instead of its current state: "
                        "ID_OR_NAME, or snapshot.id=ID[,snapshot.name=NAME] (as qemu-img)")
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
    if args.output_format != "qcow2":
        for flag, used in (("-c", args.compress), ("-o", args.options),
                           ("-B", args.backing), ("-F", args.backing_format)):
            if used:
                raise OperationError(args.dst, f"{flag} needs -O qcow2")
    with open_image(args.src, "r", format=args.format, force_share=args.force_share) as img:
        src = snapshot_source(img, args.snapshot) if args.snapshot is not None else img
        progress = Progress(args.progress and not args.quiet)
        writer(args, src, progress)
        progress.finish()
    return 0
