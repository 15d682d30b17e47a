"""``pyqcow orphans [--output human|json] [--extract DIR] IMAGE``

Host clusters inside the image file that nothing references (left behind by
discards, deleted snapshots, crashes) and that still hold non-zero bytes, with
a hint of what they look like; and the leaks: unreferenced clusters whose
refcount is not zero.  ``--extract DIR`` writes each orphan and each non-zero
leak to DIR, named after its host offset.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..chain import open_image
from ..errors import OperationError
from ..orphans import extract_regions, find_orphans


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "orphans",
        help="find data in a qcow2 file that nothing references (and leaked clusters)",
        description="List host clusters that nothing references but that hold data, and "
        "leaked clusters; optionally extract them.",
    )
    p.add_argument("--output", choices=("human", "json"), default="human", help="output format")
    p.add_argument("--extract", metavar="DIR",
                   help="write each orphan and each non-zero leak to DIR (file name: its offset)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the image even if another process (a VM) has it open")
    p.add_argument("image", metavar="IMAGE")
    return p


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 3)) == 0:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def _human(report) -> str:
    lines = []
    if report.dirty:
        lines.append("note: the image is dirty (lazy refcounts): stored refcounts may be stale")
    lines.append(f"{len(report.orphans)} orphaned region(s), "
                 f"{sum(r.length for r in report.orphans)} bytes")
    if report.orphans or report.leaks:
        lines.append(f"{'kind':<8}{'host offset':<20}{'length':>12}  {'entropy':>7}  hint")
    for r in report.orphans + report.leaks:
        hint = r.hint + (f" ({r.detail})" if r.detail else "")
        kind = r.category if r.category == "orphan" else f"leak/{r.refcount}"
        line = f"{kind:<8}{r.host_offset:#018x}  {r.length:>12}  {r.entropy:>7.2f}  {hint}"
        if r.file_name:
            line += f"  -> {r.file_name}"
        lines.append(line)
    leaked = sum((r.length + report.cluster_size - 1) // report.cluster_size for r in report.leaks)
    lines.append(f"{leaked} leaked cluster(s) (refcount > 0, unreferenced)")
    for e in report.errors:
        lines.append(f"error: {e}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    with open_image(args.image, "r", force_share=args.force_share, backing=False) as img:
        if img.format != "qcow2":
            raise OperationError(args.image, "not a qcow2 image: it has no host clusters")
        report = find_orphans(img)
        if args.extract:
            extract_regions(img, report, args.extract)
    if args.output == "json":
        json.dump(report.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_human(report))
    return 0
