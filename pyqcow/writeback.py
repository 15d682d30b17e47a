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

__all__ = ["BackgroundWriteback", "TaskPool"]


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


class _Task:
    """One call on a TaskPool; ``result()`` waits for it and returns its value or
    raises its exception (as a concurrent.futures Future does)."""

    __slots__ = ("args", "error", "fn", "lock", "value")

    def __init__(self, fn, args) -> None:
        import _thread

        self.fn, self.args, self.value, self.error = fn, args, None, None
        self.lock = _thread.allocate_lock()
        self.lock.acquire()  # released when the call is done

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args)
        except BaseException as e:  # (handed to result())
            self.error = e
        self.fn = self.args = None
        self.lock.release()

    def result(self):
        with self.lock:
            pass
        if self.error is not None:
            raise self.error
        return self.value


class TaskPool:
    """``submit(fn, *args)`` on up to ``workers`` threads, started as needed;
    ``shutdown()`` waits for them.  What the copier and convert used of
    concurrent.futures' ThreadPoolExecutor, without its import (logging, re, enum:
    ~5 ms of a command's start-up)."""

    def __init__(self, workers: int, name: str = "pyqcow-pool") -> None:
        import queue

        self.workers, self.name = max(1, workers), name
        self.queue = queue.SimpleQueue()
        self.threads: list = []

    def submit(self, fn, *args) -> _Task:
        task = _Task(fn, args)
        if len(self.threads) < self.workers:
            import threading

            thread = threading.Thread(target=self._run, name=f"{self.name}-{len(self.threads)}",
                                      daemon=True)
            thread.start()
            self.threads.append(thread)
        self.queue.put(task)
        return task

    def _run(self) -> None:
        while (task := self.queue.get()) is not None:
            task.run()
        # one None ends every thread, each passing it on: also a thread that a
        # KeyboardInterrupt in submit() left out of self.threads (one None per
        # listed thread let such a thread take a listed one's, whose join then hung)
        self.queue.put(None)

    def shutdown(self, wait: bool = True) -> None:
        self.queue.put(None)
        if wait:
            for thread in self.threads:
                thread.join()
        self.threads = []
