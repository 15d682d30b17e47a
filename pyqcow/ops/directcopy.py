"""The copier's O_DIRECT path: fresh clusters of the destination written through
an O_DIRECT descriptor, several writes in flight (``copier._Batch`` uses it for
commit and stream; ``fastcopy.copy_runs(direct=...)`` calls it).

Why (ext4, no reflink; issue 14): a buffered copy puts every byte through the
destination's page cache (page allocation, a kernel copy), and its write-back is
throttled (wbt) and mostly left to the final fsync; ``qemu-img`` keeps several
requests in flight.  Here the fresh space is reserved (fallocate: the writes are
then overwrites of reserved blocks, which ext4 does not serialise like extending
writes) and written in large aligned writes on a few threads while the calling
thread copies the rest.  The durable-write order is unchanged: the writer's
flush fsyncs the data file (device cache, ext4's unwritten-extent conversions)
before any metadata points at these clusters, exactly as for buffered data.
"""

from __future__ import annotations

import errno
import os

from .. import fastcopy

# Fresh space of the destination (past its end of file when a batch starts) is
# written with O_DIRECT on a few threads, so the disk gets several large writes
# in flight while the copy goes on, and nothing is left for the final fsync
# (which still makes it durable: the device cache, ext4's unwritten extents).
# The space is reserved first (fallocate), so that the writes are overwrites of
# reserved blocks, not extending writes (which ext4 serialises).  Overwrites of
# clusters that already hold data (commit into a base) stay buffered: their
# pages may be cached, and they are scattered 64 KiB writes that the write-back
# issues best.  Measured on ext4 (tools/bench chain, issue 14): see the report.
DIRECT_THREADS = 3
DIRECT_GROUP = 4 * 1024 * 1024   # bytes per O_DIRECT write (a thread's buffer)
DIRECT_MIN = 1024 * 1024         # shorter contiguous destination runs stay buffered
DIRECT_ALIGN = 4096


def _cut_dst(runs, offset: int):
    """``runs`` (destination-contiguous) split at destination ``offset``."""
    before, after = [], []
    for so, do, n in runs:
        if do + n <= offset:
            before.append((so, do, n))
        elif do >= offset:
            after.append((so, do, n))
        else:
            k = offset - do
            before.append((so, do, k))
            after.append((so + k, offset, n - k))
    return before, after


class DirectWriter:
    """O_DIRECT writes of copy runs into the fresh space of one destination file.

    ``reserve(end)`` extends the file to ``end`` with fallocate; runs whose
    destination lies at or past the end of file before that call (and is
    aligned) are then taken by ``start`` (fastcopy.copy_runs(direct=...)): each
    group of up to DIRECT_GROUP contiguous destination bytes is read from the
    source into a page-aligned buffer and written in one pwrite, on the
    writer's threads; ``wait`` returns the bytes written.  Any failure to set
    up (no O_DIRECT, no fallocate) leaves ``usable`` False: buffered it is.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.fresh = 1 << 62  # destination offsets from here on are fresh space
        self.dfd = -1
        self.pool = None
        self.buffers: list = []
        # on a reflink file system copy_file_range shares the extents, which is
        # better than any write: nothing here then
        names = () if fastcopy.may_share(fd) else (f"/proc/self/fd/{fd}", path)
        for name in names:
            try:
                self.dfd = os.open(name, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
                break
            except (OSError, AttributeError):
                continue
        self.usable = self.dfd >= 0

    def reserve(self, end: int) -> None:
        if not self.usable:
            return
        size = os.fstat(self.fd).st_size
        try:
            if end > size and not fastcopy.fallocate(self.fd, size, end - size):
                self.usable = False
                return
        except OSError:  # (ENOSPC...): the buffered copy meets it, as without this
            self.usable = False
            return
        self.fresh = size

    def start(self, src_fd: int, runs):
        """(pending, rest): the groups started on the threads, and the runs left
        for the caller to copy."""
        if not self.usable:
            return [], runs
        groups, rest = self._split(runs)
        if not groups:
            return [], rest
        if self.pool is None:
            from ..writeback import TaskPool

            self.pool = TaskPool(DIRECT_THREADS, "pyqcow-direct")
        return [self.pool.submit(self._write_group, src_fd, g) for g in groups], rest

    def _split(self, runs):
        groups = []
        extents: list[list[tuple[int, int, int]]] = []
        fresh = self.fresh
        rest = [r for r in runs if r[1] + r[2] <= fresh]  # old space: as it came
        # the fresh space in destination order (commit: the new clusters of a batch
        # are one contiguous run, between overwrites of old ones in guest order)
        for run in sorted((r for r in runs if r[1] + r[2] > fresh), key=lambda r: r[1]):
            if extents and extents[-1][-1][1] + extents[-1][-1][2] == run[1]:
                extents[-1].append(run)
            else:
                extents.append([run])
        for ext in extents:
            first, end = ext[0][1], ext[-1][1] + ext[-1][2]
            a = -(-max(first, fresh) // DIRECT_ALIGN) * DIRECT_ALIGN
            b = end // DIRECT_ALIGN * DIRECT_ALIGN
            if b - a < DIRECT_MIN:
                rest.extend(ext)
                continue
            head, ext = _cut_dst(ext, a)
            ext, tail = _cut_dst(ext, b)
            rest.extend(head)
            rest.extend(tail)
            group, size = [], 0
            for so, do, n in ext:
                while n:
                    take = min(n, DIRECT_GROUP - size)
                    group.append((so, do, take))
                    size += take
                    so, do, n = so + take, do + take, n - take
                    if size == DIRECT_GROUP:
                        groups.append(group)
                        group, size = [], 0
            if group:
                groups.append(group)
        return groups, rest

    def _write_group(self, src_fd: int, group) -> int:
        import mmap

        buf = self.buffers.pop() if self.buffers else mmap.mmap(-1, DIRECT_GROUP)
        try:
            with memoryview(buf) as view:
                return self._fill_and_write(src_fd, group, view)
        finally:
            self.buffers.append(buf)

    def _fill_and_write(self, src_fd: int, group, view: memoryview) -> int:
        pos = 0
        for so, _, n in group:
            got = fastcopy._pread_full(src_fd, view[pos : pos + n], so)
            if got < n:
                view[pos + got : pos + n] = bytes(n - got)  # past the source's end
            pos += n
        dst = group[0][1]
        done = 0
        while done < pos:
            try:
                done += os.pwrite(self.dfd, view[done:pos], dst + done)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.usable = False  # alignment refused here: buffered from now on
                fastcopy._pwrite_full(self.fd, view[done:pos], dst + done)
                done = pos
        return pos

    @staticmethod
    def wait(pending) -> int:
        total, error = 0, None
        for f in pending:
            try:
                total += f.result()
            except BaseException as e:  # every group finishes before any error goes up
                error = error or e
        if error is not None:
            raise error
        return total

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        for buf in self.buffers:
            buf.close()
        self.buffers.clear()
