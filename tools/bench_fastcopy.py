#!/usr/bin/env python3
"""Micro-benchmark of pyqcow.fastcopy: copy_runs with the C helper and with the
pure-Python fallback, against ``cp --sparse=never``, on one file (256 MiB by
default; a quarter of it zeros).  Not a test: prints MB/s and never fails.

    python tools/bench_fastcopy.py [--size-mib 256] [--repeat 3] [--dir DIR]

Hot page cache, no fsync: this measures the copy path, not the disk.  Layouts:
"one run" is one contiguous run (copy_file_range does it all); "64 KiB
clusters" is the same data as 4096 runs of 64 KiB to shuffled destinations,
as a qcow2 copy sees it.
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
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyqcow import fastcopy

MiB = 1 << 20
CLUSTER = 64 * 1024


def make_source(path: Path, size: int) -> None:
    """Random data with every fourth MiB zero."""
    rng = random.Random(0)
    with open(path, "wb") as f:
        f.writelines(
            bytes(MiB) if index % 4 == 3 else rng.randbytes(MiB) for index in range(size // MiB)
        )


def best_time(action: Callable[[], object], setup: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        setup()
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    args = parser.parse_args(argv)
    size = args.size_mib * MiB

    with tempfile.TemporaryDirectory(prefix="bench-fastcopy-", dir=args.dir) as scratch:
        src_path = Path(scratch) / "src"
        dst_path = Path(scratch) / "dst"
        make_source(src_path, size)
        src = os.open(src_path, os.O_RDONLY)
        dst = os.open(dst_path, os.O_RDWR | os.O_CREAT, 0o644)

        def fresh_destination() -> None:
            os.ftruncate(dst, 0)

        one_run = [(0, 0, size)]
        order = list(range(size // CLUSTER))
        random.Random(1).shuffle(order)
        clusters = [(i * CLUSTER, slot * CLUSTER, CLUSTER) for i, slot in enumerate(order)]

        rows: list[tuple[str, float, int]] = []  # label, seconds, bytes

        def run_cp() -> None:
            subprocess.run(["cp", "--sparse=never", str(src_path), str(dst_path)], check=True)

        if shutil.which("cp"):
            seconds = best_time(run_cp, fresh_destination, args.repeat)
            rows.append(("cp --sparse=never", seconds, size))

        backends = ["native", "python"] if fastcopy.native_available() else ["python"]
        for layout_name, runs in (("one run", one_run), ("64 KiB clusters", clusters)):
            for skip_zero in (False, True):
                for name in backends:
                    with fastcopy.backend(name):
                        seconds = best_time(
                            lambda runs=runs, skip_zero=skip_zero: fastcopy.copy_runs(
                                src, dst, runs, skip_zero=skip_zero
                            ),
                            fresh_destination,
                            args.repeat,
                        )
                    label = f"copy_runs {name:6} {layout_name}" + (
                        ", skip_zero" if skip_zero else ""
                    )
                    rows.append((label, seconds, size))

        buffer = bytearray(64 * MiB)
        for name in backends:
            with fastcopy.backend(name):
                for label, action in (
                    (f"is_zero {name:6} 64 MiB of zeros", lambda: fastcopy.is_zero(buffer)),
                    (f"zero_runs {name:6} 64 MiB, 4 KiB", lambda: fastcopy.zero_runs(buffer, 4096)),
                ):
                    seconds = best_time(action, lambda: None, args.repeat)
                    rows.append((label, seconds, len(buffer)))
        os.close(src)
        os.close(dst)

    cp_seconds = rows[0][1] if rows[0][0].startswith("cp") else None
    print(f"{args.size_mib} MiB file, best of {args.repeat}, hot cache, no fsync")
    print(f"{'what':48} {'MB/s':>9} {'vs cp':>7}")
    for label, seconds, nbytes in rows:
        ratio = ""
        if cp_seconds and nbytes == size:
            ratio = f"{cp_seconds / seconds:6.2f}x"
        print(f"{label:48} {nbytes / seconds / 1e6:9.0f} {ratio:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
