#!/usr/bin/env python3
"""Scale benchmark: a 4 TiB sparse chain, pyqcow beside qemu-img.

    tools/bench scale [--size-tib 4] [--base-per-l2 2] [--top-l2 4096]
                      [--rounds 3] [--dir DIR] [--cache-dir DIR]
                      [--only map,check,commit,stream,merge] [--json PATH] [--keep]

Builds (once, cached under --cache-dir) a qcow2 base of SIZE TiB (64 KiB
clusters) in which ``qemu-io`` wrote --base-per-l2 random 64 KiB clusters at
random offsets inside every L2 table's 512 MiB span (4 TiB: 8,192 L2 tables, 1
GiB of data), and an overlay in which one random cluster was written in each of
--top-l2 randomly chosen spans.  Then, --rounds times, pyqcow and qemu-img
alternate (the order flips every round):

  map      qemu-img map --output=json TOP   pyqcow map --output=json TOP
  check    qemu-img check BASE              pyqcow check BASE
  commit   qemu-img commit TOP              pyqcow commit TOP       (fresh copies)
  stream   qemu-img rebase -b '' TOP        pyqcow stream TOP       (fresh copies;
           qemu-img's rebase reads every cluster of the virtual disk: it is
           stopped after --qemu-timeout seconds and that time is reported as a
           lower bound, the ratio as an upper bound)
  merge    (no anchor)                      pyqcow merge --dry-run TOP

Fresh copies are made with ``cp --sparse=always`` (untimed).  Reported: the
median wall time, CPU time (user+sys) of each, the ratio pyqcow/qemu-img (goal
<= 0.8; merge --dry-run <= 1 s) and the peak RSS (goal < 100 MiB).  The first
commit/stream round's results are compared with ``qemu-img compare``.  A
benchmark, not a test: it always exits 0 unless its own set-up fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
CLUSTER = 64 * 1024
SPAN = CLUSTER * (CLUSTER // 8)  # guest bytes one L2 table maps
PY = sys.executable


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def timed(argv, cwd=None, timeout: float | None = None) -> tuple[float, float, int, int, str]:
    """(wall s, cpu s, peak RSS bytes, exit status, stderr) of one child process;
    killed after ``timeout`` seconds (exit status None)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # users have bytecode caches
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer is not None:
        timer.start()
    err = proc.stderr.read().decode(errors="replace")
    _, status, ru = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    killed = timer is not None and not timer.is_alive() and dt >= timeout
    if timer is not None:
        timer.cancel()
    rc = None if killed else os.waitstatus_to_exitcode(status)
    return dt, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024, rc, err


# --------------------------------------------------------------------------- images


def _qemu_io(path: Path, offsets: list[int], pats: list[Path]) -> None:
    script = "".join(f"write -q -s {pats[i % len(pats)]} {off} {CLUSTER}\n"
                     for i, off in enumerate(offsets))
    subprocess.run(["qemu-io", "-f", "qcow2", str(path)], input=script.encode(), check=True,
                   stdout=subprocess.DEVNULL)


def build(cache: Path, size: int, per_l2: int, top_l2: int, seed: int) -> dict[str, Path]:
    tag = f"s{size // GiB}g-b{per_l2}-t{top_l2}-r{seed}"
    d = cache / tag
    paths = {"base": d / "base.qcow2", "top": d / "top.qcow2"}
    if (d / "DONE").exists():
        return paths
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    rng = random.Random(seed)
    nspans = size // SPAN
    per_span = SPAN // CLUSTER
    pats = []
    for i in range(16):  # qemu-io fills each write from one of these random files
        pat = d / f"pattern{i}.bin"
        pat.write_bytes(os.urandom(CLUSTER))
        pats.append(pat)
    log(f"building {size / TiB:g} TiB base, {per_l2} clusters in each of {nspans} L2 spans, in {d} ...")
    run(["qemu-img", "create", "-q", "-f", "qcow2", paths["base"], str(size)])
    offsets = []
    for s in range(nspans):
        for c in sorted(rng.sample(range(per_span), per_l2)):
            offsets.append(s * SPAN + c * CLUSTER)
    _qemu_io(paths["base"], offsets, pats)
    log(f"building top: one cluster in each of {top_l2} spans ...")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
         paths["top"].name], cwd=d)
    spans = sorted(rng.sample(range(nspans), min(top_l2, nspans)))
    _qemu_io(paths["top"], [s * SPAN + rng.randrange(per_span) * CLUSTER for s in spans], pats)
    for pat in pats:
        pat.unlink()
    (d / "DONE").touch()
    return paths


def fresh_copy(src: dict[str, Path], dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for key in ("base", "top"):
        run(["cp", "--reflink=never", "--sparse=always", src[key], dest / src[key].name])
    return dest / src["top"].name


# --------------------------------------------------------------------------- operations

CLI = [PY, "-m", "pyqcow.cli.main"]
OPS = {
    # name: (copy?, file the command runs on, qemu argv, pyqcow argv, which file to compare)
    "map": (False, "top", lambda p: ["qemu-img", "map", "--output=json", p],
            lambda p: CLI + ["map", "--output=json", p], None),
    "check": (False, "base", lambda p: ["qemu-img", "check", p],
              lambda p: CLI + ["check", p], None),
    "commit": (True, "top", lambda p: ["qemu-img", "commit", "-q", p],
               lambda p: CLI + ["commit", "-q", p], "base"),
    "stream": (True, "top", lambda p: ["qemu-img", "rebase", "-q", "-b", "", p],
               lambda p: CLI + ["stream", "-q", p], "top"),
    "merge": (False, "top", None, lambda p: CLI + ["merge", "--dry-run", p], None),
}
ROW_NAME = {"merge": "merge --dry-run"}


def measure(name: str, src: dict[str, Path], scratch: Path, rounds: int,
            qemu_timeout: float) -> dict:
    copy, which, qemu, pyq, result = OPS[name]
    sides = {"pyqcow": pyq} | ({"qemu": qemu} if qemu else {})
    times = {w: [] for w in sides}
    cpu = {w: [] for w in sides}
    rss = dict.fromkeys(sides, 0)
    problems: list[str] = []
    stopped = False  # qemu-img ran into the timeout once: not run again
    for rnd in range(rounds):
        order = list(sides) if rnd % 2 else list(sides)[::-1]
        results = {}
        for who in order:
            if who == "qemu" and stopped:
                continue
            d = scratch / who
            if copy:
                fresh_copy(src, d)
                target = d / src[which].name
                os.sync()
            else:
                target = src[which]
            dt, ct, peak, rc, err = timed(sides[who](target), cwd=scratch,
                                          timeout=qemu_timeout if who == "qemu" else None)
            if rc is None:
                stopped = True
                log(f"  {name}: qemu-img stopped after {dt:.0f} s (its time is a lower bound)")
            elif rc != 0 and not (name == "check" and rc in (2, 3)):
                problems.append(f"{who} exit {rc}: {err.strip()[-300:]}")
            times[who].append(dt)
            cpu[who].append(ct)
            rss[who] = max(rss[who], peak)
            if result:
                results[who] = d / src[result].name
            log(f"  {name} round {rnd + 1} {who}: {dt:.2f} s (cpu {ct:.2f} s), {peak / MiB:.0f} MiB")
        if rnd == 0 and result and not problems and not stopped:
            same = subprocess.run(["qemu-img", "compare", "-q", results["qemu"], results["pyqcow"]])
            if same.returncode != 0:
                problems.append("results differ (qemu-img compare)")
    med = {w: statistics.median(v) for w, v in times.items()}
    return {"name": name, "time": med, "cpu": {w: statistics.median(v) for w, v in cpu.items()},
            "rss": rss, "problems": problems, "stopped": stopped}


def to_row(r: dict) -> dict:
    p = r["time"]["pyqcow"]
    rss = r["rss"]["pyqcow"] / MiB
    note = f"RSS {rss:.0f} MiB" + ("" if rss < 100 else " (over 100 MiB)")
    if r.get("stopped"):
        note += f"; qemu-img killed after {r['time']['qemu']:.0f} s: its time is a lower bound"
    if r["problems"]:
        note += "; " + "; ".join(r["problems"])
    if "qemu" in r["time"]:
        q = r["time"]["qemu"]
        ratio = p / q if q else float("inf")
        return {"group": "scale", "row": r["name"], "pyqcow": round(p, 3), "anchor": round(q, 3),
                "anchor_name": "qemu-img", "unit": "s", "ratio": round(ratio, 3),
                "goal": "<= 0.8", "ok": ratio <= 0.8 and rss < 100 and not r["problems"],
                "note": note}
    return {"group": "scale", "row": ROW_NAME.get(r["name"], r["name"]), "pyqcow": round(p, 3),
            "anchor": 1.0, "anchor_name": "1 s", "unit": "s", "ratio": round(p / 1.0, 3),
            "goal": "<= 1 s", "ok": p <= 1.0 and rss < 100 and not r["problems"], "note": note}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-tib", type=float, default=4)
    ap.add_argument("--base-per-l2", type=int, default=2)
    ap.add_argument("--top-l2", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", help="scratch directory for the copies (default: a temp dir)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/pyqcow-bench/scale"))
    ap.add_argument("--only", default="map,check,commit,stream,merge")
    ap.add_argument("--qemu-timeout", type=float, default=300,
                    help="stop a qemu-img run after this many seconds and report that time as "
                         "a lower bound (qemu-img rebase -b '' reads the whole virtual disk: "
                         "hours at 4 TiB); 0: no limit")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        log("bench scale: qemu-img/qemu-io not found; nothing to compare with")
        return 0
    size = int(args.size_tib * TiB) // SPAN * SPAN
    src = build(Path(args.cache_dir), size, args.base_per_l2, args.top_l2, args.seed)
    scratch = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for name in args.only.split(","):
            results.append(measure(name, src, scratch, args.rounds, args.qemu_timeout))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    rows = [to_row(r) for r in results]
    print(f"scale benchmark: {size / TiB:g} TiB disk, {args.base_per_l2} base clusters per L2 span, "
          f"{args.top_l2} top L2 tables, median of {args.rounds} rounds")
    print(f"{'operation':<16} {'qemu-img s':>10} {'pyqcow s':>9} {'cpu q/p s':>11} {'ratio':>6} "
          f"{'goal':>7} {'ok':>4} {'qemu RSS':>9} {'pyqcow RSS':>10}")
    for r, row in zip(results, rows, strict=True):
        q = r["time"].get("qemu")
        cq = r["cpu"].get("qemu")
        print(f"{row['row']:<16} {q if q is not None else float('nan'):>10.2f} {row['pyqcow']:>9.2f} "
              f"{(cq or 0):>5.2f}/{r['cpu']['pyqcow']:<5.2f} {row['ratio']:>6.2f} {row['goal']:>7} "
              f"{'ok' if row['ok'] else 'MISS':>4} {r['rss'].get('qemu', 0) / MiB:>7.0f}Mi "
              f"{r['rss']['pyqcow'] / MiB:>8.0f}Mi")
        for msg in r["problems"]:
            print(f"    problem: {msg}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
