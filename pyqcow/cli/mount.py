"""``pyqcow mount [-U] [--snapshots] [--layers] [-d] [--page-cache] IMAGE MOUNTPOINT``

A read-only FUSE file system (pyqcow/fuse.py) showing the guest disk of IMAGE
as ``MOUNTPOINT/disk.raw``; with ``--snapshots`` each internal snapshot as
``snapshots/NAME.raw``, with ``--layers`` each layer of the backing chain
alone as ``layers/N-FILENAME.raw`` (0 = IMAGE; holes where a layer has no data).

Runs in the foreground until unmounted (``umount MOUNTPOINT``, ``fusermount3 -u
MOUNTPOINT`` or Ctrl-C); ``-d`` mounts and returns, leaving a background
process that ends at unmount.  Reads bypass the kernel's page cache (FUSE
direct_io: the fastest for a pass over the disk); ``--page-cache`` lets the
kernel cache them (needed to mmap the files).  The images are opened read-only with QEMU's
shared read lock (``-U``: without it) and never written, nor their access
times changed.  Everything is checked (mfusepy, the mount point, the chain)
before anything is mounted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from ..chain import open_image
from ..errors import OperationError


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "mount",
        help="mount an image read-only with FUSE (disk.raw, snapshots, layers)",
        description="Mount the guest disk of IMAGE read-only on MOUNTPOINT (FUSE): "
        "MOUNTPOINT/disk.raw; unmount with umount, fusermount3 -u or Ctrl-C.",
    )
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the image even if another process (a VM) has it open")
    p.add_argument("--snapshots", action="store_true",
                   help="also show each internal snapshot as snapshots/NAME.raw")
    p.add_argument("--layers", action="store_true",
                   help="also show each layer of the chain alone as layers/N-FILENAME.raw")
    p.add_argument("-d", "--daemon", action="store_true",
                   help="mount, then return (a background process serves until unmount)")
    p.add_argument("--page-cache", action="store_true",
                   help="let the kernel cache what was read (needed to mmap the files; "
                   "slower for a single pass: by default every read reaches pyqcow "
                   "directly, FUSE direct_io)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users read the mount (FUSE allow_other)")
    p.add_argument("--backing-root", metavar="DIR",
                   help="refuse backing files outside directory DIR")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    return p


def _check_mountpoint(path: str) -> str:
    if not os.path.exists(path):
        raise OperationError(path, "mount point does not exist")
    if not os.path.isdir(path):
        raise OperationError(path, "mount point is not a directory")
    if os.path.ismount(path):
        raise OperationError(path, "is already a mount point (unmount it first)")
    return os.path.abspath(path)


def _wait_mounted(mountpoint: str, pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise OperationError(mountpoint, "the FUSE mount failed (run without -d to see why)")
        if os.path.ismount(mountpoint):
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGTERM)  # before our exit closes (and unlocks) the shared files
    os.waitpid(pid, 0)
    raise OperationError(mountpoint, f"not mounted after {timeout:.0f} s")


def run(args: argparse.Namespace) -> int:
    from .. import fuse, hostfile

    mfusepy = fuse.load_mfusepy()
    mountpoint = _check_mountpoint(args.mountpoint)
    if not os.path.exists("/dev/fuse"):
        raise OperationError("/dev/fuse", "no FUSE device (load the fuse module, or run "
                             "the container with --device /dev/fuse)")
    times = os.stat(args.image) if os.path.exists(args.image) else None
    hostfile.set_noatime(True)  # serving evidence must not change its access time
    opened = []
    try:
        img = open_image(args.image, "r", force_share=args.force_share,
                         backing_root=args.backing_root)
        opened.append(img)
        layers = []
        if args.layers:
            for layer in img.chain:
                one = open_image(layer.path, "r", format=layer.format, backing=False,
                                 force_share=args.force_share)
                opened.append(one)
                layers.append(one)
        if times is None:
            times = os.stat(img.path)
        ops = fuse.ImageFS(fuse.build_tree(img, layers, snapshots=args.snapshots), times)
        options = {
            "foreground": True,
            "nothreads": True,  # one request at a time: the fastest for a Python server
            "max_readahead": 1 << 20,  # sequential readers get 1 MiB requests
            "ro": True,
            "fsname": "pyqcow:" + os.path.abspath(args.image).replace(",", "_"),
            "subtype": "pyqcow",
        }
        if not args.page_cache:
            # every read reaches us with its own size: no readahead of data nobody
            # asked for, no copy kept twice (a loop-mounted guest caches its own)
            options["direct_io"] = True
        if args.allow_other:
            options["allow_other"] = True
        if args.daemon:
            pid = os.fork()
            if pid:
                _wait_mounted(mountpoint, pid)
                sys.stdout.flush()
                # the child holds the images (and their locks): leave without closing
                os._exit(0)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
        try:
            mfusepy.FUSE(ops, mountpoint, **options)
        except RuntimeError as e:
            raise OperationError(mountpoint, f"FUSE mount failed (libfuse status {e})") from None
        if args.daemon:
            for i in reversed(opened):
                i.close()
            os._exit(0)
    finally:
        hostfile.set_noatime(False)
        for i in reversed(opened):
            i.close()
    return 0
