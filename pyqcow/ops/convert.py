"""convert: copy the guest view of an image (its whole chain) into a new file.

``plan_raw`` turns the chain's block status into a list of copy steps: ranges
whose data lives uncompressed in a host file are copied file-to-file
(``fastcopy.copy_runs``, zero 4 KiB blocks skipped); compressed or otherwise
encoded ranges are read through the image.  Ranges that read as zeros are not
written at all, so the raw output is sparse with the image's virtual size.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import fastcopy
from ..errors import OperationError
from ..mapping import chain_status

__all__ = ["CopyStep", "RawPlan", "convert_to_raw", "execute_raw", "plan_raw"]

READ_CHUNK = 1 << 20
ZERO_GRANULARITY = 4096

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class CopyStep:
    guest_offset: int
    length: int
    fd: int | None = None  # copy host bytes from this fd ...
    host_offset: int | None = None  # ... starting here; None: read through the image


@dataclass
class RawPlan:
    virtual_size: int
    steps: list[CopyStep] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(s.length for s in self.steps)


def _data_fds(img) -> dict[str, int]:
    fds = {}
    for layer in img.chain:
        hf = getattr(layer, "data_hf", None) or layer.hf
        name = getattr(layer, "data_file_path", None) or layer.path
        fds.setdefault(name, hf.fd)
    return fds


def plan_raw(img) -> RawPlan:
    """Which guest ranges of ``img`` hold data, and where to copy them from."""
    fds = _data_fds(img)
    plan = RawPlan(img.virtual_size)
    for e in chain_status(img):
        if not e.data or e.zero:
            continue
        fd = fds.get(e.filename) if e.offset is not None and e.filename else None
        if fd is not None:
            plan.steps.append(CopyStep(e.start, e.length, fd, e.offset))
        else:
            plan.steps.append(CopyStep(e.start, e.length))
    return plan


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def execute_raw(img, plan: RawPlan, dst: str | os.PathLike, progress: ProgressFn | None = None) -> int:
    """Write ``plan`` into ``dst`` (created or truncated). Returns bytes written."""
    dst = os.fspath(dst)
    for layer in img.chain:
        for hf in {id(h): h for h in (layer.hf, getattr(layer, "data_hf", layer.hf))}.values():
            if _same_file(hf.fd, dst):
                raise OperationError(dst, f"destination is the source image file {hf.path}")
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        sparse = stat.S_ISREG(os.fstat(fd).st_mode)
        if sparse:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, plan.virtual_size)
        total = plan.data_bytes
        done = written = 0
        pos = 0
        for step in plan.steps:
            if not sparse and step.guest_offset > pos:
                _write_zeros(fd, pos, step.guest_offset - pos)
            if step.fd is not None:
                written += fastcopy.copy_runs(
                    step.fd, fd, [(step.host_offset, step.guest_offset, step.length)],
                    skip_zero=sparse,
                )
            else:
                written += _copy_through_image(img, fd, step, sparse)
            pos = step.guest_offset + step.length
            done += step.length
            if progress:
                progress(done, total)
        if not sparse and plan.virtual_size > pos:
            _write_zeros(fd, pos, plan.virtual_size - pos)
        if sparse and os.fstat(fd).st_size != plan.virtual_size:
            os.ftruncate(fd, plan.virtual_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _copy_through_image(img, fd: int, step: CopyStep, sparse: bool) -> int:
    written = 0
    buf = bytearray(min(READ_CHUNK, step.length))
    pos, end = step.guest_offset, step.guest_offset + step.length
    while pos < end:
        n = min(len(buf), end - pos)
        view = memoryview(buf)[:n]
        img.readinto(view, pos)
        if sparse:
            for off, length, is_zero in fastcopy.zero_runs(view, ZERO_GRANULARITY):
                if not is_zero:
                    _pwrite_all(fd, view[off : off + length], pos + off)
                    written += length
        else:
            _pwrite_all(fd, view, pos)
            written += n
        pos += n
    return written


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _write_zeros(fd: int, offset: int, length: int) -> None:
    zeros = bytes(min(READ_CHUNK, length))
    while length:
        n = min(len(zeros), length)
        _pwrite_all(fd, memoryview(zeros)[:n], offset)
        offset += n
        length -= n


def convert_to_raw(img, dst: str | os.PathLike, progress: ProgressFn | None = None) -> int:
    """Plan and write the raw guest view of ``img`` to ``dst``."""
    return execute_raw(img, plan_raw(img), dst, progress)
