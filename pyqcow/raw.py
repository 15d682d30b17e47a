"""Raw images behind the same read interface as QcowImage."""

from __future__ import annotations

import os

from .entries import ClusterType
from .hostfile import LOCK_READ, LOCK_WRITE, HostFile, check_range
from .libyal_methods import LibyalMethods

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    from .mapping import Run  # mapping (and dataclasses) load on first use: start-up time


class RawImage(LibyalMethods):
    format = "raw"
    backing = None
    cluster_size = 65536

    def __init__(self, path: str, mode: str = "r", *, force_share: bool = False) -> None:
        self.path = os.fspath(path)
        self.writable = mode == "r+"
        self.hf = HostFile(self.path, writable=self.writable)
        try:
            if not force_share:
                self.hf.lock(LOCK_WRITE if self.writable else LOCK_READ)
        except BaseException:
            self.hf.close()
            raise
        # qemu's block layer counts whole 512-byte sectors: a raw file of 1000 bytes is
        # a 1024-byte disk whose tail reads as zeros (info, map, convert all say so)
        self.virtual_size = -(-self.hf.size() // 512) * 512

    @property
    def chain(self) -> list:
        return [self]

    def read(self, offset: int | None = None, length: int | None = None) -> bytes:
        if length is None:  # libyal's read(size=None): at the libyal offset (pyqcow.libyal)
            return self.read_buffer(offset)
        check_range(self.path, offset, length, self.virtual_size)
        return self.hf.pread(length, offset)

    def readinto(self, buf, offset: int) -> None:
        self.hf.preadinto(buf, offset)

    def map(self, start: int = 0, length: int | None = None) -> list:
        """qemu-img map's extents (pyqcow.mapping.Extent) through the backing chain."""
        from .mapping import chain_status

        return chain_status(self, start, length)

    def reader(self):
        from .reader import GuestReader

        return GuestReader(self)

    def runs(self, guest_offset: int, length: int) -> list[Run]:
        """Data/hole runs of the file (a hole reads as zeros, but is 'allocated')."""
        from .mapping import Run

        out = []
        for off, ln, is_data in self.hf.data_extents(guest_offset, guest_offset + length):
            out.append(
                Run(off, ln, ClusterType.NORMAL if is_data else ClusterType.ZERO_ALLOC, off)
            )
        return out

    def write(self, offset: int, data) -> None:
        """Write inside the disk; like QcowImage, never past the virtual size
        (``resize`` grows the disk)."""
        check_range(self.path, offset, memoryview(data).nbytes, self.virtual_size)
        self.hf.pwrite(data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        check_range(self.path, offset, length, self.virtual_size)
        if not self.hf.punch_hole(offset, length):
            self.hf.pwrite(bytes(length), offset)

    def resize(self, size: int) -> None:
        self.hf.truncate(size)
        self.virtual_size = size

    def flush(self) -> None:
        self.hf.fsync()

    def close(self) -> None:
        self.hf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
