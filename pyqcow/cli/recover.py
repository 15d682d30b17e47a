"""``pyqcow recover [--dry-run] [--disk TARGET] PATH``

Finish a multi-file operation (merge, or a chain operation with
``--domain-xml``) that a crash or a failed later step interrupted, from the
intent record it wrote before its first change.  PATH is an image of the
operation, a domain XML it was updating, or a directory (every record in it).
Prints each step taken; ``--dry-run`` prints them and changes nothing.
"""

from __future__ import annotations

import argparse
import sys

from ..ops.recover import recover


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "recover",
        help="finish an interrupted merge or XML update from its intent record",
        description="Finish every interrupted multi-file operation recorded about PATH (an "
                    "image, a domain XML or a directory).",
    )
    p.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    p.add_argument("--disk", metavar="TARGET",
                   help="with a domain XML: only operations on this disk")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    p.add_argument("path", metavar="PATH")
    return p


def run(args: argparse.Namespace) -> int:
    steps = recover(args.path, dry_run=args.dry_run, target=args.disk)
    if args.quiet:
        return 0
    if not steps:
        sys.stdout.write(f"{args.path}: nothing to recover\n")
    for s in steps:
        sys.stdout.write(s + "\n")
    return 0
