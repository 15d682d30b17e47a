"""``pyqcow convert [-f FMT] [-O raw|qcow2] [-c] [-o OPTS] [-B BACKING [-F FMT]] [-l SNAPSHOT]
[-n] [--target-is-zero] [--bitmaps] [-S SIZE] [-m N] [-W] [-t CACHE] [-T SRC_CACHE] [-p] [-q] [-U]
SRC DST``

Writes the guest view of SRC (its whole backing chain) to DST.  ``-O raw``
makes a sparse raw file of the virtual size: ranges that read as zeros become
holes.  ``-l SNAPSHOT`` copies an internal snapshot of SRC instead (qemu-img's
``-l``: ``ID_OR_NAME`` or ``snapshot.id=ID,snapshot.name=NAME``).  Output
formats are looked up in ``OUTPUT_FORMATS``; a writer for another format registers ``OUTPUT_FORMATS["qcow2"] = fn`` (and its options in
``register``), where ``fn(args, src_image, progress) -> None``.
"""

from __future__ import annotations

from ..chain import open_image
from ..errors import OperationError
from ..ops.convert import ConvertOptions, convert_to_raw, snapshot_source
from .cache import add_cache_options
from .output import Progress

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    import argparse  # (argparse loads only when pyqcow.cli.fastargs cannot read the line)
    from collections.abc import Callable

    Writer = Callable[[argparse.Namespace, object, Progress], None]


def _write_raw(args: argparse.Namespace, src, progress: Progress) -> None:
    convert_to_raw(src, args.dst, progress, args.copy_options)


def _write_qcow2(args: argparse.Namespace, src, progress: Progress) -> None:
    from ..newimage import parse_options
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
        opts=args.copy_options,
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
    p.add_argument("-n", dest="existing", action="store_true",
                   help="DST exists: write into it (no create, no truncate; -O names its format); "
                        "it must be at least as large as SRC")
    p.add_argument("--target-is-zero", action="store_true",
                   help="with -n: DST reads as zeros already, so ranges of zeros are skipped")
    p.add_argument("-S", dest="sparse_size", metavar="SPARSE_SIZE", default="4k",
                   help="zero runs of at least this many bytes stay unallocated (default 4k; "
                        "a multiple of 512 up to 16M; 0 allocates everything)")
    p.add_argument("-m", dest="coroutines", metavar="N", default="1",
                   help="copy with N streams (threads) at once, 1..16 (default 1)")
    p.add_argument("--bitmaps", action="store_true",
                   help="qcow2 output: copy the persistent bitmaps of SRC's top image")
    p.add_argument("-W", dest="out_of_order", action="store_true",
                   help="allow out-of-order writes to DST (with -m: the streams write too)")
    add_cache_options(p, source=True)
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    return p


def _copy_options(args: argparse.Namespace) -> ConvertOptions:
    from ..units import parse_size

    if args.target_is_zero and not args.existing:
        raise OperationError(args.dst, "--target-is-zero requires use of -n")
    try:
        sparse = parse_size(args.sparse_size, what="-S sparse size")
    except ValueError as e:
        raise OperationError(args.dst, str(e)) from None
    if sparse % 512 or sparse > 16 << 20:
        raise OperationError(
            args.dst, f"invalid -S {args.sparse_size!r}: sparse sizes are multiples of 512 up "
                      "to 16 MiB (0 allocates everything)"
        )
    try:
        m = int(args.coroutines, 10)
    except ValueError:
        m = 0
    if not 1 <= m <= 16:
        raise OperationError(
            args.dst, f"invalid -m {args.coroutines!r}: the number of copy streams is 1..16"
        )
    return ConvertOptions(
        existing=args.existing, target_is_zero=args.target_is_zero, sparse_size=sparse,
        coroutines=m, out_of_order=args.out_of_order, bitmaps=args.bitmaps,
    )


def run(args: argparse.Namespace) -> int:
    args.copy_options = _copy_options(args)
    writer = OUTPUT_FORMATS.get(args.output_format)
    if writer is None:
        raise OperationError(
            args.dst,
            f"output format {args.output_format!r} is not supported "
            f"(supported: {', '.join(OUTPUT_FORMATS)})",
        )
    if args.output_format != "qcow2":
        for flag, used in (("-c", args.compress), ("-o", args.options), ("--bitmaps", args.bitmaps),
                           ("-B", args.backing), ("-F", args.backing_format)):
            if used:
                raise OperationError(args.dst, f"{flag} needs -O qcow2")
    with open_image(args.src, "r", format=args.format, force_share=args.force_share) as img:
        src = snapshot_source(img, args.snapshot) if args.snapshot is not None else img
        progress = Progress(args.progress and not args.quiet)
        writer(args, src, progress)
        progress.finish()
    return 0
