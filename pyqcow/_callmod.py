"""Modules that are also the function they are named after.

``pyqcow.check(path)`` and ``pyqcow.create(path, size)`` are public functions
(DESIGN.md section 6), yet ``pyqcow.check`` and ``pyqcow.create`` are modules
too: importing a submodule sets the package attribute to the module, which
would shadow a function of the same name.  Making the module callable keeps
both ``pyqcow.create(...)`` and ``from pyqcow.create import parse_options``.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable


def make_callable(module_name: str, func: Callable) -> None:
    class _CallableModule(types.ModuleType):
        __doc__ = func.__doc__

        def __call__(self, *args, **kwargs):
            return func(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
