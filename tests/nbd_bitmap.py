"""qemu itself as the oracle for persistent dirty bitmaps.

``qemu_dirty(image, name)`` exports IMAGE read-only with ``qemu-nbd -B NAME`` and
reads the bitmap through ``qemu-img map --image-opts ... x-dirty-bitmap=
qemu:dirty-bitmap:NAME``: with that option qemu-img reports the bitmap as the
block status, a dirty range as ``"data": false`` (verified in
tests/interop/test_bitmaps.py::test_oracle_sees_qemu_io_writes on a range qemu-io
made dirty).  qemu-nbd refuses to export an inconsistent (in-use) bitmap, so a
bitmap pyqcow left invalid fails here with QemuError.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import qemu
from qemu import QemuError, qemu_img_json


def qemu_dirty(image: os.PathLike | str, name: str) -> list[tuple[int, int]]:
    """Dirty (offset, length) ranges of bitmap ``name`` as qemu reads them, merged."""
    exe = qemu.require_tool("qemu-nbd")
    with tempfile.TemporaryDirectory(prefix="nbd") as d:
        sock = str(Path(d) / "s")
        argv = [exe, "-r", "-f", "qcow2", "-k", sock, "-B", name, os.fspath(image)]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                if proc.poll() is not None:
                    out, err = proc.communicate()
                    raise QemuError(argv, proc.returncode, out, err)
                if time.monotonic() > deadline:
                    raise QemuError(argv, -1, "", "qemu-nbd did not create its socket")
                time.sleep(0.02)
            opts = (
                f"driver=nbd,server.type=unix,server.path={sock},"
                f"x-dirty-bitmap=qemu:dirty-bitmap:{name}"
            )
            try:
                extents = qemu_img_json("map", "--output=json", "--image-opts", opts)
            except QemuError:
                try:  # qemu-nbd may refuse the bitmap after creating its socket
                    out, err = proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:
                    raise
                raise QemuError(argv, proc.returncode, out, err) from None
        finally:
            proc.kill()
            proc.wait()
            for s in (proc.stdout, proc.stderr):
                if s is not None:
                    s.close()
    out: list[tuple[int, int]] = []
    for e in extents:
        if e["data"]:
            continue
        if out and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["start"], e["length"]))
    return out


def granule_ranges(granules: set[int], granularity: int, size: int) -> list[tuple[int, int]]:
    """Merged (offset, length) ranges of a set of granule numbers, clipped to ``size``."""
    out: list[tuple[int, int]] = []
    for g in sorted(granules):
        start = g * granularity
        end = min(size, start + granularity)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
    return out


def granules_of(offset: int, length: int, granularity: int) -> set[int]:
    if length <= 0:
        return set()
    return set(range(offset // granularity, (offset + length - 1) // granularity + 1))


def bitmap_flags(image: os.PathLike | str) -> dict[str, list[str]]:
    """name -> flags as qemu-img info reports them."""
    info = qemu.info_json(image)
    data = info.get("format-specific", {}).get("data", {})
    return {b["name"]: b["flags"] for b in data.get("bitmaps", [])}


def assert_clean(image: os.PathLike | str) -> None:
    """qemu-img check: no corruptions, no leaks."""
    res, rc = qemu.check_json(image)
    assert rc == 0, res
    assert not res.get("leaks") and not res.get("corruptions"), res
