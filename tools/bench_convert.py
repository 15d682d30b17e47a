#!/usr/bin/env python3
"""convert benchmark: pyqcow convert beside qemu-img convert, same flags.

    tools/bench convert [--size-gib 4] [--data-gib 2] [--rounds 3] [--dir DIR]
                        [--cache-dir DIR] [--only raw,qcow2,B,raw-u,qcow2-u,tiz,wm4,...]
                        [--json PATH] [--repo DIR]

Builds (once, cached under --cache-dir, with ``tools/bench_chain.py``'s builder) a
chain: a qcow2 base of SIZE GiB (64 KiB clusters) holding DATA GiB of random
bytes in 256 KiB chunks spread over the disk, and a top in which 5% of the
clusters were rewritten by qemu-io.  The chain is copied into the scratch
directory (--dir; untimed), so that source and outputs share one file system (a
reflink XFS there measures the copy-free paths).  Then, --rounds times, it times
qemu-img and pyqcow alternately (the order flips every round), converting the
top (the whole chain) with page cache hot (each side first runs once untimed, so that
every timed run frees its own previous output just before it):

  raw      convert -O raw TOP DST                 durable on both sides: qemu-img
  qcow2    convert -O qcow2 TOP DST               with -t writeback (it flushes at
  B        convert -O qcow2 -B BASE -F qcow2 TOP DST    the end), pyqcow's default
  tiz      convert -n --target-is-zero -O qcow2 TOP DST (DST: a fresh empty qcow2,
                                                          made untimed)
  wm4      convert -W -m 4 -O qcow2 TOP DST
  raw-wm4  convert -W -m 4 -O raw TOP DST
  raw-u, qcow2-u, tiz-u, wm4-u   the same with -t unsafe for pyqcow beside
           qemu-img's default (which is unsafe for convert: no flush of the output)

pyqcow runs as ``python -m pyqcow.cli.main convert ...`` (a fresh process, like
qemu-img).  Reported: median wall time and CPU time (user+sys of the child) of
each and the ratio pyqcow/qemu-img (goal <= 0.8 on ext4, <= 0.2 on a reflink
file system; the -t unsafe rows and -B are printed without a goal: issue 14 names
the durable convert rows).  The first round's outputs are checked with ``qemu-img compare``.
``--json PATH`` writes the rows for ``tools/bench all``.  A benchmark, not a
test: it always exits 0 unless its own set-up fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_chain import build  # noqa: E402  (tools/ is not a package)

REPO = Path(__file__).resolve().parent.parent
PYQCOW_REPO = REPO  # --repo: the pyqcow checkout timed (e.g. an older commit's tree)
MiB = 1 << 20
GiB = 1 << 30
CLUSTER = 64 * 1024
CHUNK = 256 * 1024
PY = sys.executable
WB = ["-t", "writeback"]  # qemu-img convert's output is cache=unsafe unless told
UNSAFE = ["-t", "unsafe"]
BASE = "{base}"  # replaced by the base's path

# name: (output format, qemu-img flags, pyqcow flags, JSON row name or None, group)
# group "fs": ext4 or xfs by the file system of --dir; "convert": issue 15's rows
ROWS: dict[str, tuple[str, list[str], list[str], str | None, str]] = {
    "raw": ("raw", WB, [], "convert to raw", "fs"),
    "qcow2": ("qcow2", WB, [], "convert to qcow2", "fs"),
    "B": ("qcow2", [*WB, "-B", BASE, "-F", "qcow2"], ["-B", BASE, "-F", "qcow2"],
          "convert -B", "fs"),
    "raw-u": ("raw", [], UNSAFE, "convert -t unsafe", "fs"),
    "qcow2-u": ("qcow2", [], UNSAFE, "convert to qcow2 -t unsafe", "fs"),
    "tiz": ("qcow2", [*WB, "-n", "--target-is-zero"], ["-n", "--target-is-zero"],
            "convert --target-is-zero -n", "convert"),
    "wm4": ("qcow2", [*WB, "-W", "-m", "4"], ["-W", "-m", "4"], "convert -W -m 4", "convert"),
    "raw-wm4": ("raw", [*WB, "-W", "-m", "4"], ["-W", "-m", "4"], None, "convert"),
    "tiz-u": ("qcow2", ["-n", "--target-is-zero"], [*UNSAFE, "-n", "--target-is-zero"], None,
              "convert"),
    "wm4-u": ("qcow2", ["-W", "-m", "4"], [*UNSAFE, "-W", "-m", "4"], None, "convert"),
}
DEFAULT_ONLY = "raw,qcow2,B,raw-u,qcow2-u,tiz,wm4"
REFLINK_FS = {"xfs", "btrfs", "bcachefs"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def fs_type(path: Path) -> str:
    proc = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                          check=False)
    name = proc.stdout.strip()
    return {"ext2/ext3": "ext4"}.get(name, name) or "unknown"


def timed(argv) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds of the child, exit status, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(PYQCOW_REPO))
    # an installed pyqcow has its bytecode: do not compile every module on every run
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")
    _, status, ru = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    return dt, ru.ru_utime + ru.ru_stime, os.waitstatus_to_exitcode(status), err


def copy_chain(src: dict[str, Path], dest: Path) -> tuple[Path, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    for key in ("base", "top5"):
        run(["cp", "--reflink=never", "--sparse=always", src[key], dest / src[key].name])
    return dest / src["base"].name, dest / src["top5"].name


def bench_row(name: str, base: Path, top: Path, scratch: Path, size: int, rounds: int) -> dict:
    fmt, qflags, pflags, _, _ = ROWS[name]
    times: dict[str, list[float]] = {"qemu": [], "pyqcow": []}
    cpu: dict[str, list[float]] = {"qemu": [], "pyqcow": []}
    problems = []

    def one(who: str) -> tuple[float, float, int, str]:
        out = scratch / f"{who}.{fmt}"
        if out.exists():
            out.unlink()
        flags = [str(base) if f == BASE else f for f in (qflags if who == "qemu" else pflags)]
        if "-n" in flags:  # untimed: the empty target
            run(["qemu-img", "create", "-q", "-f", fmt, out, str(size)])
        cmd = (["qemu-img", "convert"] if who == "qemu"
               else [PY, "-m", "pyqcow.cli.main", "convert"])
        os.sync()
        return timed([*cmd, *flags, "-O", fmt, top, out])

    # untimed, once each: every timed run then frees its own previous output just
    # before it (memory the guest has just used).  Without it the second run of
    # round 1 writes into memory the host has taken back (a Firecracker guest with
    # free page reporting), whose first touch cost 3-5 s of CPU per 2 GiB written
    # (cp and dd pay it the same); it fell on pyqcow in every round 1.
    for who in ("qemu", "pyqcow"):
        one(who)
    for rnd in range(rounds):
        order = ("qemu", "pyqcow") if rnd % 2 == 0 else ("pyqcow", "qemu")
        for who in order:
            secs, used, status, err = one(who)
            if status:
                problems.append(f"{who} exit {status}: {err.strip()[-300:]}")
            times[who].append(secs)
            cpu[who].append(used)
            log(f"  {name} round {rnd + 1} {who}: {secs:.2f} s wall, {used:.2f} s CPU")
        if rnd == 0 and not problems:
            c = subprocess.run(["qemu-img", "compare", "-F", fmt, "-f", fmt,
                                scratch / f"qemu.{fmt}", scratch / f"pyqcow.{fmt}"],
                               capture_output=True, text=True, check=False)
            if c.returncode:
                problems.append(f"outputs differ: {c.stdout.strip()} {c.stderr.strip()}")
    for who in ("qemu", "pyqcow"):
        p = scratch / f"{who}.{fmt}"
        if p.exists():
            p.unlink()
    q, p = statistics.median(times["qemu"]), statistics.median(times["pyqcow"])
    return {"name": name, "qemu": q, "pyqcow": p, "ratio": p / q if q else float("inf"),
            "qemu_cpu": statistics.median(cpu["qemu"]),
            "pyqcow_cpu": statistics.median(cpu["pyqcow"]), "problems": problems}


def json_rows(rows: list[dict], fs: str) -> list[dict]:
    out = []
    reflink = fs in REFLINK_FS
    for r in rows:
        fmt, qflags, _, title, group = ROWS[r["name"]]
        if title is None:
            continue
        goal = 0.2 if group == "fs" and reflink else 0.8
        durable = "writeback" in qflags  # the unsafe rows give qemu-img no -t (its default)
        # issue 14's goals name six durable rows per file system; -t unsafe is printed
        # beside qemu-img's default, and -B is a path the copier must take: no goal
        informational = group == "fs" and (not durable or r["name"] == "B")
        note = (f"-O {fmt}; CPU {r['pyqcow_cpu']:.2f} s vs {r['qemu_cpu']:.2f} s; "
                + ("durable both (qemu-img -t writeback)" if durable
                   else "pyqcow -t unsafe vs qemu-img default"))
        if r["problems"]:
            note += "; PROBLEM: " + r["problems"][0][:120]
        out.append({"group": ("xfs" if reflink else "ext4") if group == "fs" else "convert",
                    "row": title, "pyqcow": round(r["pyqcow"], 3), "anchor": round(r["qemu"], 3),
                    "anchor_name": "qemu-img", "unit": "s", "ratio": round(r["ratio"], 3),
                    "goal": "-" if informational else f"<= {goal}",
                    "ok": ((None if not r["problems"] else False) if informational
                           else r["ratio"] <= goal and not r["problems"]),
                    "note": note})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--data-gib", type=float, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", help="scratch directory for the chain's copy and the outputs "
                    "(default: a temp dir); on a reflink file system it measures the "
                    "copy-free paths")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/pyqcow-bench/convert"))
    ap.add_argument("--only", default=DEFAULT_ONLY, help=f"rows among {','.join(ROWS)}")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    ap.add_argument("--repo", metavar="DIR", help="time the pyqcow of this checkout (its "
                    "package directory first on PYTHONPATH; compiled helpers built there), "
                    "e.g. an export of an older commit, for before/after figures")
    args = ap.parse_args(argv)
    if args.repo:
        global PYQCOW_REPO
        PYQCOW_REPO = Path(args.repo).resolve()
    if shutil.which("qemu-img") is None:
        log("bench convert: qemu-img not found; nothing to compare with")
        return 0
    names = args.only.split(",")
    for name in names:
        if name not in ROWS:
            ap.error(f"unknown row {name!r} (rows: {', '.join(ROWS)})")
    size = int(args.size_gib * GiB) // CLUSTER * CLUSTER
    data = int(args.data_gib * GiB) // CHUNK * CHUNK
    src = build(Path(args.cache_dir), size, data, args.seed)
    scratch = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-convert-"))
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=scratch))
    fs = fs_type(work)
    rows = []
    try:
        base, top = copy_chain(src, work / "chain")
        for name in names:
            rows.append(bench_row(name, base, top, work, size, args.rounds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"convert of a chain (base + 5% top), {args.size_gib:g} GiB disk, {args.data_gib:g} "
          f"GiB data, on {fs}; median of {args.rounds} rounds")
    print(f"{'row':<8} {'pyqcow flags':<28} {'-O':<6} {'qemu-img s':>10} {'pyqcow s':>9} "
          f"{'ratio':>6} {'qemu CPU':>8} {'py CPU':>7}")
    for r in rows:
        fmt, _, pflags, _, _ = ROWS[r["name"]]
        flags = " ".join("BASE" if f == BASE else f for f in pflags) or "-"
        print(f"{r['name']:<8} {flags:<28} {fmt:<6} {r['qemu']:>10.3f} {r['pyqcow']:>9.3f} "
              f"{r['ratio']:>6.2f} {r['qemu_cpu']:>8.2f} {r['pyqcow_cpu']:>7.2f}")
        for msg in r["problems"]:
            print(f"  ! {msg}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": json_rows(rows, fs)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
