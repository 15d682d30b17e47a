"""BackgroundWriteback: the early write-back thread shared by the copier and convert."""

from __future__ import annotations

import os
import threading

import pytest

from pyqcow.writeback import BackgroundWriteback


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
