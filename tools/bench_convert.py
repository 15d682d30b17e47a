#!/usr/bin/env python3
"""convert options benchmark: pyqcow convert beside qemu-img convert, same flags.

    tools/bench convert [--size-gib 2] [--data-gib 1] [--rounds 3] [--dir DIR]
                        [--cache-dir DIR] [--only plain,tiz,wm4,raw-wm4,tiz-u,wm4-u]

Builds (once, cached under --cache-dir) a qcow2 image of SIZE GiB (64 KiB
clusters) holding DATA GiB of random bytes in 256 KiB chunks spread over the
disk.  Then, --rounds times, it times qemu-img and pyqcow alternately (the
order flips every round) on identical inputs (page cache hot):

  plain    convert -O qcow2 SRC DST
  tiz      convert -n --target-is-zero -O qcow2 SRC DST   (DST: a fresh empty qcow2,
                                                            made untimed)
  wm4      convert -W -m 4 -O qcow2 SRC DST
  raw-wm4  convert -W -m 4 -O raw SRC DST
  tiz-u, wm4-u  the same as tiz and wm4 with -t unsafe on both sides (qemu-img
           convert's own default: it does not flush the output; pyqcow's default,
           writeback, ends with an fsync)

pyqcow runs as ``python -m pyqcow.cli.main convert ...`` (a fresh process, like
qemu-img).  Reported: median wall time of each and the ratio pyqcow/qemu (goal
<= 0.8).  The first round's outputs are checked with ``qemu-img compare``.  A
benchmark, not a test: it always exits 0 unless its own set-up fails.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GiB = 1 << 30
CLUSTER = 64 * 1024
CHUNK = 256 * 1024
PY = sys.executable

# qemu-img convert writes its output with cache=unsafe unless told otherwise (no
# flush after the data: see strace); pyqcow's default is writeback (a final fsync).
# The "-u" rows give both sides -t unsafe: the same durability, like for like.
ROWS = {
    "plain": ("qcow2", []),
    "tiz": ("qcow2", ["-n", "--target-is-zero"]),
    "wm4": ("qcow2", ["-W", "-m", "4"]),
    "raw-wm4": ("raw", ["-W", "-m", "4"]),
    "tiz-u": ("qcow2", ["-t", "unsafe", "-n", "--target-is-zero"]),
    "wm4-u": ("qcow2", ["-t", "unsafe", "-W", "-m", "4"]),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def build(cache: Path, size: int, data: int, seed: int) -> Path:
    d = cache / f"s{size}-d{data}-r{seed}"
    img = d / "src.qcow2"
    if (d / "done").exists():
        return img
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    log(f"building {img} ({size / GiB:g} GiB, {data / GiB:g} GiB of data) ...")
    rng = random.Random(seed)
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for c in sorted(rng.sample(range(size // CHUNK), data // CHUNK)):
            f.seek(c * CHUNK)
            f.write(os.urandom(CHUNK))
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img])
    raw.unlink()
    (d / "done").touch()
    return img


def timed(argv) -> tuple[float, int, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # an installed pyqcow has its bytecode: do not compile every module on every run
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    t0 = time.perf_counter()
    proc = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True,
                          check=False)
    return time.perf_counter() - t0, proc.returncode, proc.stderr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--data-gib", type=float, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", help="scratch directory for the outputs (default: a temp dir)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/pyqcow-bench/convert"))
    ap.add_argument("--only", default=",".join(ROWS))
    args = ap.parse_args(argv)
    if shutil.which("qemu-img") is None:
        log("bench convert: qemu-img not found; nothing to compare with")
        return 0
    size = int(args.size_gib * GiB) // CLUSTER * CLUSTER
    data = int(args.data_gib * GiB) // CHUNK * CHUNK
    src = build(Path(args.cache_dir), size, data, args.seed)
    scratch = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-convert-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for name in args.only.split(","):
            fmt, flags = ROWS[name]
            times: dict[str, list[float]] = {"qemu": [], "pyqcow": []}
            problems = []
            for rnd in range(args.rounds):
                order = ("qemu", "pyqcow") if rnd % 2 == 0 else ("pyqcow", "qemu")
                for who in order:
                    out = scratch / f"{who}.{fmt}"
                    if out.exists():
                        out.unlink()
                    if "-n" in flags:  # untimed: the empty target
                        run(["qemu-img", "create", "-q", "-f", fmt, out, str(size)])
                    cmd = (["qemu-img", "convert"] if who == "qemu"
                           else [PY, "-m", "pyqcow.cli.main", "convert"])
                    secs, status, err = timed([*cmd, *flags, "-O", fmt, src, out])
                    if status:
                        problems.append(f"{who} exit {status}: {err.strip()}")
                    times[who].append(secs)
                if rnd == 0:
                    c = subprocess.run(["qemu-img", "compare", "-F", fmt,
                                        scratch / f"qemu.{fmt}", scratch / f"pyqcow.{fmt}"],
                                       capture_output=True, text=True, check=False)
                    if c.returncode:
                        problems.append(f"outputs differ: {c.stdout.strip()} {c.stderr.strip()}")
            q, p = statistics.median(times["qemu"]), statistics.median(times["pyqcow"])
            rows.append((name, " ".join(flags) or "-", fmt, q, p, p / q, problems))
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"convert of {src} ({args.size_gib:g} GiB, {args.data_gib:g} GiB data), "
          f"median of {args.rounds} rounds")
    print(f"{'row':<8} {'flags':<34} {'-O':<6} {'qemu-img s':>10} {'pyqcow s':>9} {'ratio':>6}")
    for name, flags, fmt, q, p, ratio, problems in rows:
        print(f"{name:<8} {flags:<34} {fmt:<6} {q:>10.3f} {p:>9.3f} {ratio:>6.2f}")
        for msg in problems:
            print(f"  ! {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
