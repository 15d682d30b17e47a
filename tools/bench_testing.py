#!/usr/bin/env python3
"""Generation speed of pyqcow.testing: images/s and chains/s at default settings.

    tools/bench testing [--images 200] [--chains 100] [--seed 0] [--profile]
                        [--snapshots N] [--dir DIR]

Draws --images examples of ``images()`` and --chains of ``chains()`` (their
default parameters) through hypothesis's generate phase (``database=None``, no
shrinking, a fixed --seed), exactly as a property test would, each example's
files removed when it ends.  Prints examples/s and, per example, how many
qemu-img/qemu-io processes ran and how much of the wall time they took.
``--profile`` adds a cProfile of the image run (top 25 by cumulative time).
A benchmark, not a test: it prints figures and never fails a test run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

import pyqcow.testing as kit  # noqa: E402

_REAL_RUN = subprocess.run
_SUB = {"n": 0, "t": 0.0}


def _counting_run(*a, **kw):
    t = time.perf_counter()
    try:
        return _REAL_RUN(*a, **kw)
    finally:
        _SUB["n"] += 1
        _SUB["t"] += time.perf_counter() - t


def measure(strategy, n: int, rng_seed: int) -> dict:
    count = [0]

    @seed(rng_seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(ex=strategy)
    def body(ex):
        count[0] += 1
        ex.cleanup()

    _SUB["n"], _SUB["t"] = 0, 0.0
    t0 = time.perf_counter()
    body()
    wall = time.perf_counter() - t0
    return {"n": count[0], "wall": wall, "sub_n": _SUB["n"], "sub_t": _SUB["t"]}


def report(name: str, r: dict) -> None:
    n = max(r["n"], 1)
    print(f"{name:8s} {r['n']:5d} in {r['wall']:6.2f} s = {r['n'] / r['wall']:7.1f} /s   "
          f"qemu processes: {r['sub_n'] / n:4.2f} per example, "
          f"{100 * r['sub_t'] / r['wall']:3.0f}% of the time", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--chains", type=int, default=100)
    ap.add_argument("--snapshots", type=int, default=0, help="images(snapshots=N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where the examples are written")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    subprocess.run = _counting_run  # every qemu-img/qemu-io call the kit makes
    print(f"pyqcow.testing generation, qemu tools: {'yes' if kit.have_qemu() else 'no'}",
          flush=True)
    prof = cProfile.Profile() if args.profile else None
    if args.images:
        if prof:
            prof.enable()
        r = measure(kit.images(snapshots=args.snapshots, directory=args.dir), args.images,
                    args.seed)
        if prof:
            prof.disable()
        report("images", r)
    if args.chains:
        report("chains", measure(kit.chains(directory=args.dir), args.chains, args.seed))
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
        print(s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
