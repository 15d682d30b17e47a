"""``check(path_or_img, repair=None)``: ``qemu-img check [-r leaks|all]`` by path.

The path-level entry point: it opens the image (read-only, or read-write to
repair; without the automatic repair a dirty image gets on open), then runs the
scan (pyqcow.scan) or the repair (pyqcow.repair) on it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

from ..check_result import CheckFailed, CheckResult, opening_for_check
from ..errors import OperationError
from ..scan import REPAIR_MODES, scan

__all__ = ["CheckFailed", "CheckResult", "check"]


def check(
    path_or_img,
    repair: str | None = None,
    *,
    log: Callable[[str], None] | None = None,
    force_share: bool = False,
) -> CheckResult:
    """Check a qcow2 image like ``qemu-img check [-r leaks|all]``.

    ``path_or_img`` is a path or an open QcowImage (opened "r+" to repair).
    ``repair``: None (report only), "leaks" or "all".  ``log`` receives every
    message line qemu-img would print on stderr (they are also collected in
    ``CheckResult.messages``).  Raises ``CheckFailed`` when the check cannot
    complete (qemu-img's "Check failed", exit status 1), QcowError when the
    image cannot be opened.  ``force_share`` (read-only checks only) ignores
    the image locks of other processes, like ``qemu-img check -U``.
    """
    if repair not in REPAIR_MODES:
        raise OperationError(
            None if isinstance(path_or_img, (str, os.PathLike)) else path_or_img.path,
            f"unknown repair mode {repair!r} (expecting 'leaks' or 'all')",
        )
    if not isinstance(path_or_img, (str, os.PathLike)):
        img = path_or_img
        if img.format != "qcow2":
            raise OperationError(img.path, "This image format does not support checks")
        if repair and not img.writable:
            raise OperationError(img.path, "repairing needs an image opened read-write")
        return _run(img, img.path, repair, log)
    filename = os.fspath(path_or_img)
    if repair and force_share:
        raise OperationError(filename, "force_share is only possible for a read-only check")
    with _open_for_check(filename, writable=bool(repair), force_share=force_share) as img:
        return _run(img, filename, repair, log)


def _run(img, filename: str, repair: str | None, log) -> CheckResult:
    if repair:
        from ..repair import repair as repair_image  # (only to repair: start-up time)

        return repair_image(img, repair, filename=filename, log=log)
    return scan(img, filename, log)


def _open_for_check(path: str, writable: bool, force_share: bool = False):
    """The image opened for check (``with``: closed at the end of the block)."""
    from ..chain import probe_format
    from ..image import QcowImage

    fmt = probe_format(path)
    if fmt != "qcow2":
        raise OperationError(path, "This image format does not support checks")
    with opening_for_check(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QcowImage(path, "r+" if writable else "r", force_share=force_share, _repair=True)
