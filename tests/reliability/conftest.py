"""tests/reliability: print how many crashes/faults were injected, and the outcomes.

Each process (also each xdist worker) writes its counts to a JSON file; the
controlling process prints the merged summary at the end of the run, and writes
it to $PYQCOW_RELIABILITY_REPORT when that is set.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import crashkit

_STATS_DIR = "/tmp/pyqcow-reliability-stats"


def _run_dir(config) -> str:
    controller = os.getppid() if hasattr(config, "workerinput") else os.getpid()
    return os.path.join(_STATS_DIR, str(controller))


def pytest_sessionfinish(session, exitstatus):
    d = _run_dir(session.config)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{os.getpid()}.json"), "w") as f:
        json.dump([[*k, v] for k, v in crashkit.STATS.counts.items()], f)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if hasattr(config, "workerinput"):
        return
    d = _run_dir(config)
    merged = crashkit.Stats()
    merged.counts = Counter()
    if os.path.isdir(d):
        for name in os.listdir(d):
            with open(os.path.join(d, name)) as f:
                for op, kind, outcome, n in json.load(f):
                    merged.counts[(op, kind, outcome)] += n
            os.unlink(os.path.join(d, name))
        os.rmdir(d)
    if not merged.total():
        return
    text = merged.summary()
    terminalreporter.write_sep("=", "crash injection summary")
    terminalreporter.write_line(text)
    report = os.environ.get("PYQCOW_RELIABILITY_REPORT")
    if report:
        with open(report, "w") as f:
            f.write(text + "\n")
