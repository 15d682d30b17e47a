"""The C helper (pyqcow._native) in tests: one place that decides what its
absence means.  ``require_native()`` skips on a machine that has not built it,
and fails under CI, so a broken build cannot hide behind a green fallback run;
``backend_ctx(name)`` is ``fastcopy.backend(name)`` after that check for "native".
"""

from __future__ import annotations

import os

import pytest

from pyqcow import fastcopy


def require_native() -> None:
    if not fastcopy.native_available():
        message = f"pyqcow._native is not built: {fastcopy.native_import_error()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def backend_ctx(name: str):
    if name == "native":
        require_native()
    return fastcopy.backend(name)
