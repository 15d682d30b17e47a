#!/usr/bin/env python3
"""Before/after: one pyqcow command, two checkouts, timed alternately in one run.

    tools/bench ab --old DIR [--new DIR] --src DIR --files A,B,... [--dir SCRATCH]
                   [--rounds N] -- COMMAND ARGS...

Each round copies FILES from --src into a fresh scratch directory (``cp
--reflink=never --sparse=always``: real copies, so a reflink file system starts
each run from unshared extents), drops nothing from the page cache but runs
``sync`` first, then times ``pyqcow COMMAND ARGS...`` run there by each checkout
(its package directory first on PYTHONPATH; compiled helpers must be built in
it, e.g. copied from this tree) followed by an fsync of every file in the scratch
directory, so that both pay for durability.  The order alternates each round.
Prints every time and the medians, and the ratio new/old.  A machine whose
speed drifts during a session moves both sides alike, which separate runs of
``tools/bench chain`` do not.

Example (commit 50% of the bench chain, the working tree against HEAD~3):

    git worktree add /tmp/old HEAD~3 && cp pyqcow/*.so /tmp/old/pyqcow/
    tools/bench ab --old /tmp/old --src ~/.cache/pyqcow-bench/chain/s2048m-d1024m-r1 \\
        --files base.qcow2,top50.qcow2 --dir /mnt/xfs/ab -- commit -q top50.qcow2

A benchmark, not a test: it fails only when a run fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_chain import sync_dir  # (tools/ is this script's first path entry)

REPO = Path(__file__).resolve().parent.parent


def timed_run(tree: Path, scratch: Path, src: Path, files: list[str], argv: list[str]) -> float:
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for name in files:
        subprocess.run(["cp", "--reflink=never", "--sparse=always", str(src / name),
                        str(scratch / name)], check=True)
    os.sync()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(tree)
    cmd = [sys.executable, "-c", "from pyqcow.cli.main import entry; entry()", *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=scratch, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"tools/bench ab: {tree}: pyqcow {' '.join(argv)} failed "
                 f"({proc.returncode}): {proc.stderr.strip()[-300:]}")
    sync_dir(scratch)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, type=Path, help="the checkout to compare with")
    ap.add_argument("--new", type=Path, default=REPO, help="default: this checkout")
    ap.add_argument("--src", required=True, type=Path, help="where FILES are copied from")
    ap.add_argument("--files", required=True, help="comma list of the files the command uses")
    ap.add_argument("--dir", type=Path, help="scratch directory (default: a temp dir; give "
                    "one on the file system to measure, e.g. XFS with reflink)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no pyqcow command given (after --)")
    for tree in (args.old, args.new):
        if not (tree / "pyqcow" / "__init__.py").is_file():
            ap.error(f"{tree}: not a pyqcow checkout (no pyqcow/__init__.py)")
    files = args.files.split(",")
    for name in files:
        if not (args.src / name).is_file():
            ap.error(f"{args.src / name}: no such file")
    scratch_root = args.dir
    made = None
    if scratch_root is None:
        import tempfile

        made = scratch_root = Path(tempfile.mkdtemp(prefix="pyqcow-bench-ab-"))
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    times: dict[str, list[float]] = {"old": [], "new": []}
    try:
        for rnd in range(args.rounds):
            for who in ("old", "new") if rnd % 2 == 0 else ("new", "old"):
                dt = timed_run(trees[who], scratch_root / "run", args.src, files, command)
                times[who].append(dt)
                print(f"  round {rnd + 1} {who}: {dt:.3f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch_root / "run", ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    print(f"pyqcow {' '.join(command)}: {args.rounds} rounds, alternating, each with an fsync "
          f"of its files")
    for who in ("old", "new"):
        xs = sorted(times[who])
        print(f"{who:<4} {trees[who]}  median {statistics.median(xs):.3f} s  "
              f"({' '.join(f'{x:.3f}' for x in xs)})")
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"new/old {new / old:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
