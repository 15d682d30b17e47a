"""``pyqcow merge [--keep base|top] [--via auto|commit|stream] [--dry-run]
[--output human|json] [--force] [-p] [-q] TOP``

TOP and its backing file BASE become one image holding TOP's guest content,
at the name ``--keep`` chooses (BASE's, the default, or TOP's); its backing
file is BASE's old backing file, if any; the other file is removed.
``--via auto`` measures both directions from the L2 tables (no data read) and
takes the cheaper: *commit* (copy TOP's clusters into BASE) or *stream* (copy
BASE's clusters that TOP does not override into TOP), plus an atomic rename
when the survivor's name is the other one.  ``--dry-run`` prints the plan with
both directions' byte counts (``--output json``: the plan as JSON).

``--domain-xml FILE --disk TARGET``: the disk (which must name TOP) is written
to name the kept file -> BASE's old backing chain, after the merge succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..chain import chain_description, host_path, open_image
from ..errors import BackingChainError
from ..ops import merge as merge_op
from ..units import format_size
from .cache import add_cache_options
from .progress import add_progress_args, progress_from_args
from .xml import DomainXmlUpdate, add_domain_xml_args


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge",
        help="merge an overlay and its backing file into one image, keeping either name",
        description="Make TOP and its backing file one image at the kept name, copying the "
                    "cheaper direction.",
    )
    p.add_argument("--keep", choices=("base", "top"), default="base",
                   help="which file name survives (default: base)")
    p.add_argument("--via", choices=("auto", "commit", "stream"), default="auto",
                   help="copy direction (default auto: the one copying fewer bytes)")
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="format of the plan printed by --dry-run (json also after a merge)")
    p.add_argument("--force", action="store_true",
                   help="merge even though other images use BASE (or TOP) as their backing "
                        "file, internal snapshots or persistent bitmaps would be lost, a file has "
                        "other hard links, or a name would change format")
    add_progress_args(p)
    add_domain_xml_args(p)
    p.add_argument("top", metavar="TOP")
    add_cache_options(p)
    return p


def _bytes(n: int) -> str:
    return f"{format_size(n) if n else '0 B'} ({n} bytes)"


def human_plan(plan: merge_op.MergePlan) -> str:
    cheaper = "commit" if plan.commit_bytes <= plan.stream_bytes else "stream"
    lines = [
        f"merge {plan.top} into one image at {plan.kept_path} (--keep {plan.keep})",
        f"  top:     {plan.top} ({plan.top_size} bytes)",
        f"  base:    {plan.base} ({plan.base_size} bytes)",
        f"  commit:  {_bytes(plan.commit_bytes)}  copy top's clusters into base",
        (f"  stream:  {_bytes(plan.stream_bytes)}  copy base's clusters top does not override "
        "into top"),
        f"  via:     {plan.via}" + (" (the cheaper direction)" if plan.via == cheaper else ""),
        f"  result:  {plan.kept_path} ({plan.kept_format}, {plan.top_size} bytes), backing file "
        + (f"{plan.new_backing} ({plan.new_backing_format})" if plan.new_backing else "none"),
        f"  removed: {plan.removed_path}" + "".join(f", {p}" for p in plan.removed_files),
        "  steps:",
    ]
    lines += [f"    {i}. {step}" for i, step in enumerate(plan.steps, 1)]
    for r in plan.refusals:
        overridden = plan.force and r.forceable
        lines.append(("  forced:  " if overridden else "  refused: ") + r.line())
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    update = DomainXmlUpdate.prepare(args)
    with open_image(args.top, "r", force_share=True) as top:
        plan = merge_op.plan_merge(args.top, keep=args.keep, via=args.via, force=args.force,
                                   _top=top, _probe_locks=True)
        base = top.backing
        assert base is not None  # plan_merge refuses a top without backing
        rest = chain_description(base)[1:]
    if update is not None:
        update.require_source(args.top, "the image")
        update.plan([(host_path(plan.kept_path), plan.kept_format), *rest])
    if args.dry_run:
        if args.output == "json":
            doc = plan.as_json()
            if update is not None:
                doc["domain_xml"] = {"path": update.path, "disk": update.target,
                                     "diff": update.diff()}
            sys.stdout.write(json.dumps(doc, indent=4) + "\n")
        else:
            sys.stdout.write(human_plan(plan))
            if update is not None:
                update.print_diff()
        # exit as the real run would
        plan.raise_refusals()
        return 0
    plan.raise_refusals()
    bar = progress_from_args(args)
    try:
        done = merge_op.merge(args.top, keep=args.keep, via=plan.via, progress=bar,
                              force=args.force, xml_update=update,
                              _costs=(plan.commit_bytes, plan.stream_bytes))
    except BaseException:
        bar.abort()
        raise
    bar.finish()
    if done.via != plan.via or done.kept_path != plan.kept_path:  # pragma: no cover
        raise BackingChainError(args.top, "merge did not follow its plan")
    if args.output == "json" and not args.quiet:
        sys.stdout.write(json.dumps(done.as_json(), indent=4) + "\n")
    return 0
