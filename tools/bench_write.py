#!/usr/bin/env python3
"""Guest-write benchmark: pyqcow's writer beside qemu-io, same pattern, same run.

    tools/bench write [--size 1G] [--seq-block 1M] [--rand-ops 20000] [--rand-block 4k]
                      [--cluster-size 64k] [--repeat 3] [--dir DIR]

Patterns, each on a fresh image of --size (qemu-img create -f qcow2):
  seq   sequential --seq-block writes covering the whole disk (MB/s)
  rand  --rand-ops writes of --rand-block at random block-aligned offsets
        (a fixed seed, so both engines write the same offsets; ops/s, MB/s)
pyqcow: pyqcow.open(path, "r+"), write() per request, close() (the final flush
with its fsyncs is inside the timing).  qemu-io: the same requests fed as a
command script on stdin ("write -P 0xNN OFF LEN" lines), qemu-io's default
writeback cache (``-t writeback``; its close flushes), process start-up
included (shown separately as "qemu-io start-up").  ``--writethrough``: every
request is made durable before the next (pyqcow: flush() after each write;
qemu-io: its default writethrough mode).  Best of --repeat runs.  Ratios are
pyqcow time / qemu-io time (lower is better for pyqcow).  Never fails a test run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyqcow
from pyqcow.units import parse_size


def _create(path: Path, size: int, cluster_size: int) -> None:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
         str(path), str(size)],
        check=True,
    )


def _requests(pattern: str, size: int, args) -> list[tuple[int, int]]:
    if pattern == "seq":
        b = args.seq_block
        return [(off, min(b, size - off)) for off in range(0, size, b)]
    b = args.rand_block
    r = random.Random(1234)
    return [(r.randrange(size // b) * b, b) for _ in range(args.rand_ops)]


def run_pyqcow(path: Path, reqs: list[tuple[int, int]], writethrough: bool) -> float:
    payload = {}
    t0 = time.perf_counter()
    img = pyqcow.open(path, "r+")
    for off, n in reqs:
        buf = payload.get(n)
        if buf is None:
            buf = payload[n] = bytes([0x5A]) * n
        img.write(off, buf)
        if writethrough:
            img.flush()
    img.close()
    return time.perf_counter() - t0


def run_qemu_io(path: Path, reqs: list[tuple[int, int]], writethrough: bool) -> float:
    script = "".join(f"write -q -P 0x5a {off} {n}\n" for off, n in reqs) + "quit\n"
    cache = [] if writethrough else ["-t", "writeback"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", *cache, str(path)], input=script, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
    )
    dt = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"qemu-io failed: {proc.stderr.strip()}")
    return dt


def qemu_startup(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "quit", str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _verify(path: Path) -> str:
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True,
                       check=False)
    return "clean" if r.returncode == 0 else f"check exit {r.returncode}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1G"))
    p.add_argument("--seq-block", type=parse_size, default=parse_size("1M"))
    p.add_argument("--rand-block", type=parse_size, default=parse_size("4k"))
    p.add_argument("--rand-ops", type=int, default=20000)
    p.add_argument("--cluster-size", type=parse_size, default=parse_size("64k"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to put the images (default: a temp dir)")
    p.add_argument("--only", choices=("seq", "rand"), default=None)
    p.add_argument("--writethrough", action="store_true",
                   help="make every request durable before the next (fsync per write)")
    args = p.parse_args(argv)
    if not shutil.which("qemu-io"):
        print("bench write: qemu-io not found; pyqcow figures only", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="pyqcow-bench-write-", dir=args.dir))
    try:
        img = tmp / "w.qcow2"
        print(f"guest writes on a fresh {args.size >> 20} MiB qcow2 image "
              f"(cluster_size={args.cluster_size}), "
              f"{'writethrough' if args.writethrough else 'writeback'}, best of {args.repeat}; "
              f"load average {os.getloadavg()[0]:.2f}")
        if shutil.which("qemu-io"):
            _create(img, args.size, args.cluster_size)
            print(f"  qemu-io start-up (open, quit): {qemu_startup(img) * 1000:.1f} ms")
        for pattern in ("seq", "rand"):
            if args.only and pattern != args.only:
                continue
            reqs = _requests(pattern, args.size, args)
            nbytes = sum(n for _, n in reqs)
            results = {}
            for name, fn in (("pyqcow", run_pyqcow), ("qemu-io", run_qemu_io)):
                if name == "qemu-io" and not shutil.which("qemu-io"):
                    continue
                best = None
                for _ in range(args.repeat):
                    if img.exists():
                        img.unlink()
                    _create(img, args.size, args.cluster_size)
                    dt = fn(img, reqs, args.writethrough)
                    best = dt if best is None else min(best, dt)
                results[name] = (best, _verify(img))
            label = (f"seq {args.seq_block >> 10} KiB" if pattern == "seq"
                     else f"rand {args.rand_block >> 10} KiB x {len(reqs)}")
            for name, (dt, state) in results.items():
                print(f"  {label:<22} {name:<8} {dt:8.3f} s  {nbytes / dt / 1e6:9.1f} MB/s "
                      f"{len(reqs) / dt:10.0f} ops/s   image {state}")
            if len(results) == 2:
                ratio = results["pyqcow"][0] / results["qemu-io"][0]
                print(f"  {label:<22} ratio pyqcow/qemu-io time: {ratio:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
