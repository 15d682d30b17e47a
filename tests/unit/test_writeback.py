"""BackgroundWriteback: the early write-back thread shared by the copier and convert."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pyqcow.writeback import BackgroundWriteback, TaskPool


def test_ranges_reach_start_and_close_waits(tmp_path):
    calls: list[tuple[int, int, int]] = []
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        wb = BackgroundWriteback(fd, lambda f, off, n: calls.append((f, off, n)))
        wb(0, 4096)
        wb(8192, 4096)
        wb.close()
        assert calls, "close returned before the thread started any range"
        lo = min(off for _f, off, _n in calls)
        hi = max(off + n for _f, off, n in calls)
        assert all(f == fd for f, _o, _n in calls)
        assert (lo, hi) == (0, 12288)
        assert not any(t.name == "pyqcow-writeback" and t.is_alive()
                       for t in threading.enumerate())
    finally:
        os.close(fd)


def test_interrupt_while_the_thread_starts(monkeypatch):
    """SIGINT landing inside Thread.start (found by test_sigint_stops_cleanly under CI):
    the KeyboardInterrupt must reach the caller, and close() in its clean-up must not
    fail with 'cannot join thread before it is started', which turned ^C into exit 1."""
    def interrupted(self):
        raise KeyboardInterrupt

    wb = BackgroundWriteback(-1, lambda *a: None)
    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", interrupted)
        with pytest.raises(KeyboardInterrupt):
            wb(0, 4096)
    wb.close()  # nothing started: nothing to wait for
    # and it still works afterwards
    calls = []
    wb = BackgroundWriteback(-1, lambda f, off, n: calls.append((off, n)))
    wb(0, 512)
    wb.close()
    assert calls == [(0, 512)]


def test_task_pool_returns_results_and_errors_as_futures_do() -> None:
    """TaskPool (convert's and the direct writer's threads, instead of
    concurrent.futures): each task's value or exception, on up to N threads."""
    pool = TaskPool(3, "t")
    names = set()

    def work(i):
        names.add(threading.current_thread().name)
        if i == 7:
            raise ValueError("seven")
        return i * i

    tasks = [pool.submit(work, i) for i in range(20)]
    assert len(pool.threads) == 3
    for i, task in enumerate(tasks):
        if i == 7:
            with pytest.raises(ValueError, match="seven"):
                task.result()
        else:
            assert task.result() == i * i
    threads = list(pool.threads)
    pool.shutdown()
    assert not any(t.is_alive() for t in threads) and pool.threads == []
    assert names <= {"t-0", "t-1", "t-2"}


def test_task_pool_shutdown_ends_a_thread_it_does_not_list() -> None:
    """A KeyboardInterrupt in submit() between a thread's start and its listing left
    a thread the pool did not know of; shutdown's one None per listed thread could
    then end that one instead, and the join of a listed thread hung (seen: SIGINT
    during `pyqcow stream`, tests/reliability/test_sigkill.py)."""
    pool = TaskPool(1, "t")
    release = threading.Event()
    busy = pool.submit(release.wait, 10)  # the listed thread, kept busy
    stray = threading.Thread(target=pool._run, daemon=True)  # started, never listed
    stray.start()
    time.sleep(0.05)  # the stray thread waits on the queue: it takes what comes first
    done = threading.Event()
    closer = threading.Thread(target=lambda: (pool.shutdown(), done.set()), daemon=True)
    closer.start()
    time.sleep(0.05)
    release.set()
    assert done.wait(10), "shutdown hung"
    assert busy.result() is True
    stray.join(10)
    assert not stray.is_alive()
