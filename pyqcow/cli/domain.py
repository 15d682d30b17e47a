"""``pyqcow domain (show|snapshot|merge|revert|sync) DOMAIN ... [--connect URI]``

Offline external snapshots of libvirt-managed (shut-off) domains, with the domain
definition and every snapshot's metadata kept true (see :mod:`pyqcow.domain`).
``--connect`` defaults to ``$LIBVIRT_DEFAULT_URI``, else ``qemu:///system``, as
virsh does; DOMAIN is a name or a UUID.  ``--dry-run`` prints the image plan and
the unified diffs of the domain XML and of each snapshot XML, and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys

from .progress import add_progress_args, progress_from_args


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "domain",
        help="offline external snapshots, merges and reverts of libvirt domains",
        description="Work on a shut-off libvirt domain's disks and snapshot metadata without "
                    "starting QEMU.",
    )
    sub = p.add_subparsers(dest="domain_command", metavar="ACTION", required=True)

    def common(sp, dry_run=True, quiet=True):
        sp.add_argument("--connect", "-c", metavar="URI",
                        help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system)")
        if dry_run:
            sp.add_argument("--dry-run", action="store_true",
                            help="print the plan and the XML diffs; change nothing")
        sp.add_argument("--output", choices=("human", "json"), default="human",
                        help="output format")
        if quiet:
            sp.add_argument("-q", dest="quiet", action="store_true",
                            help="print nothing on success")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
        sp.add_argument("domain", metavar="DOMAIN")
        sp.error_status = 1

    s = sub.add_parser("show", help="the snapshot tree, each disk's chain and merge costs")
    common(s, dry_run=False)
    s = sub.add_parser("snapshot", help="an offline external disk-only snapshot "
                                        "(as virsh snapshot-create-as --disk-only)")
    common(s)
    s.add_argument("name", metavar="NAME", nargs="?",
                   help="snapshot name (default: the current time in seconds, as libvirt)")
    s.add_argument("--disk", action="append", default=[], metavar="TARGET",
                   help="snapshot only this disk (repeat); default: every file-backed disk")
    s.add_argument("--keep-name", action="store_true",
                   help="the live disk keeps its file name: its content moves to base.NAME and "
                        "the file becomes an empty overlay over it")
    s.add_argument("--description", metavar="TEXT", help="snapshot description")
    s = sub.add_parser("merge", help="delete an external snapshot by merging its layers "
                                     "(leaf or middle), keeping the name you choose")
    common(s, quiet=False)
    s.add_argument("snapshot", metavar="SNAPSHOT")
    s.add_argument("--keep", choices=("base", "top"), default="base",
                   help="which file name survives on each disk (default: base)")
    s.add_argument("--via", choices=("auto", "commit", "stream"), default="auto",
                   help="copy direction (default auto: the one copying fewer bytes)")
    add_progress_args(s)
    s = sub.add_parser("revert", help="revert to an external snapshot (new overlays over its "
                                      "files; unused files are named, not deleted)")
    common(s)
    s.add_argument("snapshot", metavar="SNAPSHOT")
    s = sub.add_parser("sync", help="make the definition and snapshot metadata true to the "
                                    "images after an interruption (idempotent)")
    common(s)
    p.error_status = 1
    return p


def run(args: argparse.Namespace) -> int:
    from .. import domain as dm

    cmd = args.domain_command
    if cmd == "show":
        info = dm.show(args.connect, args.domain)
        if not args.quiet:
            sys.stdout.write(json.dumps(info, indent=4) + "\n" if args.output == "json"
                             else dm.show_human(info))
        return 0
    if cmd == "snapshot":
        plan = dm.snapshot(args.connect, args.domain, args.name, disks=args.disk,
                           keep_name=args.keep_name, description=args.description,
                           dry_run=args.dry_run)
    elif cmd == "merge":
        bar = None if args.dry_run else progress_from_args(args)
        try:
            plan = dm.merge(args.connect, args.domain, args.snapshot, keep=args.keep,
                            via=args.via, dry_run=args.dry_run, progress=bar)
        except BaseException:
            if bar is not None:
                bar.abort()
            raise
        if bar is not None:
            bar.finish()
    elif cmd == "revert":
        plan = dm.revert(args.connect, args.domain, args.snapshot, dry_run=args.dry_run)
    else:
        plan = dm.sync(args.connect, args.domain, dry_run=args.dry_run)
    if args.output == "json":
        sys.stdout.write(json.dumps(plan.as_json(), indent=4) + "\n")
    elif args.dry_run or not args.quiet and (plan.unused_files or cmd == "sync"):
        sys.stdout.write(plan.human())
    return 0
