"""cffi builder for ``pyqcow._native`` (out-of-line API mode).

Used by setup.py (``cffi_modules=["csrc/build_native.py:ffibuilder"]``), so
``pip install .`` and ``pip install -e .`` compile it; the editable install
puts the extension next to the sources (pyqcow/_native.abi3.so).  After
editing the C, rebuild in place with either of::

    pip install -e .
    python csrc/build_native.py        # = setup.py build_ext --inplace

The cdef is ``pyqcow_copy.h`` read verbatim, so the header is the one
statement of the C interface.  Paths are resolved from this file, so the build
works from any working directory.
"""

from __future__ import annotations

import os

from cffi import FFI

CSRC_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(CSRC_DIR)
HEADER = os.path.join(CSRC_DIR, "pyqcow_copy.h")
SOURCE = os.path.join(CSRC_DIR, "pyqcow_copy.c")


def _path_for_setuptools(path: str) -> str:
    """Relative to the working directory when below it (setuptools wants
    relative source paths for sdists, and object files then land under
    build/), else absolute."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


with open(HEADER, encoding="utf-8") as header_file:
    CDEF = header_file.read()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "pyqcow._native",
    '#include <stddef.h>\n#include <stdint.h>\n#include "pyqcow_copy.h"\n',
    sources=[_path_for_setuptools(SOURCE)],
    depends=[_path_for_setuptools(HEADER)],
    include_dirs=[_path_for_setuptools(CSRC_DIR)],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    # In-place development build, exactly as `pip install -e .` does it (same
    # setuptools/cffi path, same file name pyqcow/_native.abi3.so, so no
    # stale twin can shadow it): rebuild after editing the C.
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
        cwd=REPO_DIR,
        check=True,
    )
