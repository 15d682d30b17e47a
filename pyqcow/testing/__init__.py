"""pyqcow.testing: hypothesis strategies for qcow2 images, chains and operations.

Public and documented for other projects' property-based tests (see the
README section "Property-based testing with pyqcow.testing")::

    from pyqcow.testing import images, chains, operations

Needs the ``hypothesis`` package (a test dependency; pyqcow itself does not
import this package).
"""

from __future__ import annotations

from .strategies import (
    GeneratedChain,
    GeneratedImage,
    ImageParams,
    Op,
    apply_ops,
    chains,
    have_qemu,
    image_params,
    images,
    operations,
)

__all__ = [
    "GeneratedChain",
    "GeneratedImage",
    "ImageParams",
    "Op",
    "apply_ops",
    "chains",
    "have_qemu",
    "image_params",
    "images",
    "operations",
]
