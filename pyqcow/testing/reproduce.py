"""Shell scripts that rebuild a generated image or chain outside Python's test run.

The script uses qemu-img and qemu-io (and python3 for the pseudo-random data of
non-pattern writes and for header patches), runs in the current directory, and
ends by comparing the result with the model's sha256.  Images that pyqcow
created are recreated with ``qemu-img create`` and the same options: the host
layout may differ from the original file, the guest content does not.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shlex

from ._patch import add_unknown_extension, set_incompatible_bits
from .guestops import _qemu_io_groups

_HEAD = """#!/bin/sh
# Rebuilds a pyqcow.testing example with qemu-img/qemu-io (run it in an empty directory).
set -eu
"""


def _data_cmd(op, name: str) -> str:
    return (f"python3 -c 'import random,sys; sys.stdout.buffer.write("
            f"random.Random({op.seed}).randbytes({op.length}))' > {name}")


def _ops_lines(target: str, fmt: str, ops, tag: str) -> list[str]:
    lines = []
    for g, group in enumerate(_qemu_io_groups(ops)):
        cmds = []
        for i, op in enumerate(group):
            datafile = None
            if op.kind in ("write", "compressed") and not op.pattern:
                datafile = f"{tag}-{g}-{i}.bin"
                lines.append(_data_cmd(op, datafile))
            cmds.append(op.qemu_io_command(datafile))
        argv = ["qemu-io", "-f", fmt] + [x for c in cmds for x in ("-c", c)] + [target]
        lines.append(" ".join(shlex.quote(a) for a in argv))
    lines.append(f"rm -f {tag}-*.bin")
    return lines


def _patch_lines(fn, *args) -> list[str]:
    src = inspect.getsource(fn)
    call = f"{fn.__name__}({', '.join(repr(a) for a in args)})"
    return ["python3 - <<'PYQCOW_EOF'", src.rstrip(), call, "PYQCOW_EOF"]


def _check_lines(target: str, fmt: str, expected: bytes) -> list[str]:
    digest = hashlib.sha256(expected).hexdigest()
    return [
        f"qemu-img convert -f {fmt} -O raw {shlex.quote(target)} {shlex.quote(target)}.check.raw",
        f"echo '{digest}  {target}.check.raw' | sha256sum -c -",
        f"rm -f {shlex.quote(target)}.check.raw",
    ]


def _image_lines(img, rel: str) -> list[str]:
    """Commands that rebuild ``img`` at relative path ``rel`` (cwd: the chain root)."""
    lines: list[str] = []
    tag = os.path.basename(rel).split(".")[0]
    for step in img.steps:
        kind = step[0]
        if kind == "create":
            _, _name, p, backing, backing_format, data_file = step
            if p.creator != "qemu-img":
                lines.append("# (made by pyqcow.create; qemu-img create with the same options)")
            if data_file:  # relative to the script's directory (where qemu looks)
                data_file = os.path.join(os.path.dirname(rel), data_file)
            argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", p.qemu_options(data_file)]
            if backing:
                argv += ["-b", backing, "-F", backing_format or "qcow2"]
            argv += [rel, str(p.virtual_size)]
            lines.append(" ".join(shlex.quote(a) for a in argv))
        elif kind == "ops":
            lines.append(f"# {len(step[2])} guest operation(s), written by {step[1]} originally")
            lines += _ops_lines(rel, "qcow2", step[2], tag)
        elif kind == "snapshot":
            lines.append(f"qemu-img snapshot -c {step[1]} {shlex.quote(rel)}")
        elif kind == "bitmap":
            lines.append(f"qemu-img bitmap --add {shlex.quote(rel)} {step[1]}")
        elif kind == "extension":
            lines.append("# an unknown header extension (QEMU ignores it)")
            lines += _patch_lines(add_unknown_extension, rel, step[1], step[2])
        elif kind == "incompatible":
            lines.append("# incompatible feature bits (1 dirty, 2 corrupt)")
            lines += _patch_lines(set_incompatible_bits, rel, step[1])
    return lines


def image_script(img) -> str:
    """The script for a :class:`GeneratedImage` (see ``GeneratedImage.reproduce``)."""
    rel = os.path.basename(img.path)
    lines = [f"# params: {img.params!r}"] + _image_lines(img, rel)
    lines += _check_lines(rel, "qcow2", img.expected)
    return _HEAD + "\n".join(lines) + "\n"


def chain_script(ch) -> str:
    """The script for a :class:`GeneratedChain`, base first."""
    lines: list[str] = []
    n = len(ch.layers)
    for i in range(n - 1, -1, -1):
        path, fmt, img = ch.layers[i], ch.formats[i], ch.images[i] if ch.images else None
        rel = os.path.relpath(path, ch.directory)
        lines.append(f"# layer {i} ({'top' if i == 0 else 'base' if i == n - 1 else 'middle'})")
        if os.path.dirname(rel):
            lines.append(f"mkdir -p {shlex.quote(os.path.dirname(rel))}")
        if fmt == "raw":
            lines.append(f"truncate -s {len(ch.expected[i])} {shlex.quote(rel)}")
            if ch.ops[i]:
                lines += _ops_lines(rel, "raw", ch.ops[i], "raw")
        else:
            lines += _image_lines(img, rel)
    lines += _check_lines(os.path.relpath(ch.layers[0], ch.directory), ch.formats[0],
                          ch.expected[0])
    return _HEAD + "\n".join(lines) + "\n"
