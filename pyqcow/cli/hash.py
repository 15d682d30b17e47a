"""``pyqcow hash [--algorithm sha256] IMAGE[@SNAPSHOT]``

A digest of the guest content (what the VM sees: backing chain included,
zeros where nothing is allocated), streamed in large blocks, for evidence
records.  ``IMAGE@SNAPSHOT`` hashes internal snapshot SNAPSHOT (ID or name);
the name is split at the last '@' only when no file has the whole name.
Prints ``DIGEST  IMAGE[@SNAPSHOT]``.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..chain import open_image
from ..errors import OperationError
from ..forensic import hash_image, new_hash
from .output import Progress


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "hash",
        help="hash the guest content of an image or an internal snapshot",
        description="Print a digest of the guest disk content of IMAGE (or of its internal "
        "snapshot SNAPSHOT).",
    )
    p.add_argument("--algorithm", "-a", default="sha256", metavar="NAME",
                   help="any algorithm Python's hashlib knows (default sha256)")
    p.add_argument("--backing-root", metavar="DIR",
                   help="refuse backing files outside directory DIR")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the image even if another process (a VM) has it open")
    p.add_argument("-p", "--progress", action="store_true", help="show progress on stderr")
    p.add_argument("image", metavar="IMAGE[@SNAPSHOT]")
    return p


def split_snapshot(spec: str) -> tuple[str, str | None]:
    """IMAGE@SNAPSHOT -> (IMAGE, SNAPSHOT); a file with the whole name wins."""
    if os.path.exists(spec) or "@" not in spec:
        return spec, None
    path, _, snap = spec.rpartition("@")
    if not path or not snap:
        return spec, None
    return path, snap


def run(args: argparse.Namespace) -> int:
    new_hash(args.algorithm)  # unknown algorithm: fail before opening anything
    path, snap = split_snapshot(args.image)
    with open_image(path, "r", force_share=args.force_share,
                    backing_root=args.backing_root) as img:
        target = img
        if snap is not None:
            if img.format != "qcow2":
                raise OperationError(path, f"a {img.format} image has no snapshot {snap!r}")
            target = img.snapshot(snap)
        progress = Progress(args.progress)
        digest = hash_image(target, args.algorithm, progress=progress)
        progress.finish()
    sys.stdout.write(f"{digest}  {args.image}\n")
    return 0
