"""Early write-back on a thread of its own, shared by the chain copier and convert.

Starting the write-back of the pages a copy has just dirtied lets the disk work
while the copy goes on, so the final fsync, which alone makes the data durable,
finds little left.  The system call that starts it (``sync_file_range`` for the
copier, ``posix_fadvise(DONTNEED)`` for convert: each path measured its own)
blocks while the device's queue is full (write-back throttling), and the copy
should not wait for that: ``BackgroundWriteback`` makes the call on one thread,
and ranges asked for while it is busy are started as one.  ``close`` waits for
the thread: call it before the file's fsync and close.  Durability does not
depend on any of this: the fsyncs are where they were.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["BackgroundWriteback"]


class BackgroundWriteback:
    """``start(fd, offset, length)`` for the ranges given, on a thread of its own."""

    def __init__(self, fd: int, start: Callable[[int, int, int], None]) -> None:
        self.fd = fd
        self.start = start
        self.queue = None
        self.thread = None

    def __call__(self, offset: int, length: int) -> None:
        if self.queue is None:
            import queue
            import threading

            q = queue.SimpleQueue()
            thread = threading.Thread(target=self._run, args=(q,), name="pyqcow-writeback",
                                      daemon=True)
            # kept only once started: a KeyboardInterrupt inside start() must leave
            # close() nothing to join ("cannot join thread before it is started")
            thread.start()
            self.queue, self.thread = q, thread
        self.queue.put((offset, offset + length))

    def _run(self, q) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            lo, hi = item
            while not q.empty():  # what piled up meanwhile: one call
                more = q.get()
                if more is None:
                    self.start(self.fd, lo, hi - lo)
                    return
                lo, hi = min(lo, more[0]), max(hi, more[1])
            self.start(self.fd, lo, hi - lo)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.put(None)
            self.thread.join()
            self.queue = self.thread = None
