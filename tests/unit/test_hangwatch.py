"""The suite's guards against a hanging test (pytest-timeout and tests/hangwatch.py):
a run with a stuck test ends, names the test, and shows where it was stuck.

A failed ``==`` of two large byte buffers is explained without pytest's
quadratic diff.  Each case runs pytest on a generated test file in a subprocess, as CI runs the
suite (xdist, two workers), with short limits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent.parent

STUCK = textwrap.dedent('''
    import signal
    import time

    def test_fine():
        pass

    def test_stuck_in_python():
        time.sleep(120)

    def test_big_buffers_differ():
        disk = bytes(8 << 20)
        assert disk == disk[:-4096] + bytes(4095) + b"\x01"

    def test_stuck_where_sigalrm_cannot_reach():
        # as a C call that retries on EINTR: the handler never runs
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(120)
''')


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> subprocess.CompletedProcess:
    """One run of the generated tests (the cases below read its output)."""
    tmp_path = tmp_path_factory.mktemp("hangwatch")
    (tmp_path / "test_gen.py").write_text(STUCK)
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["hangwatch"]\n')
    env = {k: v for k, v in os.environ.items() if k != "PYQCOW_HANG_DIR"}
    # CI set: pytest then explains in full (no truncation), the case that hung
    env.update(PYTHONPATH=str(TESTS_DIR), PYQCOW_HANG_GRACE="2", CI="true")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-o", "timeout=2",
         "-o", "timeout_method=signal", "--rootdir", str(tmp_path), "-c", os.devnull,
         "test_gen.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_the_run_ends_and_the_other_tests_pass(run):
    assert run.returncode == 1, run.stdout + run.stderr
    assert "3 failed, 1 passed" in run.stdout


def test_a_test_stuck_in_python_fails_with_its_traceback(run):
    failure = run.stdout.split("_ test_stuck_in_python _", 1)[1]
    assert "Timeout (>2.0s) from pytest-timeout" in failure
    assert "time.sleep(120)" in failure
    assert run.stdout.count("still running") == 1  # the watchdog did not end that one


def test_a_test_stuck_in_c_ends_its_worker_and_the_summary_shows_where(run):
    assert "crashed while running 'test_gen.py::test_stuck_where_sigalrm_cannot_reach'" \
        in run.stdout
    summary = run.stdout.split("hung test: every thread's stack", 1)[1]
    assert "test_stuck_where_sigalrm_cannot_reach: still running 4 s" in summary
    assert 'test_gen.py", line 18 in test_stuck_where_sigalrm_cannot_reach' in summary


def test_two_large_buffers_that_differ_are_explained_quickly(run):
    """(pytest's own difflib explanation of these 8 MiB would not end in the
    2 s limit: the test would fail with a Timeout instead)"""
    failure = run.stdout.split("_ test_big_buffers_differ _", 1)[1]
    assert "Timeout" not in failure.split("\n_", 1)[0]
    assert "8388608-byte and 8388608-byte buffers differ" in failure
    assert "first difference at offset 8388607 (0x7fffff)" in failure
    assert "1 of 2048 4096-byte blocks differ: 2047" in failure
