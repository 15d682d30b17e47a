"""libyal's libqcow Python binding, fetched at run time (never kept in the repository).

* ``binding_tests(cache)``: libyal's own binding tests (tests/pyqcow_test_file.py,
  tests/pyqcow_test_support.py) from the ``libqcow-python`` sdist, fetched with
  ``pip download --no-binary :all: --no-deps libqcow-python``.  They are LGPL
  code: they are unpacked into a cache directory and run from there.
* ``load_binding(cache)``: libyal's compiled module itself (the manylinux wheel,
  unpacked into the cache, never installed), loaded under another name so that
  it sits beside this package's ``pyqcow`` in one process: tools/bench read
  compares the two, and the tests show what libqcow refuses.

Used by tests/interop/test_libyal_api.py and tools/bench_read.py.  Failures to
fetch raise ``FetchError`` (the tests fail under CI and skip elsewhere).
"""

from __future__ import annotations

import fcntl
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PACKAGE = "libqcow-python"
TEST_FILES = ("pyqcow_test_file.py", "pyqcow_test_support.py")


class FetchError(RuntimeError):
    pass


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyqcow-tests"


def _pip_download(dest: Path, *args: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
         "--no-deps", "-d", str(dest), *args, PACKAGE],
        capture_output=True, text=True, timeout=300, check=False,
    )
    if proc.returncode != 0:
        raise FetchError(f"pip download {' '.join(args)} {PACKAGE} failed: "
                         f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    found = sorted(p for p in dest.iterdir() if p.name.startswith("libqcow"))
    if not found:
        raise FetchError(f"pip download {PACKAGE}: nothing downloaded into {dest}")
    return found[-1]


class _Locked:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def binding_tests(cache: Path | None = None) -> Path:
    """Directory holding libyal's two binding test scripts (fetched once per cache)."""
    cache = Path(cache or default_cache())
    out = cache / "libqcow-python-tests"
    with _Locked(cache / ".lock"):
        if all((out / name).is_file() for name in TEST_FILES):
            return out
        sdist = _pip_download(cache / "sdist", "--no-binary", ":all:")
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if len(parts) == 3 and parts[1] == "tests" and parts[2] in TEST_FILES:
                    data = tar.extractfile(member)
                    assert data is not None
                    (out / parts[2]).write_bytes(data.read())
        missing = [n for n in TEST_FILES if not (out / n).is_file()]
        if missing:
            raise FetchError(f"{sdist.name} has no tests/{', tests/'.join(missing)}")
        (out / "SOURCE").write_text(f"{sdist.name} (LGPL-3.0-or-later, libyal)\n")
        return out


def binding_path(cache: Path | None = None) -> Path:
    """Path of libyal's compiled pyqcow extension (from the wheel, unpacked)."""
    cache = Path(cache or default_cache())
    out = cache / "libqcow-python-wheel"
    with _Locked(cache / ".lock"):
        found = sorted(out.glob("pyqcow*.so")) if out.is_dir() else []
        if found:
            return found[0]
        wheel = _pip_download(cache / "wheel", "--only-binary", ":all:")
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if "/" not in name and name.startswith("pyqcow") and name.endswith(".so"):
                    z.extract(name, out)
        found = sorted(out.glob("pyqcow*.so"))
        if not found:
            raise FetchError(f"{wheel.name} holds no pyqcow extension module")
        return found[0]


def load_binding(cache: Path | None = None):
    """libyal's pyqcow module, loaded without touching sys.modules['pyqcow']."""
    path = binding_path(cache)
    loader = importlib.machinery.ExtensionFileLoader("pyqcow", str(path))
    spec = importlib.util.spec_from_file_location("pyqcow", str(path), loader=loader)
    if spec is None:
        raise FetchError(f"cannot load {path}")
    saved = sys.modules.get("pyqcow")
    try:
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    finally:
        if saved is not None:
            sys.modules["pyqcow"] = saved
        else:
            sys.modules.pop("pyqcow", None)
    return module
