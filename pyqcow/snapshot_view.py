"""Read-only views of internal snapshots (``img.snapshot(name_or_id)``).

A view reads the guest disk as it was when the snapshot was taken: through the
snapshot's own L1 table (qcow2.rst "Snapshots"), sharing the image's L2 cache,
host file and backing chain.  Its size is the snapshot's ``disk_size`` (what
``qemu-img snapshot -a`` would restore); ``qemu-img convert -l`` instead keeps
the image's current virtual size and reads zeros (or the backing file) past
the snapshot's L1 table.

The view owns nothing: closing it does nothing, closing the image ends it.
"""

from __future__ import annotations

from . import entries, spec
from .errors import FormatError
from .hostfile import check_range
from .snapshot_table import SnapshotNotFoundError, find_snapshot, read_snapshot_table

__all__ = ["SnapshotView", "open_snapshot"]


class SnapshotView:
    """The guest disk of one internal snapshot, read-only."""

    format = "qcow2"
    writable = False

    def __init__(self, image, info) -> None:
        self.image = image
        self.info = info
        self.path = image.path
        self.header = image.header
        self.cluster_size = image.cluster_size
        self.virtual_size = info.disk_size
        self.backing = image.backing
        self.hf = image.hf
        self.data_hf = image.data_hf
        l1_size = info.l1_size
        if l1_size * 8 > spec.MAX_L1_SIZE_BYTES:
            raise FormatError(
                image.path, f"snapshot {info.id_str} L1 table too large ({l1_size} entries)"
            )
        if l1_size and info.l1_table_offset + l1_size * 8 > image.file_size:
            raise FormatError(
                image.path,
                f"snapshot {info.id_str} L1 table at {info.l1_table_offset:#x} lies beyond the "
                "end of the file",
            )
        raw = image.hf.pread(l1_size * 8, info.l1_table_offset) if l1_size else b""
        self.l1 = entries.decode_u64_table(raw)

    # -- identity ------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.info.name

    @property
    def id(self) -> str:
        return self.info.id_str

    @property
    def chain(self) -> list:
        return [self] + (self.backing.chain if self.backing is not None else [])

    @property
    def metadata_preallocation(self) -> bool:
        return self.image.metadata_preallocation

    # -- reads -----------------------------------------------------------------------
    def runs(self, guest_offset: int, length: int):
        """Runs of this snapshot's layer over [guest_offset, guest_offset+length)."""
        return self.image.runs(guest_offset, length, l1=self.l1)

    def readinto(self, buf, offset: int) -> None:
        self.image.readinto(buf, offset, l1=self.l1)

    def read(self, offset: int, length: int) -> bytes:
        check_range(self.path, offset, length, self.virtual_size)
        host = self.image._single_cluster_host(offset, length, self.l1)
        if host >= 0:
            return self.hf.pread(length, host)
        buf = bytearray(length)
        self.image.readinto(buf, offset, l1=self.l1)
        return bytes(buf)

    def reader(self):
        """A read-only, seekable io.RawIOBase over the snapshot's guest disk."""
        from .reader import GuestReader

        return GuestReader(self)

    def map(self) -> list:
        from .mapping import chain_status

        return chain_status(self)

    # -- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        """Nothing to release: the view borrows the image's files."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SnapshotView {self.path!r} id={self.id!r} name={self.name!r} size={self.virtual_size}>"


def open_snapshot(image, name_or_id: str) -> SnapshotView:
    """The view of snapshot ``name_or_id`` of ``image`` (an exact ID first, then a name)."""
    snapshots = read_snapshot_table(image)
    info = find_snapshot(snapshots, str(name_or_id))
    if info is None:
        known = ", ".join(f"{s.id_str} ({s.name})" for s in snapshots) or "none"
        raise SnapshotNotFoundError(
            image.path, f"no internal snapshot with ID or name {name_or_id!r} (snapshots: {known})"
        )
    return SnapshotView(image, info)
