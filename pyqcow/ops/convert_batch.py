"""convert -O qcow2: the queued clusters of a batch, allocated together and
filled (``write_batch``), split from convert_qcow2.py.

A batch holds ``(guest offset, length, source)`` clusters in guest order; a
source is ``(fd, host offset)`` (copied file to file) or a buffer.  The new
clusters are allocated with one ``prepare_writes`` per L2 table's range (its
table first, then its data: the layout qemu-img gives), except where every
source shares extents with the output (a reflink file system): then the batch
is one allocation, in the order of the sources, so that copy_file_range
shares long runs (each call is one reflink of a fixed cost).
"""

from __future__ import annotations

from .. import fastcopy
from . import copier

#: a batch of clusters that are all copied file to file (reflink file systems)
#: holds no data, only where it lies: it may grow this large (bytes) or this
#: long (clusters) before it is allocated and copied, so that the clusters of
#: one source file, allocated in its order, make long runs
SHARED_BATCH_BYTES = 1 << 30
SHARED_BATCH_CLUSTERS = 1 << 16


def reflink_fds(share: frozenset[int], out) -> frozenset[int]:
    """Those of ``share`` from which copy_file_range shares extents with ``out``."""
    if not share:
        return frozenset()
    dst = out.data_hf.fd
    return frozenset(fd for fd in share if fastcopy.can_share(fd, dst))


def write_batch(out, writer, batch: list, reflink: frozenset[int] = frozenset()) -> int:
    """Write the queued ``(guest offset, length, source)`` clusters (sorted) into
    fresh clusters allocated together; a source is ``(fd, host offset)`` (copied
    file to file) or a buffer (written; compressed with ``writer.comp``).
    ``reflink``: the source fds that share extents with ``out`` (see
    ``_write_part``)."""
    if not batch:
        return 0
    if writer.comp is not None:
        return sum(writer.write(g, data) for g, _, data in batch)
    if reflink and all(isinstance(s, tuple) and s[0] in reflink for _g, _n, s in batch):
        # all shared from a reflink file system: one allocation, in the order
        # of the sources, for the longest runs
        return write_part(out, batch, reflink)
    # one allocation per L2 table's range: its table first, then its data (the
    # layout prepare_write and qemu-img give)
    span = out.l2_entries * out.cluster_size
    part: list[tuple[int, int, object]] = []
    wrote = 0
    for g, n, source in batch:
        while n:
            if part and part[-1][0] // span != g // span:
                wrote += write_part(out, part, reflink)
                part = []
            m = min(n, span - g % span)
            part.append((g, m, source))
            if m < n:  # straddles: the rest goes with the next table
                source = ((source[0], source[1] + m) if isinstance(source, tuple)
                          else source[m:])
            g, n = g + m, n - m
    return wrote + write_part(out, part, reflink)


def write_part(out, batch: list, reflink: frozenset[int] = frozenset()) -> int:
    if not batch:
        return 0
    # the clusters shared from a ``reflink`` fd get new clusters in the order of
    # their source: longer runs, fewer copy_file_range calls (each a reflink of
    # fixed cost); elsewhere the layout stays the guest's, as qemu-img's
    sources = None
    if reflink:
        sources = [s if isinstance(s, tuple) and s[0] in reflink else None
                   for _g, _n, s in batch]
        if not any(sources):
            sources = None
    handle = out.writer.prepare_writes([(g, n) for g, n, _ in batch], sources)
    hf = out.data_hf
    copies: dict[int, list[tuple[int, int, int]]] = {}
    i = 0
    for g, host, n in handle:
        pos, end = g, g + n
        while pos < end:
            while batch[i][0] + batch[i][1] <= pos:
                i += 1
            ig, ilen, source = batch[i]
            stop = min(end, ig + ilen)
            if isinstance(source, tuple):
                copies.setdefault(source[0], []).append(
                    (source[1] + (pos - ig), host + (pos - g), stop - pos))
            else:
                hf.pwrite(source[pos - ig : stop - ig], host + (pos - g))
            pos = stop
    for fd, runs in copies.items():
        fastcopy.copy_runs(fd, hf.fd, copier.in_source_order(runs) if sources else runs)
    handle.filled()
    return sum(n for _, n, _ in batch)
