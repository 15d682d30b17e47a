#!/usr/bin/env python3
"""Every performance goal of issue 14 in one run, printed as one table.

    tools/bench all [--quick] [--rounds N] [--no-xfs] [--only GROUPS] [--json PATH]

Runs the benchmarks one after another, each with ``--json`` into a scratch
file, and prints one table: each row pyqcow beside its anchor (qemu-img,
libqcow, dissect) with the ratio pyqcow/anchor, the goal and whether it is met.

  startup  tools/bench startup     whole-process info/map/check/create -b/rebase -u
  ext4     tools/bench chain       commit 5%/50%, stream, rebase (+ -t unsafe rows)
           tools/bench convert     convert to raw / qcow2, -B (+ -t unsafe rows)
                                   at 4 GiB (2 GiB data) on the scratch directory's
                                   file system (ext4 here)
  xfs      the same two, 2 GiB (1 GiB data), on an XFS made with reflink on a loop
           device over a sparse file (root, mkfs.xfs; torn down afterwards)
  convert  tools/bench convert     --target-is-zero -n, -W -m 4 (issue 15)
  read     tools/bench read        random 4 KiB reads/s, sequential MB/s beside
                                   libqcow and dissect
  scale    tools/bench scale       4 TiB image, 1 GiB scattered data: map, check,
                                   commit, stream, merge --dry-run, peak RSS

Before the first benchmark it compiles pyqcow's bytecode and removes
PYTHONDONTWRITEBYTECODE from the children's environment: timed pyqcow processes
start as an installed pyqcow does, with its bytecode cached.

--quick runs every benchmark at small sizes (a smoke run: the figures are not the
goals' sizes).  --only takes a comma list of the groups above.  A benchmark, not a
test: it exits 0 even when goals are missed; a benchmark that fails shows as a
row saying so and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FS_CONVERT = "raw,qcow2,B,raw-u,qcow2-u"  # bench convert's rows per file system
GROUPS = ("startup", "ext4", "xfs", "convert", "read", "scale")


def log(msg: str) -> None:
    print(f"bench all: {msg}", file=sys.stderr, flush=True)


def _run_bench(name: str, args: list[str], out: Path) -> list[dict]:
    """Run tools/bench_NAME.py with --json OUT; its rows, or one row naming the failure."""
    argv = [sys.executable, str(REPO / "tools" / f"bench_{name}.py"), *args, "--json", str(out)]
    log(" ".join(argv[1:]))
    proc = subprocess.run(argv, cwd=REPO, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if proc.returncode != 0 or not out.exists():
        return [{"group": "?", "row": f"bench {name}", "note": f"failed (exit {proc.returncode})",
                 "ok": False}]
    return json.loads(out.read_text())["rows"]


def bytecode_like_users() -> None:
    """Children get what users have: pyqcow's bytecode cached.  With
    PYTHONDONTWRITEBYTECODE set (this machine's environment sets it) and no
    up-to-date __pycache__ (a fresh clone), every pyqcow process compiled its ~45
    modules again: 80-110 ms of each timed run that no installed pyqcow pays."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "pyqcow")],
                   check=True, stdout=subprocess.DEVNULL)


class Xfs:
    """A mounted XFS with reflink on a loop device over a sparse file, or why not."""

    def __init__(self, scratch: Path, size_gib: int) -> None:
        self.mnt: Path | None = None
        self.dev: str | None = None
        self.reason: str | None = None
        self._scratch = scratch
        self._size = size_gib << 30

    def __enter__(self) -> Xfs:
        if os.geteuid() != 0:
            self.reason = "needs root (loop device, mount)"
            return self
        for tool in ("mkfs.xfs", "losetup", "mount", "umount"):
            if shutil.which(tool) is None:
                self.reason = f"{tool} not found (apt-get install xfsprogs util-linux)"
                return self
        backing = self._scratch / "xfs.img"
        with open(backing, "wb") as f:
            f.truncate(self._size)
        steps = [["mkfs.xfs", "-q", "-m", "reflink=1", str(backing)]]
        for argv in steps:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                self.reason = f"{argv[0]} failed: {proc.stderr.strip()}"
                return self
        proc = subprocess.run(["losetup", "--find", "--show", str(backing)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            self.reason = f"losetup failed: {proc.stderr.strip()}"
            return self
        self.dev = proc.stdout.strip()
        mnt = self._scratch / "xfs"
        mnt.mkdir()
        proc = subprocess.run(["mount", "-t", "xfs", self.dev, str(mnt)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            self.reason = f"mount failed: {proc.stderr.strip()}"
            return self
        self.mnt = mnt
        return self

    def __exit__(self, *exc) -> None:
        if self.mnt is not None:
            subprocess.run(["umount", str(self.mnt)], check=False)
        if self.dev is not None:
            subprocess.run(["losetup", "-d", self.dev], check=False)


def plan(args, scratch: Path) -> list[tuple[str, str, list[str]]]:
    """(group, bench name, arguments) in the order they run."""
    q = args.quick
    rounds = ["--rounds", str(args.rounds or (1 if q else 3))]
    big = ["--size-gib", "0.25", "--data-gib", "0.125", *rounds] if q else \
        ["--size-gib", "4", "--data-gib", "2", *rounds]
    mid = ["--size-gib", "0.25", "--data-gib", "0.125", *rounds] if q else \
        ["--size-gib", "2", "--data-gib", "1", *rounds]
    out = [
        ("startup", "startup", ["--runs", "5" if q else "20"]),
        ("ext4", "chain", [*big, "--dir", str(scratch / "ext4-chain")]),
        ("ext4", "convert", [*big, "--dir", str(scratch / "ext4-convert"), "--only", FS_CONVERT]),
        ("xfs", "chain", [*mid, "--dir", "{xfs}/chain"]),
        ("xfs", "convert", [*mid, "--dir", "{xfs}/convert", "--only", FS_CONVERT]),
        ("convert", "convert", [*mid, "--dir", str(scratch / "convert"), "--only", "tiz,wm4"]),
        ("read", "read", (["--size-gib", "0.25", "--data-gib", "0.125", "--random-reads", "2000",
                           "--repeat", "1"] if q else []) + ["--dir", str(scratch / "read")]),
        # qemu-img's stream of a 4 TiB image reads the whole disk (hours): its row
        # is a lower bound after --qemu-timeout
        ("scale", "scale", ["--size-tib", "0.25", "--top-l2", "256", "--rounds", "1",
                            "--qemu-timeout", "30"] if q else
         ["--rounds", str(args.rounds or 3), "--qemu-timeout", "60"]),
    ]
    return [step for step in out if step[0] in args.only]


def table(rows: list[dict]) -> str:
    head = ("group", "row", "pyqcow", "anchor", "ratio", "goal", "met", "note")
    lines = []
    for r in rows:
        unit = r.get("unit", "")
        lines.append((
            r.get("group", "?"), r.get("row", "?"),
            _fmt(r.get("pyqcow"), unit),
            f"{_fmt(r.get('anchor'), unit)} {r.get('anchor_name', '')}".strip(),
            "" if r.get("ratio") is None else f"{r['ratio']:.2f}",
            r.get("goal", ""), {True: "yes", None: "-"}.get(r.get("ok"), "NO"),
            r.get("note", "")))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    sep = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([fmt.format(*head), sep, *(fmt.format(*ln) for ln in lines)])


def _fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit in ("reads/s", "MB/s"):
        return f"{v:,.0f} {unit}"
    if unit == "ms":
        return f"{v:.1f} ms"
    return f"{v:.3f} {unit}".strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/bench all", description=__doc__.split("\n\n")[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small sizes: a smoke run of every benchmark, not the goals' sizes")
    ap.add_argument("--rounds", type=int,
                    help="rounds of the chain and convert benchmarks (default 3; 1 with --quick)")
    ap.add_argument("--no-xfs", action="store_true", help="leave out the XFS reflink group")
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma list of groups (default: all: {','.join(GROUPS)})")
    ap.add_argument("--json", help="also write every row to this file as JSON")
    args = ap.parse_args(argv)
    args.only = {g.strip() for g in args.only.split(",") if g.strip()}
    unknown = args.only - set(GROUPS)
    if unknown:
        ap.error(f"unknown group(s): {', '.join(sorted(unknown))}")
    if args.no_xfs:
        args.only.discard("xfs")
    bytecode_like_users()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pyqcow-bench-all-") as tmp:
        scratch = Path(tmp)
        steps = plan(args, scratch)
        needs_xfs = any(group == "xfs" for group, _, _ in steps)
        with Xfs(scratch, 24) if needs_xfs else _NoXfs() as xfs:
            for i, (group, name, bench_args) in enumerate(steps):
                if group == "xfs" and xfs.mnt is None:
                    if not any(r.get("group") == "xfs" for r in rows):
                        rows.append({"group": "xfs", "row": "all", "ok": False,
                                     "note": f"not run: {xfs.reason}"})
                    continue
                bench_args = [a.replace("{xfs}", str(xfs.mnt)) for a in bench_args]
                for flag, value in zip(bench_args, bench_args[1:], strict=False):
                    if flag == "--dir":
                        Path(value).mkdir(parents=True, exist_ok=True)
                rows += _run_bench(name, bench_args, scratch / f"rows-{i}.json")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


class _NoXfs:
    mnt = None
    reason = "not asked for"

    def __enter__(self) -> _NoXfs:
        return self

    def __exit__(self, *exc) -> None:
        return None


if __name__ == "__main__":
    sys.exit(main())
