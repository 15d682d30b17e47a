"""``pyqcow info [--output human|json] [--backing-chain] [-U] IMAGE``

Like ``qemu-img info`` (7.2): the image is opened on its own, without its
backing file, so a broken chain can still be inspected; ``--backing-chain``
opens the whole chain (pyqcow.chain.open_image: names resolved as qemu does,
loops and missing files refused).  What is reported is computed by
pyqcow.info; this module parses the arguments and prints (pyqcow.cli.output).
JSON is byte-for-byte qemu-img's.
"""

from __future__ import annotations

import sys

from ..info import chain_info
from .output import human_info, qemu_json

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    import argparse  # (argparse loads only when pyqcow.cli.fastargs cannot read the line)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info",
        help="show information about an image (like qemu-img info)",
        description="Show the format, sizes, features, snapshots and backing file of an image.",
    )
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="output format (json: exactly what qemu-img info prints)")
    p.add_argument("--backing-chain", action="store_true",
                   help="also show every image of the backing chain")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the image even if another process (a VM) has it open")
    p.add_argument("-f", "--format", choices=("qcow2", "raw"), help="image format (default: probe)")
    p.add_argument("image", metavar="IMAGE")
    return p


def run(args: argparse.Namespace) -> int:
    infos = chain_info(
        args.image, fmt=args.format, backing_chain=args.backing_chain,
        force_share=args.force_share,
    )
    if args.output == "json":
        sys.stdout.write(qemu_json(infos if args.backing_chain else infos[0]) + "\n")
    else:
        sys.stdout.write("\n".join(human_info(i) for i in infos))
    return 0
