"""pyqcow.testing: hypothesis strategies for qcow2 images, chains and operations.

Public and documented for other projects' property-based tests (see the
README section "Property-based testing with pyqcow.testing")::

    from pyqcow.testing import images, chains, operations

Needs the ``hypothesis`` package (a test dependency; pyqcow itself does not
import this package).
"""

from __future__ import annotations

from . import strategies
from .strategies import *  # noqa: F403 - the public names, listed once in strategies.__all__

__all__ = ["strategies", *strategies.__all__]
