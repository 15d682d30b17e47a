"""The last resort against a test that hangs (a pytest plugin, loaded by conftest).

pytest-timeout (``timeout`` in pyproject) fails a test that runs too long by
raising in it from SIGALRM.  Python runs that handler only between bytecodes, so
a test stuck inside one C call (libvirt, a FUSE mount, a loop device, the C
helper) would hold its xdist worker, and with it the whole run, until CI's own
limit, which prints nothing about where.  This watchdog, armed for each test a
minute past that limit, is faulthandler's C thread: it writes every thread's
stack to a file and ends the worker.  xdist then reports "worker crashed while
running <test>" and goes on with a new worker, and the run's summary prints the
stacks (the workers' own stderr is not shown).
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import tempfile

import pytest

# seconds past the test's pytest-timeout limit (the environment's value: this
# plugin's own test)
GRACE = float(os.environ.get("PYQCOW_HANG_GRACE", "60"))
_ENV = "PYQCOW_HANG_DIR"
_MARK = "(most recent call first)"  # faulthandler's traceback headers end with this
_file = None
_made = False  # this process made the directory (and removes it)


def pytest_configure(config: pytest.Config) -> None:
    global _file, _made
    if not hasattr(config, "workerinput") and _ENV not in os.environ:
        # the controller (or a run without xdist): one directory for every worker
        os.environ[_ENV] = tempfile.mkdtemp(prefix="pyqcow-hangs-")
        _made = True
    _file = open(os.path.join(os.environ[_ENV], f"worker-{os.getpid()}.txt"), "w")  # noqa: SIM115


def _limit(item: pytest.Item) -> float:
    mark = item.get_closest_marker("timeout")
    if mark is not None and mark.args:
        return float(mark.args[0])
    return float(item.config.getini("timeout") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    limit = _limit(item)
    if limit > 0 and _file is not None:
        _file.seek(0)
        _file.truncate()
        _file.write(f"{item.nodeid}: still running {limit + GRACE:.0f} s after it started\n")
        _file.flush()
        faulthandler.dump_traceback_later(limit + GRACE, exit=True, file=_file)
    try:
        yield
    finally:
        if limit > 0:
            faulthandler.cancel_dump_traceback_later()


def hung_reports(directory: str) -> list[str]:
    """The watchdog's reports in ``directory``: one text per worker it ended."""
    out = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), errors="replace") as f:
            text = f.read()
        if _MARK in text:
            out.append(text)
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    directory = os.environ.get(_ENV)
    if not directory or not os.path.isdir(directory):
        return
    for text in hung_reports(directory):
        terminalreporter.section("hung test: every thread's stack", sep="=")
        terminalreporter.write(text)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _file is not None:
        _file.close()
    if _made:
        shutil.rmtree(os.environ.pop(_ENV), ignore_errors=True)
