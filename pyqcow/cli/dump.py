"""``pyqcow dump [--tables] IMAGE``

Everything on disk as JSON: header fields and feature bits by name, header
extensions (known ones decoded, unknown ones as hex), the L1 table and the
refcount table as ranges, with ``--tables`` every L2 table and refcount block
as ranges too, the snapshot table, the bitmap directory, and for every host
cluster of the file what references it (pyqcow/forensic.py).  Only the image
file itself is read: its backing file is not opened.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..chain import open_image
from ..errors import OperationError
from ..forensic import dump


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "dump",
        help="print every on-disk structure of a qcow2 image as JSON",
        description="Print the header, extensions, tables, snapshots, bitmaps and a map of "
        "every host cluster of a qcow2 image as JSON.",
    )
    p.add_argument("--tables", action="store_true",
                   help="include every L2 table and refcount block (as ranges of entries)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the image even if another process (a VM) has it open")
    p.add_argument("image", metavar="IMAGE")
    return p


def run(args: argparse.Namespace) -> int:
    with open_image(args.image, "r", force_share=args.force_share, backing=False) as img:
        if img.format != "qcow2":
            raise OperationError(args.image, "not a qcow2 image: nothing to dump")
        data = dump(img, tables=args.tables)
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
