#!/usr/bin/env python3
"""Showcase: property tests of a third-party qcow2 reader with pyqcow.testing.

    tools/showcase [--reader dissect|pyqcow] [--examples 60] [--seed 0]
                   [--cache-dir DIR] [--timeout 3]

The reader under test is dissect.hypervisor's ``QCow2`` (installed on first use
into its own venv under --cache-dir, default ~/.cache/pyqcow-bench, as ``tools/bench
read`` does).  When it cannot be installed, or with ``--reader pyqcow``, the same
properties run against pyqcow's own reader.  Each property is a hypothesis run
(fixed --seed, no example database, no explain phase) over strategies of the kit;
every read happens in a forked child through ``run_bounded`` (--timeout seconds,
2 GiB of address space), so a reader that hangs or eats memory fails one example
instead of the run:

1. images (no extended L2) read exactly as their model;
2. images with extended L2 entries (subclusters) read as their model;
3. the top of a backing chain (raw or qcow2 base, overlays possibly larger than
   their backing file, relative backing names) reads as its model, and again
   with the base in a sub-directory (a backing name like ``base/base.qcow2``);
4. images from ``invalid_images()`` whose rule makes QEMU refuse to open or read
   them are refused (an exception), not read.

For each property it prints PASS, or the shrunk failing example with the failure
and the kept files (``PYQCOW_TESTING_KEEP=failing``: ``reproduce.sh`` rebuilds the
image with qemu-img/qemu-io).  Exit status 0 whatever the reader does: finding a
bug is the point; 2 only when the showcase itself cannot run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

os.environ.setdefault("PYQCOW_TESTING_KEEP", "failing")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from pyqcow.testing import (  # noqa: E402
    ReaderFailure,
    chains,
    image_params,
    images,
    invalid_images,
    run_bounded,
)

MEMORY = 2 << 30


# ---------------------------------------------------------------------------- readers
def dissect_reader(cache: Path):
    """``read_all(path) -> bytes`` with dissect.hypervisor from its venv, or None."""
    try:
        from bench_read import ensure_venv
    except ImportError:  # pragma: no cover
        return None, "tools/bench_read.py missing"
    py = ensure_venv(cache, "venv-dissect", "dissect.hypervisor")
    if py is None:
        return None, "pip could not install dissect.hypervisor"
    venv = py.parent.parent
    site = sorted(venv.glob("lib/python*/site-packages"))
    if not site:
        return None, f"no site-packages in {venv}"
    sys.path.append(str(site[0]))  # last: pyqcow and hypothesis stay ours
    try:
        from dissect.hypervisor.disk.qcow2 import QCow2
    except Exception as e:  # noqa: BLE001
        return None, f"dissect.hypervisor does not import: {e}"
    try:
        from importlib.metadata import version

        ver = version("dissect.hypervisor")
    except Exception:  # noqa: BLE001
        ver = "?"

    def read_all(path: str) -> bytes:
        q = QCow2(Path(path))
        return q.open().read(q.size)

    import dissect.hypervisor.disk.qcow2 as mod

    read_all.zstd = getattr(mod, "zstd", None) is not None  # type: ignore[attr-defined]
    return read_all, f"dissect.hypervisor {ver} (venv {venv})"


def pyqcow_reader():
    import pyqcow

    def read_all(path: str) -> bytes:
        with pyqcow.open(path) as img:
            return img.read(0, img.virtual_size)

    return read_all, "pyqcow (its own reader: the fallback)"


# ---------------------------------------------------------------------------- properties
def _settings(n: int, s: int):
    def deco(f):
        return seed(s)(settings(
            max_examples=n, deadline=None, database=None,
            phases=[Phase.generate, Phase.shrink],  # no explain phase: readers may hang
            suppress_health_check=list(HealthCheck))(f))
    return deco


def properties(read_all, n: int, s: int, timeout: float, ctypes: tuple[str, ...]):
    def bounded(path):
        return run_bounded(read_all, path, timeout=timeout, memory=MEMORY)

    def check_image(img):
        got = bounded(img.path)
        assert len(got) == len(img.expected), \
            f"read {len(got)} bytes, the disk has {len(img.expected)}"
        if got != img.expected:
            first = next(i for i, (a, b) in enumerate(zip(got, img.expected, strict=False)) if a != b)
            raise AssertionError(f"wrong data from guest offset {first:#x}")

    @_settings(n, s)
    @given(img=images(params=image_params(extended_l2=(False,), compression_types=ctypes)))
    def p1_images(img):
        check_image(img)

    @_settings(max(n // 3, 5), s)
    @given(img=images(params=image_params(extended_l2=(True,), compression_types=ctypes), min_ops=1))
    def p2_extended_l2(img):
        check_image(img)

    def check_chain(ch):
        got = bounded(ch.top)
        assert len(got) == len(ch.top_expected), \
            f"read {len(got)} bytes, the top layer has {len(ch.top_expected)}"
        if got != ch.top_expected:
            first = next(i for i, (a, b) in enumerate(zip(got, ch.top_expected, strict=False))
                         if a != b)
            raise AssertionError(f"wrong data from guest offset {first:#x}")

    cparams = image_params(max_clusters=24, compression_types=ctypes)

    @_settings(n, s)
    @given(ch=chains(params=cparams, subdir=False))
    def p3_chains(ch):
        check_chain(ch)

    @_settings(max(n // 3, 5), s)
    @given(ch=chains(params=cparams, subdir=True))
    def p3_chains_subdir(ch):
        check_chain(ch)

    @_settings(n, s)
    @given(bad=invalid_images())
    def p4_invalid(bad):
        r = run_bounded(read_all, bad.path, timeout=timeout, memory=MEMORY, raise_errors=False)
        if r.kind in ("timeout", "memory", "signal", "exit"):
            raise ReaderFailure(f"{bad.rule}: {r.message}", r.kind)
        if bad.detected in ("open", "read"):
            assert r.kind == "exception", \
                f"{bad.rule} ({bad.description}): read {len(r.value)} bytes instead of refusing"

    return [
        ("images (no extended L2) read as their model", p1_images),
        ("extended-L2 images read as their model", p2_extended_l2),
        ("backing chains read as their model", p3_chains),
        ("chains whose backing name has a directory part (base/base.qcow2)", p3_chains_subdir),
        ("invalid images are refused, within bounds", p4_invalid),
    ]


def _summary(e: BaseException) -> list[str]:
    if isinstance(e, BaseExceptionGroup):  # hypothesis found several distinct bugs
        lines = [f"{len(e.exceptions)} distinct failures:"]
        for i, sub in enumerate(e.exceptions, 1):
            lines.append(f"({i})")
            lines += ["  " + ln for ln in _summary(sub)]
        return lines
    lines = [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]]
    seen = set()
    for note in getattr(e, "__notes__", []):
        for ln in note.splitlines():
            if ln.strip() and ln not in seen:
                seen.add(ln)
                lines.append(ln[:400])
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reader", choices=("dissect", "pyqcow"), default="dissect")
    ap.add_argument("--examples", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "pyqcow-bench")
    args = ap.parse_args(argv)
    read_all, name = None, ""
    if args.reader == "dissect":
        read_all, name = dissect_reader(args.cache_dir)
        if read_all is None:
            print(f"dissect.hypervisor unavailable ({name}); testing pyqcow's own reader instead",
                  flush=True)
    if read_all is None:
        read_all, name = pyqcow_reader()
    print(f"reader under test: {name}", flush=True)
    ctypes: tuple[str, ...] = ("zlib", "zstd")
    if getattr(read_all, "zstd", True) is False:
        ctypes = ("zlib",)
        print("  its zstd support needs backports.zstd, which its venv lacks: zstd images "
              "left out (image_params(compression_types=('zlib',)))", flush=True)
    print(f"{args.examples} examples per property, seed {args.seed}, "
          f"{args.timeout:g} s and {MEMORY >> 30} GiB per read", flush=True)
    found = 0
    for title, prop in properties(read_all, args.examples, args.seed, args.timeout, ctypes):
        t0 = time.monotonic()
        try:
            prop()
        except Exception as e:  # noqa: BLE001 - the report is the point
            found += 1
            print(f"\nFOUND  {title}  ({time.monotonic() - t0:.0f} s)", flush=True)
            for ln in _summary(e):
                print("    " + ln, flush=True)
        else:
            print(f"\nPASS   {title}  ({time.monotonic() - t0:.0f} s)", flush=True)
    print(f"\n{found} of 5 properties failed for {name.split(' (')[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
