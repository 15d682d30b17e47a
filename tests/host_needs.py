"""What tests need from the host beyond tools: the C helper (pyqcow._native)
and O_DIRECT.  One place decides what their absence means: ``require_*`` skip on
a machine without them and fail under CI, so a broken build or an odd CI file
system cannot hide behind a green run.  ``backend_ctx(name)`` is
``fastcopy.backend(name)`` after the check for "native".
"""

from __future__ import annotations

import os

import pytest

from pyqcow import fastcopy


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_native() -> None:
    if not fastcopy.native_available():
        _missing(f"pyqcow._native is not built: {fastcopy.native_import_error()}")


def backend_ctx(name: str):
    if name == "native":
        require_native()
    return fastcopy.backend(name)


def o_direct_works(d) -> bool:
    """Whether the file system of directory ``d`` opens files with O_DIRECT."""
    try:
        fd = os.open(os.path.join(d, ".o-direct-probe"), os.O_RDWR | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    os.unlink(os.path.join(d, ".o-direct-probe"))
    return True


def require_o_direct(d) -> None:
    if not o_direct_works(d):
        _missing(f"no O_DIRECT on the file system of {d}")
