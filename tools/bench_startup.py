#!/usr/bin/env python3
"""Start-up: whole-process time of small pyqcow commands beside qemu-img's.

    tools/bench startup [--runs 20] [--pyqcow PATH] [--qemu-img PATH] [--goal-ms 35]
                        [--json PATH]

On a small qcow2 chain (a 64 MiB base with 1 MiB of data, an empty overlay),
runs each command --runs times, pyqcow and qemu-img alternating, and prints the
median wall-clock time of each whole process (fork to exit), the ratio, and
whether pyqcow meets the goal (<= 35 ms):

  info       pyqcow info top.qcow2              qemu-img info top.qcow2
  map        pyqcow map top.qcow2               qemu-img map top.qcow2
  check      pyqcow check top.qcow2             qemu-img check top.qcow2
  create -b  pyqcow create -q -b base.qcow2 -F qcow2 new.qcow2   (new.qcow2 removed
             between runs, untimed)             qemu-img create -q -f qcow2 ... same
  rebase -u  pyqcow rebase -u -b base.qcow2 -F qcow2 ov.qcow2
                                                qemu-img rebase -u ... same

pyqcow is the installed ``pyqcow`` command (default: the one beside this Python,
i.e. .venv/bin/pyqcow, the sh launcher), run as a user runs it: with bytecode
caching (PYTHONDONTWRITEBYTECODE is removed from its environment) after one
untimed warm-up run per command.  Also printed: how many modules each pyqcow command
imports (one more untimed run, -X importtime), and whether argparse or enum were
among them (signs that the command left its fast path: pyqcow.cli.fastargs,
pyqcow.intenum); the median CPU time (user+sys)
of each, less sensitive to a busy machine than wall-clock time, and the floor:
``python -S -c pass``, ``python -I -c pass`` and ``python -c pass`` with the
same interpreter.  It also says how that interpreter has pyqcow installed: a
regular (wheel) install, an editable one through a path entry (what
tools/_setup.sh makes: ``editable_mode=compat``, which costs nothing at start),
or an editable one through setuptools' import-hook finder (the default
``pip install -e``), which makes every start ~20 ms slower than users see;
pass ``--pyqcow`` another install's command to measure that one.

``--json PATH`` also writes the rows for ``tools/bench all``: group "startup",
one row per command, unit "ms" (median wall-clock), anchor qemu-img, goal
"<= 35 ms".  A benchmark, not a test: it always exits 0 unless its set-up fails.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # users have bytecode caches
    env["LC_ALL"] = "C"
    return env


def _run(argv: list[str], cwd: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall ms, cpu ms) of one whole process; fails loudly if it fails."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    t1 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"tools/bench startup: {' '.join(argv)} failed ({proc.returncode}): "
                 f"{proc.stderr.decode(errors='replace').strip()}")
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return (t1 - t0) * 1000, cpu * 1000


def _setup(work: str, qemu_img: str) -> None:
    def q(*args: str) -> None:
        subprocess.run(args, cwd=work, check=True, stdout=subprocess.DEVNULL)

    q(qemu_img, "create", "-q", "-f", "qcow2", "base.qcow2", "64M")
    q("qemu-io", "-c", "write -P 0x5a 0 1M", "base.qcow2")
    q(qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    q(qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2")


def _cases(pyqcow: str, qemu_img: str):
    """(name, pyqcow argv, qemu-img argv, untimed step before each run)"""
    def rm_new(work: str) -> None:
        new = os.path.join(work, "new.qcow2")
        if os.path.exists(new):
            os.unlink(new)

    return [
        ("info", [pyqcow, "info", "top.qcow2"], [qemu_img, "info", "top.qcow2"], None),
        ("map", [pyqcow, "map", "top.qcow2"], [qemu_img, "map", "top.qcow2"], None),
        ("check", [pyqcow, "check", "top.qcow2"], [qemu_img, "check", "top.qcow2"], None),
        ("create -b",
         [pyqcow, "create", "-q", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2"],
         [qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
          "new.qcow2"],
         rm_new),
        ("rebase -u",
         [pyqcow, "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2"],
         [qemu_img, "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2"],
         None),
    ]


def _python_of(pyqcow: str) -> str:
    """The interpreter the launcher execs: python3 beside it, else python3 on PATH."""
    py = os.path.join(os.path.dirname(pyqcow), "python3")
    return py if os.access(py, os.X_OK) else (shutil.which("python3") or sys.executable)


_INSTALL_PROBE = r"""
import glob, os, site
import pyqcow
dirs = [os.path.realpath(d) for d in site.getsitepackages() + [site.getusersitepackages()]]
here = os.path.realpath(os.path.dirname(os.path.dirname(pyqcow.__file__)))
if here in dirs:
    print("regular install (wheel) in " + here)
elif any(glob.glob(os.path.join(d, "__editable__*pyqcow*finder.py")) for d in dirs):
    print("editable install, import-hook finder (default mode: ~20 ms more per start)")
else:
    print("editable install, path entry (editable_mode=compat: no start-up cost): " + here)
"""


def _install_mode(python: str) -> str:
    """How ``python`` has pyqcow installed (probed once, untimed)."""
    proc = subprocess.run([python, "-c", _INSTALL_PROBE], capture_output=True, text=True,
                          check=False)
    return proc.stdout.strip() or f"unknown ({proc.stderr.strip()[-200:]})"


def _interpreter(python: str) -> str:
    """Which build a venv's python is (tools/_setup.sh prefers the distribution's)."""
    proc = subprocess.run([python, "-c", "import os, sys; print(os.path.realpath("
                           "sys._base_executable), sys.version.split()[0])"],
                          capture_output=True, text=True, check=False)
    return f"made from {proc.stdout.strip() or '?'}"


#: modules whose import says a command left its fast path (argparse: the command line
#: was not read by pyqcow.cli.fastargs; enum: something brought the enum module back)
_SLOW_SIGNS = ("argparse", "enum")


def _imports(argv: list[str], cwd: str, env: dict[str, str],
             before=None) -> tuple[int, list[str]]:
    """(modules imported, which of _SLOW_SIGNS) of one untimed run: -X importtime's list."""
    if before:
        before(cwd)
    proc = subprocess.run(argv, cwd=cwd, env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)
    names = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
             if line.startswith("import time:") and "|" in line]
    return len(names), [m for m in _SLOW_SIGNS if m in names]


def _row(name: str, pw: float, qw: float, pc: float, qc: float, goal_ms: float,
         floor: str, modules: str) -> dict:
    return {"group": "startup", "row": name, "pyqcow": round(pw, 1), "anchor": round(qw, 1),
            "anchor_name": "qemu-img", "unit": "ms", "ratio": round(pw / qw, 2),
            "goal": f"<= {goal_ms:g} ms", "ok": pw <= goal_ms,
            "note": f"cpu {pc:.1f} vs {qc:.1f} ms; {modules}; {floor}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="runs per command and tool (20)")
    ap.add_argument("--pyqcow", default=os.path.join(os.path.dirname(sys.executable), "pyqcow"),
                    help="the pyqcow command (default: the one beside this Python)")
    ap.add_argument("--qemu-img", default=shutil.which("qemu-img") or "qemu-img")
    ap.add_argument("--goal-ms", type=float, default=35.0, help="pyqcow's goal per command (35)")
    ap.add_argument("--json", metavar="PATH", help='also write {"rows": [...]} there')
    args = ap.parse_args()
    # the commands run in a temporary directory: absolute paths
    found = args.pyqcow if os.sep in args.pyqcow else shutil.which(args.pyqcow)
    if not found or not os.access(found, os.X_OK):
        sys.exit(f"tools/bench startup: {args.pyqcow}: not an executable pyqcow command")
    args.pyqcow = os.path.abspath(found)
    env = _env()
    python = _python_of(args.pyqcow)
    with tempfile.TemporaryDirectory(prefix="pyqcow-bench-startup-") as work:
        _setup(work, args.qemu_img)
        floors = {}
        for flags in ("-S", "-I", ""):
            argv = [python, *flags.split(), "-c", "pass"]
            runs = [_run(argv, work, env) for _ in range(args.runs + 1)][1:]
            floors[f"python {flags} -c pass".replace("  ", " ")] = (
                statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
        install = _install_mode(python)
        print(f"pyqcow: {args.pyqcow}  (python: {python}, {_interpreter(python)})")
        print(f"install: {install}")
        print(f"qemu-img: {args.qemu_img}")
        print(f"runs: {args.runs} per command and tool, alternating; median whole-process times;"
              f" bytecode caching on")
        print("floor: " + ", ".join(f"`{k}` {w:.1f} ms wall ({c:.1f} cpu)"
                                    for k, (w, c) in floors.items()))
        floor_note = f"floor python -I -c pass {floors['python -I -c pass'][0]:.1f} ms; " + (
            "editable+finder" if "finder" in install else
            "editable path" if "editable" in install else "wheel")
        rows = []
        modules: dict[str, str] = {}
        print()
        head = (f"{'command':<10} {'pyqcow ms':>10} {'qemu-img ms':>12} {'ratio':>7} "
                f"{'goal':>10}   {'pyqcow cpu':>10} {'qemu-img cpu':>12}")
        print(head)
        print("-" * len(head))
        for name, pq, qi, before in _cases(args.pyqcow, args.qemu_img):
            times: dict[str, list[tuple[float, float]]] = {"p": [], "q": []}
            for i in range(args.runs + 1):  # run 0: warm-up (bytecode, page cache), untimed
                order = (("p", pq), ("q", qi)) if i % 2 else (("q", qi), ("p", pq))
                for key, argv in order:
                    if before:
                        before(work)
                    t = _run(argv, work, env)
                    if i:
                        times[key].append(t)
            count, signs = _imports(pq, work, env, before)
            modules[name] = f"{count} modules" + (
                f" ({', '.join(signs)} loaded)" if signs else "")
            pw = statistics.median(w for w, _ in times["p"])
            qw = statistics.median(w for w, _ in times["q"])
            pc = statistics.median(c for _, c in times["p"])
            qc = statistics.median(c for _, c in times["q"])
            goal = f"<= {args.goal_ms:.0f} " + ("ok" if pw <= args.goal_ms else "MISS")
            print(f"{name:<10} {pw:>10.1f} {qw:>12.1f} {pw / qw:>7.2f} {goal:>10}   "
                  f"{pc:>10.1f} {qc:>12.1f}")
            rows.append(_row(name, pw, qw, pc, qc, args.goal_ms, floor_note, modules[name]))
        print("imports: " + "; ".join(f"{k} {v}" for k, v in modules.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
