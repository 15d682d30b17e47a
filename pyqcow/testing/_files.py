"""Where generated examples live, and when they go away.

Every example gets its own directory ``pyqcow-testing-<pid>-XXXXXX`` under
``directory=`` (default: ``$PYQCOW_TESTING_DIR`` or the temp directory).  It is
removed when the hypothesis example ends (``hypothesis.control.cleanup``), or at
interpreter exit / SIGTERM for draws made outside a test (``.example()``).  The
first example of a process also removes directories left by processes that no
longer run (a killed run).

``PYQCOW_TESTING_KEEP``: ``failing`` keeps the files of the example hypothesis
reports as failing (its final replay), renamed ``pyqcow-testing-kept-*`` with a
``reproduce.sh`` beside them; ``all`` keeps every example.
"""

from __future__ import annotations

import atexit
import os
import queue
import re
import shutil
import signal
import tempfile
import threading

PREFIX = "pyqcow-testing-"
_DIRS: set[str] = set()
_SWEPT: set[str] = set()
_LOCK = threading.Lock()
_HANDLER_SET = [False]
_STALE = re.compile(r"^pyqcow-testing-(\d+)-")


def keep_mode() -> str:
    """``""``, ``"failing"`` or ``"all"`` (from PYQCOW_TESTING_KEEP)."""
    v = os.environ.get("PYQCOW_TESTING_KEEP", "").strip().lower()
    if v in ("", "0", "no", "false"):
        return ""
    return "all" if v == "all" else "failing"


def remove(d: str) -> None:
    shutil.rmtree(d, ignore_errors=True)
    with _LOCK:
        _DIRS.discard(d)


_QUEUE: queue.SimpleQueue = queue.SimpleQueue()
_REMOVER: list[threading.Thread] = []


def _remover() -> None:
    while True:
        d = _QUEUE.get()
        if d is None:
            return
        remove(d)


def remove_later(d: str) -> None:
    """Remove ``d`` in a background thread (unlink on a busy disk takes milliseconds
    that generation need not wait for); :func:`drain` waits for them."""
    with _LOCK:
        if not _REMOVER or not _REMOVER[0].is_alive():
            t = threading.Thread(target=_remover, name="pyqcow-testing-cleanup", daemon=True)
            _REMOVER[:] = [t]
            # the thread starts with SIGTERM and SIGINT blocked (it inherits this
            # mask), so the kernel delivers them to the main thread: one delivered
            # to this thread left a main thread asleep in a system call unaware of
            # it, and the clean-up handler did not run until that call returned
            old = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT))
            try:
                t.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
    _QUEUE.put(d)


def drain() -> None:
    """Wait until every directory handed to :func:`remove_later` is gone."""
    if _REMOVER and _REMOVER[0].is_alive():
        _QUEUE.put(None)
        _REMOVER[0].join()
        _REMOVER.clear()


def _cleanup_all() -> None:
    drain()
    if keep_mode() == "all":
        return
    for d in list(_DIRS):
        remove(d)


def _on_sigterm(signum, frame):  # pragma: no cover - exercised in a subprocess test
    _cleanup_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


atexit.register(_cleanup_all)


def _install_sigterm() -> None:
    if _HANDLER_SET[0]:
        return
    _HANDLER_SET[0] = True
    try:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - not the main interpreter
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def sweep_stale(parent: str) -> int:
    """Remove ``pyqcow-testing-<pid>-*`` directories of processes that are gone."""
    n = 0
    try:
        names = os.listdir(parent)
    except OSError:
        return 0
    for name in names:
        m = _STALE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            n += 1
    return n


def default_parent() -> str:
    return os.environ.get("PYQCOW_TESTING_DIR") or tempfile.gettempdir()


def new_dir(parent: str | os.PathLike | None) -> str:
    """A fresh example directory, removed when the current example ends."""
    parent = os.fspath(parent) if parent is not None else default_parent()
    os.makedirs(parent, exist_ok=True)
    if parent not in _SWEPT:
        _SWEPT.add(parent)
        sweep_stale(parent)
    _install_sigterm()
    d = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)
    with _LOCK:
        _DIRS.add(d)
    _register_example_cleanup(d)
    return d


def _build_context():
    try:
        from hypothesis.control import _current_build_context
    except ImportError:  # pragma: no cover
        return None
    return _current_build_context.value


def _register_example_cleanup(d: str) -> None:
    ctx = _build_context()
    if ctx is None or _in_example_call():
        return  # outside a test (e.g. .example()): atexit / cleanup()
    mode = keep_mode()
    if mode == "all" or (mode == "failing" and ctx.is_final):
        return  # kept: see keep_example()
    ctx.tasks.append(lambda: remove_later(d))


def _in_example_call() -> bool:
    """Whether this draw comes from ``strategy.example()`` (a hypothesis run of its
    own, whose files the caller wants to keep using)."""
    import sys

    f = sys._getframe(2)
    for _ in range(40):
        if f is None:
            return False
        if f.f_code.co_name == "example_generating_inner_function":
            return True
        f = f.f_back
    return False


def is_final_example() -> bool:
    ctx = _build_context()
    return bool(ctx is not None and ctx.is_final)


def keep_example(d: str, script: str) -> str:
    """Keep the failing example's directory (renamed so no sweep removes it) with
    ``reproduce.sh``; returns its new path, or ``d`` when nothing is kept."""
    mode = keep_mode()
    if not mode or (mode == "failing" and not is_final_example()):
        return d
    with open(os.path.join(d, "reproduce.sh"), "w") as f:
        f.write(script)
    os.chmod(os.path.join(d, "reproduce.sh"), 0o755)
    with _LOCK:
        _DIRS.discard(d)
    try:
        from hypothesis import note

        note(f"pyqcow.testing: files kept in {d} (rebuild: sh {d}/reproduce.sh)")
    except Exception:  # noqa: BLE001 - outside a test
        pass
    return d


class _NoSyncOS:
    """``os`` without fsync, for pyqcow's modules while an example is built: generated
    images need no durability, and fsync is a third of the generation time."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def fsync(fd):
        return None


class no_fsync:
    """Context manager: pyqcow's engine skips fsync inside it (this thread's builds)."""

    _depth = 0
    _saved: dict = {}

    def __enter__(self):
        import sys

        with _LOCK:
            if no_fsync._depth == 0:
                for name in ("pyqcow.hostfile", "pyqcow.newimage", "pyqcow.writer",
                             "pyqcow.snapshot"):
                    mod = sys.modules.get(name)
                    if mod is not None and getattr(mod, "os", None) is os:
                        no_fsync._saved[name] = mod
                        mod.os = _NoSyncOS(os)
            no_fsync._depth += 1
        return self

    def __exit__(self, *exc):
        with _LOCK:
            no_fsync._depth -= 1
            if no_fsync._depth == 0:
                for mod in no_fsync._saved.values():
                    mod.os = os
                no_fsync._saved.clear()
        return False
