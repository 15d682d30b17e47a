"""``pyqcow check [--output human|json] [-r leaks|all] [-q] [-U] [-f FMT] IMAGE``

Consistency check (and repair) of a qcow2 image with qemu-img check's output:
the same JSON (``--output=json``), the same human report, the same messages on
stderr and the same exit status (0 clean, 1 the check could not complete,
2 corruptions, 3 leaked clusters only, 63 the format has no check: raw).
"""

from __future__ import annotations

import sys

from ..chain import probe_format
from ..check_result import CheckResult
from ..errors import FormatError
from ..ops.check import check
from .output import qemu_json

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    import argparse  # (argparse loads only when pyqcow.cli.fastargs cannot read the line)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "check",
        help="check an image for leaks and corruptions, optionally repair (like qemu-img check)",
        description="Check the refcounts and metadata of a qcow2 image; -r repairs them.",
    )
    p.add_argument(
        "--output",
        choices=("human", "json"),
        default="human",
        help="output format (json: exactly what qemu-img check prints)",
    )
    p.add_argument(
        "-r",
        "--repair",
        choices=("leaks", "all"),
        help="repair leaked clusters only, or all repairable errors",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on stdout")
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="check even if another process (a VM) has the image open (read-only)",
    )
    p.add_argument("-f", dest="format", choices=("qcow2", "raw"), metavar="FMT",
                   help="image format: qcow2 or raw (default: probe); as qemu-img, a raw "
                        "image cannot be checked (exit status 63)")
    p.add_argument("image", metavar="IMAGE")
    return p


#: qemu-img check's exit status when the format has no check ("This image
#: format does not support checks": -ENOTSUP from bdrv_check, qemu-img.c)
EXIT_NOT_SUPPORTED = 63


def human_report(result: CheckResult) -> str:
    """qemu-img's dump_human_image_check (plus the repair preamble of img_check)."""
    out: list[str] = []
    if result.leaks_fixed or result.corruptions_fixed:
        out.append(
            "The following inconsistencies were found and repaired:\n\n"
            f"    {result.leaks_fixed} leaked clusters\n"
            f"    {result.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n"
        )
    if not (result.corruptions or result.leaks or result.check_errors):
        out.append("No errors were found on the image.\n")
    else:
        if result.corruptions:
            out.append(
                f"\n{result.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if result.leaks:
            out.append(
                f"\n{result.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if result.check_errors:
            out.append(f"\n{result.check_errors} internal errors have occurred during the check.\n")
    if result.total_clusters and result.allocated_clusters:
        a, t = result.allocated_clusters, result.total_clusters
        out.append(
            f"{a}/{t} = {a * 100.0 / t:0.2f}% allocated, "
            f"{result.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
            f"{result.compressed_clusters * 100.0 / a:0.2f}% compressed clusters\n"
        )
    if result.image_end_offset:
        out.append(f"Image end offset: {result.image_end_offset}\n")
    return "".join(out)


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    found = probe_format(args.image)  # (also: the file exists and can be read)
    fmt = args.format or found  # a given format is used as given
    if fmt == "raw":
        sys.stderr.write(f"pyqcow: {args.image}: This image format does not support checks\n")
        return EXIT_NOT_SUPPORTED
    if found != "qcow2":
        raise FormatError(args.image, "not a qcow2 image (bad magic), but -f qcow2 was given")
    result = check(args.image, args.repair, log=_stderr_line, force_share=args.force_share)
    if not args.quiet:
        if args.output == "json":
            sys.stdout.write(qemu_json(result.as_qemu_json()) + "\n")
        else:
            sys.stdout.write(human_report(result))
        sys.stdout.flush()
    if result.check_errors:
        sys.stderr.write(f"pyqcow: {result.filename}: Check failed\n")
    return result.exit_code
