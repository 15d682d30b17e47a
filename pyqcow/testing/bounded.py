"""Run a reader under test in a child process with a time and memory bound.

A hostile image can make a reader hang or eat all memory; inside the test
process that costs the whole test timeout per example (and hypothesis's
shrinking and explain phases run it again and again).  ``run_bounded`` forks,
runs the callable in the child under ``RLIMIT_AS``, and kills it after
``timeout`` seconds::

    from pyqcow.testing import run_bounded

    @settings(deadline=None, phases=[p for p in Phase if p is not Phase.explain])
    @given(img=images())
    def test_reader(img):
        assert run_bounded(myreader.read_all, img.path, timeout=5) == img.expected

A hang, a crash (signal, MemoryError over the bound) is raised in the parent as
:class:`ReaderFailure` (an ``AssertionError``, so hypothesis shrinks it like any
failure); an exception of the callable is raised again in the parent (its type
and message, when it can be pickled).  The callable and its arguments need not
be picklable (the child is forked); the return value must be.
"""

from __future__ import annotations

import os
import pickle
import resource
import signal
import sys
import time
import traceback
from dataclasses import dataclass

__all__ = ["BoundedResult", "ReaderError", "ReaderFailure", "run_bounded"]

DEFAULT_TIMEOUT = 10.0
DEFAULT_MEMORY = 1 << 30


class ReaderFailure(AssertionError):
    """The reader hung, crashed or ran out of its memory bound.  ``kind`` is
    ``"timeout"``, ``"memory"``, ``"signal"`` or ``"exit"``."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class ReaderError(Exception):
    """The reader's exception when it cannot travel back from the child as itself
    (it does not pickle): ``type_name`` and the message are kept."""

    def __init__(self, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name

    def __reduce__(self):
        return (ReaderError, (self.type_name, str(self).partition(": ")[2]))


@dataclass
class BoundedResult:
    """What :func:`run_bounded` with ``raise_errors=False`` returns."""

    ok: bool
    value: object = None
    error: BaseException | None = None
    kind: str = "ok"  # ok | exception | timeout | memory | signal | exit
    message: str = ""
    seconds: float = 0.0


def _child(w: int, memory: int | None, fn, args, kwargs) -> None:  # pragma: no cover - child
    try:
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        try:
            value = fn(*args, **kwargs)
            payload = ("ok", value)
        except MemoryError:
            payload = ("memory", "MemoryError")
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            tb = traceback.format_exc()
            try:
                pickle.loads(pickle.dumps(e))  # e.g. an __init__(path, msg) does not unpickle
                payload = ("exception", (e, tb))
            except Exception:  # noqa: BLE001
                payload = ("exception", (ReaderError(type(e).__name__, str(e)), tb))
        try:
            data = pickle.dumps(payload)
        except Exception as e:  # noqa: BLE001
            data = pickle.dumps(("exception", (TypeError(f"result not picklable: {e}"), "")))
        view = memoryview(data)
        while view:
            n = os.write(w, view)
            view = view[n:]
    finally:
        os._exit(0)


def run_bounded(fn, *args, timeout: float = DEFAULT_TIMEOUT, memory: int | None = DEFAULT_MEMORY,
                raise_errors: bool = True, **kwargs):
    """``fn(*args, **kwargs)`` in a forked child, at most ``timeout`` seconds and
    ``memory`` bytes of address space (None: no memory bound).

    Returns ``fn``'s return value.  Raises :class:`ReaderFailure` on a hang,
    a crash or the memory bound, and ``fn``'s own exception when it raised.
    With ``raise_errors=False`` returns a :class:`BoundedResult` instead.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        _child(w, memory, fn, args, kwargs)
    os.close(w)
    status, chunks = _wait_child(pid, r, t0 + timeout)
    seconds = time.monotonic() - t0
    name = getattr(fn, "__qualname__", repr(fn))
    res = _result(status, chunks, name, timeout, memory, seconds)
    if not raise_errors:
        return res
    if res.ok:
        return res.value
    if res.kind == "exception":
        raise res.error  # type: ignore[misc]
    raise ReaderFailure(res.message, res.kind)


def _wait_child(pid: int, r: int, deadline: float) -> tuple[int | None, list[bytes]]:
    """The child's wait status (None: killed at ``deadline``) and what it wrote to ``r``
    (closed here)."""
    chunks: list[bytes] = []
    os.set_blocking(r, False)
    status = None
    import select

    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([r], [], [], min(left, 0.05))
            if ready:
                try:
                    b = os.read(r, 1 << 20)
                except BlockingIOError:
                    b = None
                if b:
                    chunks.append(b)
                    continue
                if b == b"":  # EOF: the child is exiting
                    status = os.waitpid(pid, 0)[1]
                    break
            done, st_ = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st_
                _drain(r, chunks)
                break
    finally:
        if status is None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # pragma: no cover
                pass
            os.waitpid(pid, 0)
        os.close(r)
    return status, chunks


def _drain(r: int, chunks: list[bytes]) -> None:
    while True:
        try:
            b = os.read(r, 1 << 20)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)


def _result(status: int | None, chunks: list[bytes], name: str, timeout: float,
            memory: int | None, seconds: float) -> BoundedResult:
    if status is None:
        return BoundedResult(False, kind="timeout", seconds=seconds,
                             message=f"{name} did not finish within {timeout:g} s (killed)")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return BoundedResult(False, kind="signal", seconds=seconds,
                             message=f"{name} died of signal {signal.Signals(sig).name}"
                             + (" (memory bound?)" if sig in (signal.SIGSEGV, signal.SIGABRT,
                                                              signal.SIGKILL) else ""))
    try:
        kind, payload = pickle.loads(b"".join(chunks))
    except Exception:  # noqa: BLE001 - the child died before reporting
        return BoundedResult(False, kind="exit", seconds=seconds,
                             message=f"{name} exited (status {os.WEXITSTATUS(status)}) "
                                     "without a result")
    if kind == "ok":
        return BoundedResult(True, value=payload, seconds=seconds)
    if kind == "memory":
        return BoundedResult(False, kind="memory", seconds=seconds,
                             message=f"{name} ran out of its memory bound "
                                     f"({(memory or 0) >> 20} MiB)")
    err, tb = payload
    return BoundedResult(False, error=err, kind="exception", seconds=seconds, message=tb)
