"""``pyqcow compare [-s] [-f FMT] [-F FMT] [-U] [-p] [-q] A B``

Exit status as ``qemu-img compare``: 0 identical, 1 different, 2 error.
Prints qemu-img's messages ("Images are identical.", "Content mismatch at
offset N!") on stdout.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack

from ..chain import open_image
from ..ops.compare import compare_images
from .output import Progress

ERROR_STATUS = 2


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="check whether two images have the same guest content (like qemu-img compare)",
        description="Compare the guest content of two images (each through its backing chain).",
    )
    p.add_argument("-s", dest="strict", action="store_true",
                   help="strict: different sizes or allocation also count as different")
    p.add_argument("-f", dest="fmt_a", choices=("qcow2", "raw"), help="format of A")
    p.add_argument("-F", dest="fmt_b", choices=("qcow2", "raw"), help="format of B")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="read the images even if another process (a VM) has them open")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing, exit status only")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    return p


def run(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        a = stack.enter_context(
            open_image(args.a, "r", format=args.fmt_a, force_share=args.force_share)
        )
        b = stack.enter_context(
            open_image(args.b, "r", format=args.fmt_b, force_share=args.force_share)
        )
        progress = Progress(args.progress and not args.quiet)
        result = compare_images(a, b, strict=args.strict, progress=progress)
        progress.finish()
    if not args.quiet:
        sys.stdout.write("".join(line + "\n" for line in result.lines))
    return 0 if result.identical else 1
