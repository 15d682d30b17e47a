"""Shared pytest set-up for the pyqcow test suite.

Imports: this file puts tests/ at the front of sys.path, so test modules use
``import qemu`` / ``from qemu import qemu_img`` (tests/qemu.py) and
``from interop.shapes import SHAPES`` (tests/interop/shapes.py).  tests/ is not
a package; do not import from ``tests.`` or from ``conftest``.

Hypothesis profiles: ``dev`` (default) and ``ci`` (chosen when the CI
environment variable is set); HYPOTHESIS_PROFILE overrides both.

Slow tests: mark them ``@pytest.mark.slow``; pyproject's addopts deselect them
(``-m 'not slow'``), ``tools/test -m slow`` runs them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from qemu import require_tool as _require_tool

settings.register_profile(
    "dev",
    max_examples=25,
    deadline=None,
)
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


def require_tool(name: str) -> str:
    """Path of executable *name*; ``pytest.fail`` under CI, ``pytest.skip`` elsewhere.

    Also importable as ``from qemu import require_tool``.
    """
    return _require_tool(name)


@pytest.fixture(name="require_tool")
def require_tool_fixture() -> Callable[[str], str]:
    """Fixture form: ``def test_x(require_tool): qemu_img = require_tool("qemu-img")``."""
    return _require_tool


@pytest.fixture
def qemu_img_path() -> str:
    return _require_tool("qemu-img")


@pytest.fixture
def qemu_io_path() -> str:
    return _require_tool("qemu-io")
