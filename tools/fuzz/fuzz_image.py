#!/usr/bin/env python3
"""atheris (libFuzzer) harness for pyqcow's image readers: longer runs than the
hypothesis fuzz test.

Each input is one image file: the fuzzer's bytes, or (when they start with the
byte 0x00 and a corpus is given) a seed image with the input applied as a patch.
``exercise()`` from tests/property/test_fuzz.py opens it and runs
read/map/snapshots/check and the CLI's info/map/check; any exception that is
not a QcowError, a CLI "internal error", or a case over 2 s is a crash.

Set-up (atheris needs its own venv; pyqcow itself is imported from the tree):

    python -m venv /tmp/atheris-venv
    /tmp/atheris-venv/bin/pip install atheris construct cffi lxml zstandard hypothesis pytest
    PYTHONPATH=. /tmp/atheris-venv/bin/python tools/fuzz/fuzz_image.py \
        -rss_limit_mb=512 -timeout=2 -max_len=1048576 [-runs=N] [CORPUS_DIR ...]

A good starting corpus: the seeds tests/property/test_fuzz.py builds
(``python tools/fuzz/fuzz_image.py --make-corpus DIR``).  Crashes are written
as ``crash-*`` files: reproduce with ``... fuzz_image.py crash-XXXX``, then add
the minimal image as a regression test in tests/property/test_fuzz.py.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "property"))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["pyqcow"]):
    import pkgutil

    import pyqcow
    import pyqcow.cli
    import pyqcow.ops

    for _pkg in (pyqcow, pyqcow.cli, pyqcow.ops):
        for _m in pkgutil.iter_modules(_pkg.__path__, _pkg.__name__ + "."):
            if not _m.name.startswith("pyqcow.testing"):
                __import__(_m.name)

import test_fuzz  # noqa: E402

WORK = tempfile.mkdtemp(prefix="pyqcow-atheris-")
PATH = os.path.join(WORK, "input.qcow2")
# a raw file that relative backing names in inputs may point at
with open(os.path.join(WORK, "base.raw"), "wb") as f:
    f.write(bytes(65536))


def TestOneInput(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        test_fuzz.run_case(PATH)
    except test_fuzz.FuzzFailure as e:
        raise RuntimeError(str(e)) from e.__cause__


def make_corpus(d: str) -> None:
    os.makedirs(d, exist_ok=True)
    for path, data, _ in test_fuzz.corpus():
        with open(os.path.join(d, os.path.basename(path)), "wb") as f:
            f.write(data)
    print(f"wrote {len(test_fuzz.corpus())} seed images to {d}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        make_corpus(sys.argv[2])
        sys.exit(0)
    try:
        atheris.Setup(sys.argv, TestOneInput)
        atheris.Fuzz()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
