"""``-p`` progress bar of the chain commands, and ``-q`` quiet mode.

The bar goes to stderr and is redrawn in place (``\\r``)::

     42.0% [###########...............]  26.9 MiB / 64 MiB  118 MiB/s  0:00 left

It is fed by the ops' progress callbacks, ``callback(done_bytes, total_bytes)``,
and redraws at most every 0.1 s (and always at 100%).  On a terminal that is
not a tty it still writes (CI logs show the last state); ``finish`` ends the
line.  A disabled bar costs one comparison per callback.
"""

from __future__ import annotations

import sys
import time

from ..units import format_size

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    import argparse  # (loaded only when pyqcow.cli.fastargs cannot read the line)
    from typing import TextIO

__all__ = ["ProgressBar", "add_progress_args", "notice", "progress_from_args"]

BAR_WIDTH = 26
REDRAW_INTERVAL = 0.1


def _hms(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _size(n: int) -> str:
    return format_size(n) if n else "0 B"


class ProgressBar:
    """A progress callback (``bar(done, total)``) drawing on ``stream``."""

    def __init__(self, enabled: bool, stream: TextIO | None = None, *, clock=time.monotonic) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._start = clock()
        self._last_draw = -1.0
        self._done = 0
        self._total = 0
        self._drawn = False
        self._width = 0

    def render(self, done: int, total: int, elapsed: float) -> str:
        """The bar's text for ``done`` of ``total`` bytes after ``elapsed`` seconds."""
        frac = min(1.0, done / total) if total > 0 else 1.0
        filled = int(frac * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{100.0 * frac:5.1f}% [{bar}] {_size(done)} / {_size(total)}"
        if rate > 0:
            text += f"  {format_size(int(rate))}/s"
        if frac >= 1.0:
            text += f"  {_hms(elapsed)} total"
        elif rate > 0:
            text += f"  {_hms((total - done) / rate)} left"
        else:
            text += "  --:-- left"
        return text

    def _draw(self, now: float) -> None:
        text = self.render(self._done, self._total, now - self._start)
        pad = " " * max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + pad)
        self.stream.flush()
        self._last_draw = now
        self._drawn = True

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        self._done, self._total = done, total
        now = self._clock()
        if now - self._last_draw >= REDRAW_INTERVAL or (total and done >= total):
            self._draw(now)

    def finish(self) -> None:
        """Draw the final state and end the line (nothing if disabled)."""
        if not self.enabled:
            return
        if not (self._drawn and self._total and self._done >= self._total):
            self._draw(self._clock())  # (100% of 0 B when there was nothing to copy)
        self.stream.write("\n")
        self.stream.flush()

    def abort(self) -> None:
        """End the line after a failure, so the error message starts on its own line."""
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def add_progress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", dest="progress", action="store_true",
                   help="show a progress bar on stderr (bytes done, rate, time left)")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="quiet: print nothing on success (no progress, notices or warnings)")


def progress_from_args(args: argparse.Namespace) -> ProgressBar:
    return ProgressBar(bool(getattr(args, "progress", False)) and not getattr(args, "quiet", False))


def notice(args: argparse.Namespace, message: str) -> None:
    """One ``pyqcow: <message>`` line on stderr unless ``-q``."""
    if getattr(args, "quiet", False):
        return
    sys.stderr.write(f"pyqcow: {' '.join(message.split())}\n")
    sys.stderr.flush()
