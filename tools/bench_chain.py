#!/usr/bin/env python3
"""Chain-operation benchmark: pyqcow beside qemu-img on identical copies.

    tools/bench chain [--size-gib 2] [--data-gib 1] [--rounds 3] [--dir DIR]
                      [--cache-dir DIR] [--only commit5,commit50,stream,rebase,convert,...]
                      [--api] [--keep] [--json PATH] [--floor]

Builds (once, cached under --cache-dir) a qcow2 base of SIZE GiB (64 KiB
clusters) holding DATA GiB of random bytes in 256 KiB chunks spread over the
disk, and two overlays in which 5% and 50% of the disk's 64 KiB clusters
(chosen at random, holes included) were rewritten by ``qemu-io`` with other
random bytes (each overlay holds exactly the rewritten clusters).  Then, for each operation, --rounds times,
on fresh copies (``cp --reflink=never``, untimed, page cache hot), it times
qemu-img and pyqcow alternately (the order flips every round):

  commit5   qemu-img commit TOP5            pyqcow commit TOP5
  commit50  qemu-img commit TOP50           pyqcow commit TOP50
  stream    qemu-img rebase -b '' TOP5      pyqcow stream TOP5
  rebase    qemu-img rebase -F qcow2 -b TOP50 TOP5   pyqcow rebase (the same: a safe
            rebase onto another chain; both chains are read and compared)
  commit5_unsafe, commit50_unsafe, stream_unsafe, rebase_unsafe: pyqcow with
            ``-t unsafe`` (no fsync at all, timed without the sync after it)
            beside qemu-img's default (timed as above: it fsyncs)
  convert   qemu-img convert -O raw TOP5    pyqcow convert -O raw TOP5
  convert_qcow2  ... -O qcow2 TOP5          pyqcow convert -O qcow2 TOP5

Durability is paid by both: ``sync`` runs before each run (untimed), and
every file of the run's directory is fsync'd after it (timed: the write-back
still pending when the process exits is part of the operation's cost; a
global sync there would also wait for other processes' writes), except for
pyqcow's ``-t unsafe`` rows.

pyqcow runs as ``python -m pyqcow.cli.main ...`` (--api: a python -c calling
the ops API), a fresh process each time like qemu-img, so both timings include
process start-up.  Reported: median wall time of each, the ratio pyqcow/qemu
(goal <= 0.8 on ext4, <= 0.2 on a reflink file system), and the peak RSS of each process (os.wait4; goal < 100 MiB).
The first round's results are checked with ``qemu-img compare`` (a wrong
answer is reported, not hidden).  A benchmark, not a test: it always exits 0
unless its own set-up fails.

Every timed operation reads and writes only files under --dir (the copies of the
chain and the outputs; the cache is only copied from).  On a reflink file system
(XFS made with ``mkfs.xfs -m reflink=1``, btrfs) ``--dir`` there measures the
copy-free paths: pyqcow's copy_file_range runs share extents instead of copying
data, e.g. ``tools/bench chain --dir /mnt/xfs/bench --size-gib 1 --data-gib 0.5``.

``--floor`` also times what this disk does with the base's bytes, as the floor
of the copying rows: ``cp`` of base.qcow2 + fsync of the copy (the page-cache
path), and ``dd bs=4M oflag=direct conv=fsync`` of it (fresh space written
with O_DIRECT), median of --rounds (printed, not in --json).

``--json PATH`` writes the rows of issue 14's table there (``{"rows": [...]}``,
group "ext4" or "xfs" after the file system of --dir; the convert rows are
tools/bench_convert.py's).
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
CLUSTER = 64 * 1024
CHUNK = 256 * 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def timed(argv, cwd=None) -> tuple[float, int, int, str]:
    """(seconds, peak RSS bytes, exit status, stderr) of one child process."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # users have bytecode caches
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")
    _, status, ru = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return dt, ru.ru_maxrss * 1024, proc.returncode, err


# --------------------------------------------------------------------------- images


def build(cache: Path, size: int, data: int, seed: int) -> dict[str, Path]:
    tag = f"s{size // MiB}m-d{data // MiB}m-r{seed}"
    d = cache / tag
    done = d / "DONE"
    paths = {"base": d / "base.qcow2", "top5": d / "top5.qcow2", "top50": d / "top50.qcow2"}
    if done.exists():
        return paths
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    rng = random.Random(seed)
    raw = d / "disk.raw"
    log(f"building {size // GiB} GiB base with {data // MiB} MiB of random data in {d} ...")
    nchunks = size // CHUNK
    chunks = sorted(rng.sample(range(nchunks), data // CHUNK))
    with open(raw, "wb") as f:
        f.truncate(size)
        for c in chunks:
            f.seek(c * CHUNK)
            f.write(os.urandom(CHUNK))
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, paths["base"]])
    nclusters = size // CLUSTER
    pats = []
    for i in range(16):  # qemu-io fills each write from one of these random files
        pat = d / f"pattern{i}.bin"
        pat.write_bytes(os.urandom(CLUSTER))
        pats.append(pat)
    for name, frac in (("top5", 0.05), ("top50", 0.50)):
        log(f"building {name}: {int(frac * 100)}% of the clusters rewritten ...")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             paths[name].name], cwd=d)
        picks = sorted(rng.sample(range(nclusters), int(nclusters * frac)))
        script = "".join(f"write -q -s {pats[i % len(pats)]} {c * CLUSTER} {CLUSTER}\n"
                         for i, c in enumerate(picks))
        subprocess.run(["qemu-io", "-f", "qcow2", paths[name]], input=script.encode(), check=True,
                       stdout=subprocess.DEVNULL)
    for pat in pats:
        pat.unlink()
    raw.unlink()
    done.touch()
    return paths


def fresh_copy(src: dict[str, Path], top: str, dest: Path, extra=()) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for key in ("base", top, *extra):
        run(["cp", "--reflink=never", "--sparse=always", src[key], dest / src[key].name])
    return dest / src[top].name


# --------------------------------------------------------------------------- operations

PY = sys.executable


def _api(code: str) -> list[str]:
    return [PY, "-c", code]


def ops(api: bool) -> dict[str, dict]:
    cli = [PY, "-m", "pyqcow.cli.main"]

    def py(sub: list[str], code: str):
        return (lambda top, out: _api(code.format(top=str(top), out=str(out)))) if api else (
            lambda top, out: cli + [a.format(top=str(top), out=str(out)) for a in sub])

    table = {
        "commit5": dict(top="top5", copy=True,
                        qemu=lambda top, out: ["qemu-img", "commit", "-q", top],
                        pyqcow=py(["commit", "-q", "{top}"],
                                  "from pyqcow.ops.commit import commit; commit({top!r})"),
                        result="base"),
        "commit50": dict(top="top50", copy=True,
                         qemu=lambda top, out: ["qemu-img", "commit", "-q", top],
                         pyqcow=py(["commit", "-q", "{top}"],
                                   "from pyqcow.ops.commit import commit; commit({top!r})"),
                         result="base"),
        "stream": dict(top="top5", copy=True,
                       qemu=lambda top, out: ["qemu-img", "rebase", "-q", "-b", "", top],
                       pyqcow=py(["stream", "-q", "{top}"],
                                 "from pyqcow.ops.stream import stream; stream({top!r})"),
                       result="top"),
        "rebase": dict(top="top5", copy=True, extra=("top50",),
                       qemu=lambda top, out: ["qemu-img", "rebase", "-q", "-F", "qcow2", "-b",
                                              "top50.qcow2", top],
                       pyqcow=py(["rebase", "-q", "-F", "qcow2", "-b", "top50.qcow2", "{top}"],
                                 "from pyqcow.ops.rebase import rebase; "
                                 "rebase({top!r}, 'top50.qcow2', backing_format='qcow2')"),
                       result="top"),
        "convert": dict(top="top5", copy=True,
                        qemu=lambda top, out: ["qemu-img", "convert", "-O", "raw", top, out],
                        pyqcow=py(["convert", "-O", "raw", "{top}", "{out}"],
                                  "import pyqcow; from pyqcow.ops.convert import convert_to_raw; "
                                  "convert_to_raw(pyqcow.open({top!r}), {out!r})"),
                        result="out"),
        "convert_qcow2": dict(top="top5", copy=True,
                              qemu=lambda top, out: ["qemu-img", "convert", "-O", "qcow2", top,
                                                     out],
                              pyqcow=py(["convert", "-O", "qcow2", "{top}", "{out}"],
                                        "import pyqcow; from pyqcow.ops.convert import "
                                        "convert_to_qcow2; "
                                        "convert_to_qcow2(pyqcow.open({top!r}), {out!r})"),
                              result="out"),
    }
    # -t unsafe: pyqcow without any fsync (not timed with the sync after it either)
    for name in ("commit5", "commit50", "stream", "rebase"):
        op = dict(table[name], unsafe=True)
        op["pyqcow"] = _unsafe_op(op["pyqcow"], api)
        table[name + "_unsafe"] = op
    return table


def _unsafe_op(make, api: bool):
    return lambda top, out: _unsafe(make(top, out), api)


def _unsafe(argv: list[str], api: bool) -> list[str]:
    if api:
        return [*argv[:2], "from pyqcow.hostfile import set_cache_mode; "
                "set_cache_mode('unsafe'); " + argv[2]]
    return [*argv[:4], "-t", "unsafe", *argv[4:]]


#: the names of the rows in --json (issue 14's table)
ROW_NAMES = {"commit5": "commit 5%", "commit50": "commit 50%", "stream": "stream",
             "rebase": "rebase"}


def row_name(name: str) -> str:
    base = name.removesuffix("_unsafe")
    return ROW_NAMES.get(base, base) + (" -t unsafe" if name.endswith("_unsafe") else "")


def fs_group(path: Path) -> str:
    proc = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    kind = proc.stdout.strip()
    return "xfs" if kind == "xfs" else "ext4" if kind.startswith("ext") else kind or "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--data-gib", type=float, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", help="scratch directory for the copies and outputs (default: a temp "
                    "dir); on a reflink file system it measures the copy-free paths")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/pyqcow-bench/chain"))
    ap.add_argument("--only", default="commit5,commit50,stream,rebase,commit5_unsafe,"
                    "commit50_unsafe,stream_unsafe,rebase_unsafe,convert,convert_qcow2")
    ap.add_argument("--api", action="store_true", help="run pyqcow through the API, not the CLI")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON there")
    ap.add_argument("--floor", action="store_true",
                    help="also time cp + fsync and dd oflag=direct of the base (the disk's floor)")
    args = ap.parse_args(argv)
    if shutil.which("qemu-img") is None:
        log("bench chain: qemu-img not found; nothing to compare with")
        return 0
    size = int(args.size_gib * GiB) // CLUSTER * CLUSTER
    data = int(args.data_gib * GiB) // CHUNK * CHUNK
    src = build(Path(args.cache_dir), size, data, args.seed)
    scratch = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-chain-"))
    scratch.mkdir(parents=True, exist_ok=True)
    group = fs_group(scratch)
    table = ops(args.api)
    rows = []
    floors = []
    try:
        for name in args.only.split(","):
            rows.append((name, *measure(name, table[name], src, scratch, args.rounds)))
        if args.floor:
            floors = measure_floor(src["base"], scratch, args.rounds)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    goal = 0.2 if group == "xfs" else 0.8
    print(f"chain benchmark: {size / GiB:g} GiB disk, {data / GiB:g} GiB data, on {group}, "
          f"median of {args.rounds} rounds, pyqcow via {'API' if args.api else 'CLI'}, "
          f"fastcopy native={'off' if os.environ.get('PYQCOW_NO_NATIVE') else 'on'}")
    print(f"{'operation':<16} {'qemu-img s':>10} {'pyqcow s':>9} {'ratio':>6} {'goal':>5} "
          f"{'qemu RSS':>9} {'pyqcow RSS':>10}")
    out = []
    for name, q, p, r, rq, rp, problems in rows:
        ok = r <= goal and not problems
        verdict = "-" if name.endswith("_unsafe") and not problems else "ok" if ok else "MISS"
        print(f"{name:<16} {q:>10.2f} {p:>9.2f} {r:>6.2f} {verdict:>5} "
              f"{rq / MiB:>7.0f}Mi {rp / MiB:>8.0f}Mi"
              + ("" if rp < 100 * MiB else "  RSS over 100 MiB"))
        for msg in problems:
            print(f"    problem: {msg}")
        if name.startswith("convert"):
            continue  # (tools/bench_convert.py's rows)
        note = f"{size / GiB:g} GiB disk, {data / GiB:g} GiB data; RSS {rp / MiB:.0f} MiB"
        if name.endswith("_unsafe"):
            note += "; pyqcow -t unsafe (no fsync, no sync timed), qemu-img default + sync"
        else:
            note += "; both timed with a sync after"
        if problems:
            note += "; PROBLEM: " + "; ".join(problems)
        # issue 14's goals name the durable rows; -t unsafe is printed beside
        # qemu-img's default, with no goal of its own
        informational = name.endswith("_unsafe")
        out.append({"group": group, "row": row_name(name), "pyqcow": round(p, 4),
                    "anchor": round(q, 4), "anchor_name": "qemu-img", "unit": "s",
                    "ratio": round(r, 4), "goal": "-" if informational else f"<= {goal}",
                    "ok": (None if not problems else False) if informational else ok,
                    "note": note})
    for what, secs in floors:
        print(f"floor: {what:<40} {secs:>6.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": out}, indent=1) + "\n")
    return 0


def sync_dir(d: Path) -> None:
    """fsync every file of ``d`` and ``d`` itself: this run's durability alone (a
    global sync would also wait for whatever other processes have written)."""
    for f in [*d.iterdir(), d]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def measure_floor(base: Path, scratch: Path, rounds: int) -> list[tuple[str, float]]:
    """Median seconds of ``cp`` + fsync and of ``dd oflag=direct`` of ``base``."""
    out = scratch / "floor.img"
    size = base.stat().st_size
    cmds = {
        f"cp + fsync of the base ({size / GiB:.2f} GiB)":
            ["sh", "-c", f"cp --reflink=never '{base}' '{out}' && sync -d '{out}'"],
        f"dd bs=4M oflag=direct conv=fsync ({size / GiB:.2f} GiB)":
            ["dd", f"if={base}", f"of={out}", "bs=4M", "oflag=direct", "conv=fsync",
             "status=none"],
    }
    res = []
    for what, argv in cmds.items():
        times = []
        for _ in range(rounds):
            out.unlink(missing_ok=True)
            os.sync()
            times.append(timed(argv)[0])
        out.unlink(missing_ok=True)
        res.append((what, statistics.median(times)))
        log(f"  floor {what}: {res[-1][1]:.2f} s")
    return res


def measure(name: str, op: dict, src: dict[str, Path], scratch: Path, rounds: int):
    """(median qemu s, median pyqcow s, ratio, qemu RSS, pyqcow RSS, problems)."""
    times: dict[str, list[float]] = {"qemu": [], "pyqcow": []}
    rss = {"qemu": 0, "pyqcow": 0}
    problems: list[str] = []
    for rnd in range(rounds):
        order = ("qemu", "pyqcow") if rnd % 2 == 0 else ("pyqcow", "qemu")
        results = {}
        for who in order:
            d = scratch / who
            if op["copy"]:
                top = fresh_copy(src, op["top"], d, op.get("extra", ()))
            else:
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                top = src[op["top"]]
            out = d / ("out.qcow2" if name == "convert_qcow2" else "out.raw")
            os.sync()
            dt, peak, rc, err = timed(op[who](top, out), cwd=d)
            t0 = time.perf_counter()
            sync_dir(d)  # durability: what is still to be written is the operation's too
            if not (who == "pyqcow" and op.get("unsafe")):
                dt += time.perf_counter() - t0
            if rc != 0:
                problems.append(f"{who} exit {rc}: {err.strip()[-300:]}")
            times[who].append(dt)
            rss[who] = max(rss[who], peak)
            results[who] = {"base": d / src["base"].name, "top": top, "out": out}[op["result"]]
            log(f"  {name} round {rnd + 1} {who}: {dt:.2f} s, {peak / MiB:.0f} MiB")
        if rnd == 0 and not problems:
            same = subprocess.run(["qemu-img", "compare", "-q", results["qemu"], results["pyqcow"]])
            if same.returncode != 0:
                problems.append("results differ (qemu-img compare)")
    q, p = statistics.median(times["qemu"]), statistics.median(times["pyqcow"])
    return q, p, p / q if q else float("inf"), rss["qemu"], rss["pyqcow"], problems


if __name__ == "__main__":
    sys.exit(main())
