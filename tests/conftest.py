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

# tests/hangwatch.py: a test stuck in C past pytest-timeout's limit ends its worker,
# and the run's summary prints where every thread was
pytest_plugins = ["hangwatch"]

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


def _xfs_tool(name: str) -> str:
    import shutil

    from qemu import need

    path = shutil.which(name)
    need(path is not None, f"{name} is not installed (xfsprogs / util-linux / e2fsprogs)")
    return str(path)


@pytest.fixture(scope="session")
def xfs_reflink(tmp_path_factory) -> Path:
    """A mounted XFS file system with reflink, on a loop device over a sparse
    file (made here, torn down after the session).  Needs root, loop devices and
    xfsprogs: skipped elsewhere with the reason, a failure under CI."""
    import subprocess

    from qemu import need

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, check=False)

    need(os.geteuid() == 0, "making an XFS file system on a loop device needs root")
    mkfs, losetup, mount, umount = (_xfs_tool(n)
                                    for n in ("mkfs.xfs", "losetup", "mount", "umount"))
    _xfs_tool("filefrag")
    tmp = tmp_path_factory.mktemp("reflink")
    backing = tmp / "xfs.img"
    with open(backing, "wb") as f:
        f.truncate(2 * 1024**3)
    proc = run(mkfs, "-q", "-m", "reflink=1", str(backing))
    need(proc.returncode == 0, f"mkfs.xfs -m reflink=1 failed: {proc.stderr.strip()}")
    proc = run(losetup, "--find", "--show", str(backing))
    need(proc.returncode == 0, f"cannot set up a loop device: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    mnt = tmp / "mnt"
    mnt.mkdir()
    try:
        proc = run(mount, "-t", "xfs", dev, str(mnt))
        need(proc.returncode == 0, f"cannot mount the XFS loop device: {proc.stderr.strip()}")
        try:
            yield mnt
        finally:
            run(umount, str(mnt))
    finally:
        run(losetup, "-d", dev)
