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

And one hang it prevents: pytest explains a failed ``==`` of two sequences with
a difflib diff, quadratic in their length, which never ends for two guest disks
of a few MiB; ``_explain_large_buffers_quickly`` below makes it say instead where
two large byte buffers differ.
"""

from __future__ import annotations

import faulthandler
import inspect
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
    _explain_large_buffers_quickly()


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


def _buffers_explained(op, left, right) -> list[str] | None:
    """``==`` between two large byte buffers (guest disks against their model):
    where they first differ and how much differs; None for anything else."""
    buffers = (bytes, bytearray, memoryview)
    if op != "==" or not isinstance(left, buffers) or not isinstance(right, buffers):
        return None
    a, b = memoryview(left).cast("B"), memoryview(right).cast("B")
    if max(len(a), len(b)) <= 256:
        return None  # pytest's own explanation is quick and clear
    return buffer_difference(bytes(a), bytes(b))


def _explain_large_buffers_quickly() -> None:
    """pytest explains a failed ``==`` through ``_pytest.assertion.util.
    assertrepr_compare``, which every run of its hook calls (a plugin's own
    pytest_assertrepr_compare cannot stop it), and under CI, where it does not
    truncate, diffs two byte strings with pprint and difflib, in time that
    grows with the square of their length: a failing property test over a few
    MiB never finished (the CI run of stop 22 hung in it).  Large byte buffers
    get _buffers_explained instead."""
    from _pytest.assertion import util

    real = util.assertrepr_compare
    if getattr(real, "_pyqcow_buffers", False):
        return
    signature = inspect.signature(real)

    def assertrepr_compare(*args, **kwargs):
        given = signature.bind_partial(*args, **kwargs).arguments
        lines = _buffers_explained(given.get("op"), given.get("left"), given.get("right"))
        return lines if lines is not None else real(*args, **kwargs)

    assertrepr_compare._pyqcow_buffers = True
    util.assertrepr_compare = assertrepr_compare


def buffer_difference(a: bytes, b: bytes, block: int = 4096) -> list[str]:
    """A few lines on how two byte strings differ (the first difference, and
    which ``block``-sized blocks differ)."""
    lines = [f"{len(a)}-byte and {len(b)}-byte buffers differ"]
    n = min(len(a), len(b))
    blocks = [i // block for i in range(0, n, block)
              if a[i : min(i + block, n)] != b[i : min(i + block, n)]]
    if blocks:
        start = blocks[0] * block
        first = start + next(i for i in range(min(block, n - start))
                             if a[start + i] != b[start + i])
        lo = first - first % 16
        lines.append(f"first difference at offset {first} ({first:#x}):")
        lines.append(f"  left  [{lo:#x}:+32] {a[lo : lo + 32].hex(' ')}")
        lines.append(f"  right [{lo:#x}:+32] {b[lo : lo + 32].hex(' ')}")
        shown = ", ".join(map(str, blocks[:20])) + (", ..." if len(blocks) > 20 else "")
        lines.append(f"{len(blocks)} of {-(-n // block)} {block}-byte blocks differ: {shown}")
    else:
        lines.append(f"equal over the first {n} bytes; only the lengths differ")
    return lines
