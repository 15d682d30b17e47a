"""pyqcow.testing: hypothesis strategies for qcow2 images, chains and operations.

Public and documented for other projects' property-based tests (see the
README section "Property-based testing with pyqcow.testing")::

    from pyqcow.testing import images, chains, invalid_images, run_bounded

Needs the ``hypothesis`` package (a test dependency; pyqcow itself does not
import this package).
"""

from __future__ import annotations

import os as _os
import sys as _sys


def _check_engine() -> None:
    """Fail here, with a clear message, when the module called ``pyqcow`` is not the
    qcow2 engine this kit belongs to (a directory named ``pyqcow`` on sys.path, or
    libyal's libqcow binding, which is also called ``pyqcow``)."""
    here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    pkg = _sys.modules.get(__name__.rpartition(".")[0])
    where = getattr(pkg, "__file__", None) or list(getattr(pkg, "__path__", []) or ["?"])[0]
    ok = (pkg is not None and callable(getattr(pkg, "open", None))
          and getattr(pkg, "__file__", None) is not None
          and _os.path.dirname(_os.path.abspath(pkg.__file__)) == here)
    if not ok:
        raise ImportError(
            f"pyqcow.testing: the module named 'pyqcow' comes from {where}, not from the "
            f"pyqcow qcow2 engine at {here}; a directory called 'pyqcow' (your checkout?) "
            f"or libqcow's binding, also called 'pyqcow', shadows it. Run from another "
            f"directory, rename it, or remove it from sys.path / PYTHONPATH.")


_check_engine()

from . import strategies  # noqa: E402
from .bounded import BoundedResult, ReaderError, ReaderFailure, run_bounded  # noqa: E402
from .invalid import InvalidImage, invalid_images  # noqa: E402
from .strategies import *  # noqa: E402,F403 - the public names, listed once in strategies.__all__

__all__ = ["strategies", *strategies.__all__, "BoundedResult", "InvalidImage", "ReaderError",
           "ReaderFailure", "invalid_images", "run_bounded"]
