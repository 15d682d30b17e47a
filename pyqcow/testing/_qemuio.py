"""One long-lived ``qemu-io`` per process, fed commands on stdin.

Starting qemu-io costs tens of milliseconds, more than the writes of a whole
generated image; a session opens each image (``open -o driver=...``), runs the
commands and closes it again.  Each command's end is the next ``qemu-io> ``
prompt.  Any protocol surprise (an error message, a dead process, a timeout)
closes the session; the caller then runs a one-shot qemu-io instead, so a
failure is reported with qemu-io's own words.
"""

from __future__ import annotations

import os
import select
import shlex
import subprocess
import threading
import time

PROMPT = b"qemu-io> "
TIMEOUT = 60.0


class SessionError(RuntimeError):
    pass


class _Session:
    def __init__(self):
        self.pid = os.getpid()
        self.proc = subprocess.Popen(["qemu-io"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, bufsize=0)
        self.buf = b""
        self._read_prompt()

    def _read_prompt(self) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + TIMEOUT
        while not self.buf.endswith(PROMPT):
            left = deadline - time.monotonic()
            if left <= 0:
                raise SessionError("qemu-io session timed out")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise SessionError("qemu-io session ended: " + self.buf.decode(errors="replace"))
            self.buf += chunk
        out = self.buf[: -len(PROMPT)]
        self.buf = b""
        return out.decode(errors="replace")

    def command(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        return self._read_prompt()

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


_LOCAL = threading.local()


def _session() -> _Session:
    s = getattr(_LOCAL, "session", None)
    if s is None or s.pid != os.getpid() or s.proc.poll() is not None:
        s = _LOCAL.session = _Session()
    return s


def _drop() -> None:
    s = getattr(_LOCAL, "session", None)
    _LOCAL.session = None
    if s is not None and s.pid == os.getpid():
        s.close()


def _bad(out: str) -> bool:
    low = out.lower()
    return any(w in low for w in ("error", "failed", "could not", "not found", "invalid",
                                  "usage", "cannot"))


def run(path: str, fmt: str, commands: list[str]) -> bool:
    """Run ``commands`` on ``path`` in the session; False when the caller must fall
    back to a one-shot qemu-io (nothing was left half-done in the session)."""
    if " " in path or "," in path or "\n" in path:
        return False  # keep the open line's option syntax simple
    try:
        s = _session()
        # no fsync: generated images need no durability
        out = s.command(f"open -o driver={fmt},cache.no-flush=on {shlex.quote(path)}")
        if _bad(out):
            s.command("close")
            return False
        for c in commands:
            out = s.command(c)
            if _bad(out):
                raise SessionError(out)
        out = s.command("close")
        if _bad(out):
            raise SessionError(out)
        return True
    except (SessionError, OSError, ValueError):
        _drop()
        raise


import atexit  # noqa: E402

atexit.register(_drop)
