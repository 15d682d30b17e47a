"""What ``pyqcow check`` reports: the result of a check, and how a check fails.

``CheckResult`` is the QAPI ``ImageCheck`` of ``qemu-img check`` plus its
messages; ``Res`` is QEMU's ``BdrvCheckResult`` the scan and the repair fill.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

from .errors import QcowError
from .record import Record

__all__ = ["CheckFailed", "CheckResult"]


class CheckResult(Record):
    """What qemu-img check reports (QAPI ``ImageCheck``), plus the messages
    (``messages``: the lines qemu-img prints on stderr while checking and
    repairing).  Every field but ``filename`` defaults to 0 (format: qcow2)."""

    __slots__ = ("filename", "format", "check_errors", "image_end_offset", "corruptions",
                 "leaks", "corruptions_fixed", "leaks_fixed", "total_clusters",
                 "allocated_clusters", "fragmented_clusters", "compressed_clusters", "messages")
    _defaults = {"format": "qcow2", **dict.fromkeys(__slots__[2:-1], 0)}
    _factories = {"messages": list}

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors)

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit status: 1 check errors, 2 corruptions, 3 leaks only, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def as_qemu_json(self) -> dict:
        """The ImageCheck object of ``qemu-img check --output=json``.

        qemu-img's collect_image_check sets every optional member only when it
        is non-zero (``has_x = x != 0``); filename, format and check-errors are
        always present.  Keys are inserted in QAPI declaration order (the order
        pyqcow.cli.output.qemu_json needs to reproduce qemu's QDict order).
        """
        d: dict = {
            "filename": self.filename,
            "format": self.format,
            "check-errors": self.check_errors,
        }
        for key, value in (
            ("image-end-offset", self.image_end_offset),
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
            ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        ):
            if value:
                d[key] = value
        return d


class CheckFailed(QcowError):
    """The check could not complete (qemu-img: "Check failed: ...", exit 1)."""

    def __init__(self, path, message: str, messages: list[str]) -> None:
        super().__init__(path, message)
        self.messages = messages


class Res(Record):
    """QEMU's BdrvCheckResult (every field 0 to begin with)."""

    __slots__ = ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed",
                 "image_end_offset", "total_clusters", "allocated_clusters",
                 "fragmented_clusters", "compressed_clusters")
    _defaults = dict.fromkeys(__slots__, 0)


class Fatal(Exception):
    """The check stops (QEMU returns -errno): no report, exit status 1."""


def result(filename: str, res: Res, messages: list[str]) -> CheckResult:
    return CheckResult(
        filename=filename,
        check_errors=res.check_errors,
        image_end_offset=res.image_end_offset,
        corruptions=res.corruptions,
        leaks=res.leaks,
        corruptions_fixed=res.corruptions_fixed,
        leaks_fixed=res.leaks_fixed,
        total_clusters=res.total_clusters,
        allocated_clusters=res.allocated_clusters,
        fragmented_clusters=res.fragmented_clusters,
        compressed_clusters=res.compressed_clusters,
        messages=messages,
    )


def collector(log: Callable[[str], None] | None) -> tuple[list[str], Callable[[str], None]]:
    """-> (the message list, a function that appends to it and passes on to ``log``)."""
    messages: list[str] = []

    def emit(line: str) -> None:
        messages.append(line)
        if log is not None:
            log(line)

    return messages, emit


# Set while check() opens an image read-write itself: the open must not run the
# automatic dirty-image repair (QEMU skips it for BDRV_O_CHECK opens).
_opening_for_check: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pyqcow_opening_for_check", default=False
)


class opening_for_check:  # noqa: N801 (used as a function: ``with opening_for_check():``)
    """While an image is opened inside this block, a dirty image is not repaired on
    open (the caller checks it itself).  A class, not a contextlib generator:
    contextlib (with functools) is ~2 ms of a small command's start-up.
    Here, not in pyqcow.repair, which ``check`` without ``-r`` does not import."""

    def __enter__(self) -> None:
        self._token = _opening_for_check.set(True)

    def __exit__(self, *exc) -> None:
        _opening_for_check.reset(self._token)
