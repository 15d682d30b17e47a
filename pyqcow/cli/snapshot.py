"""``pyqcow snapshot (-l | -c NAME | -a NAME | -d NAME) [--output human|json] IMAGE``

Internal snapshots, as ``qemu-img snapshot`` (7.2): ``-l`` prints the table
the way qemu-img does (nothing at all when there are no snapshots); JSON is a
list of the entries ``qemu-img info --output=json`` prints under "snapshots".
``-a`` finds an ID first, then a name (qemu's order); ``-d`` a name first, then
an ID; ``-c`` refuses a name that already exists.
"""

from __future__ import annotations

import argparse
import sys

from ..ops.snapshot import apply_snapshot, create_snapshot, delete_snapshot, list_snapshots
from .cache import add_cache_options
from .output import qemu_json, snapshot_row

HEADER = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "snapshot",
        help="list, create, apply or delete internal snapshots (like qemu-img snapshot)",
        description="List, create, apply or delete the internal snapshots of a qcow2 image.",
    )
    op = p.add_mutually_exclusive_group(required=True)
    op.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    op.add_argument("-c", dest="create", metavar="NAME", help="create snapshot NAME")
    op.add_argument("-a", dest="apply", metavar="NAME",
                    help="revert the disk to snapshot NAME (an ID or a name)")
    op.add_argument("-d", dest="delete", metavar="NAME", help="delete snapshot NAME")
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="output format of -l (json: qemu-img info's snapshot entries)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="-l only: read the image even if another process has it open")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("image", metavar="IMAGE")
    add_cache_options(p)
    return p


def snapshot_line(sn) -> str:
    return snapshot_row(sn.id_str, sn.name, sn.vm_state_size, sn.date_sec, sn.vm_clock_nsec, sn.icount)


def format_snapshot_list(snapshots) -> str:
    """qemu-img snapshot -l's text (empty when there are no snapshots)."""
    if not snapshots:
        return ""
    lines = ["Snapshot list:", HEADER]
    lines += [snapshot_line(sn) for sn in snapshots]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.list:
        snapshots = list_snapshots(args.image, force_share=args.force_share)
        if args.output == "json":
            sys.stdout.write(qemu_json([sn.as_qemu_json() for sn in snapshots]) + "\n")
        else:
            sys.stdout.write(format_snapshot_list(snapshots))
        return 0
    if args.force_share:
        from ..errors import OperationError

        raise OperationError(args.image, "-U is only allowed with -l")
    if args.create is not None:
        create_snapshot(args.image, args.create)
    elif args.apply is not None:
        apply_snapshot(args.image, args.apply)
    else:
        delete_snapshot(args.image, args.delete)
    return 0
