"""Layer-wide changes through a Writer (pyqcow/writer.py): grow or shrink the
guest disk, drop every cluster (commit's "empty the top"), rewrite the backing
file name.  Each one changes metadata in memory and ends with the writer's
flush (or, for the backing name, a flush and then the header switch)."""

from __future__ import annotations

from array import array

from . import entries, spec
from .errors import FormatError, OperationError, QcowError
from .header import size_to_l1
from .tablescan import nonzero_indices


def resize(w, new_size: int) -> None:
    img = w.img
    w.check_writable()
    if new_size < img.virtual_size:
        raise OperationError(img.path, "shrinking an image is not supported")
    if new_size > spec.MAX_VIRTUAL_SIZE:
        raise OperationError(img.path, "virtual size too large (maximum 2^61 bytes)")
    if new_size == img.virtual_size:
        return
    w.begin_write()
    need = size_to_l1(new_size, img.cluster_bits, img.header.l2_entry_size)
    if need > len(img.l1):
        if need * 8 > spec.MAX_L1_SIZE_BYTES:
            raise OperationError(img.path, "L1 table would exceed 32 MiB")
        old = (img.header.l1_table_offset, img.header.l1_size)
        clusters = (need * 8 + img.cluster_size - 1) >> img.cluster_bits
        img.l1.extend(array("Q", bytes(8 * (need - len(img.l1)))))
        new_off = w.refcounts.alloc(clusters)
        w.note_alloc()
        if w.l1_moved_from is None:
            w.l1_moved_from = old
        else:  # an L1 allocated in this batch and never written
            w.refcounts.free_later(
                img.header.l1_table_offset,
                (img.header.l1_size * 8 + img.cluster_size - 1) >> img.cluster_bits,
            )
        img.header = img.header.replace(l1_table_offset=new_off, l1_size=need)
        w.l1_dirty = True
    img.header = img.header.replace(size=new_size)
    img.virtual_size = new_size
    w.header_dirty = True
    # bitmaps grow with the disk, new bits clear (as qemu-img resize does)
    for b in w.bitmaps or ():
        if b.bits is not None:
            b.resize(new_size)


def _unlink_table(w, l1_index: int, l2_off: int) -> None:
    """Drop a whole L2 table of the active layer and every allocation it holds.

    The table is unlinked before any free is queued: if the caller's loop is
    interrupted (KeyboardInterrupt) and close() flushes, the worst case is a
    leak, never a freed cluster that an L2 entry still points at."""
    img = w.img
    table = img.l2_table(l2_off)
    img.l1[l1_index] = 0
    w.l1_dirty = True
    w.l2_cache.drop(l2_off)
    step = 2 if img.extended_l2 else 1
    # (empty entries skipped in bulk; an extended entry with only its bitmap set
    # holds no cluster)
    w.free_entry_allocations([table[step * j] for j in nonzero_indices(table, step)])
    w.refcounts.free_later(l2_off)


def shrink(w, new_size: int) -> None:
    """Cut the guest disk to ``new_size`` bytes, freeing every cluster past the end.

    For merge (BASE larger than TOP: the kept image must be exactly TOP's
    size).  The partial last cluster is zeroed past the end, so a later grow
    reads zeros there, as after qemu-img resize --shrink.  Refused with
    internal snapshots (their tables share the clusters).
    """
    img = w.img
    w.check_writable()
    if new_size >= img.virtual_size:
        return
    if img.header.nb_snapshots:
        raise OperationError(img.path, "cannot shrink an image with internal snapshots")
    cs, cb = img.cluster_size, img.cluster_bits
    first_gone = (new_size + cs - 1) >> cb
    tail_end = min(first_gone << cb, img.virtual_size)
    if tail_end > new_size:
        w.write_zeroes(new_size, tail_end - new_size)
    w.begin_write()
    step = 2 if img.extended_l2 else 1
    keep_tables = (first_gone + img.l2_entries - 1) // img.l2_entries
    for l1_index in range(first_gone // img.l2_entries, len(img.l1)):
        l2_off = entries.l1_l2_offset(img.l1[l1_index])
        if not l2_off:
            continue
        if l1_index >= keep_tables:
            _unlink_table(w, l1_index, l2_off)  # the whole table lies past the end
            continue
        table, l2_off = w.l2_for_write(l1_index * img.l2_entries)
        for i in range(first_gone - l1_index * img.l2_entries, img.l2_entries):
            e = table[step * i]
            if e or (step == 2 and table[2 * i + 1]):
                table[step * i] = 0
                if step == 2:
                    table[2 * i + 1] = 0
                w.l2_cache.mark_dirty(l2_off)
                if e:
                    w._free_entry_allocation(e)
    img.header = img.header.replace(size=new_size)
    img.virtual_size = new_size
    w.header_dirty = True
    w.flush()


def make_empty(w) -> None:
    """Drop every cluster of the active layer (qemu-img commit's 'empty the top').

    Sets no bitmap bits: it is only used right after a commit, when the
    backing file reads what this layer did, so the guest content does not
    change (qemu-img commit leaves the top's bitmaps alone too)."""
    img = w.img
    w.check_writable()
    w.begin_write()
    for l1_index, l1e in enumerate(img.l1):
        l2_off = entries.l1_l2_offset(l1e)
        if l2_off:
            _unlink_table(w, l1_index, l2_off)
    w.flush()


def set_backing(w, name: str | None, fmt: str | None) -> None:
    """Rewrite the backing file name and format extension (one header write).

    The name is validated first (length, no protocol prefix QEMU would misread).
    """
    from .header import check_fits, with_extension
    from .names import validate_backing_name

    img = w.img
    w.check_writable()
    if name:
        try:
            validate_backing_name(img.path, name)
        except QcowError as e:
            raise OperationError(img.path, f"cannot store backing name: {e.message}") from None
    hdr = with_extension(
        img.header,
        spec.ExtType.BACKING_FORMAT,
        fmt.encode() if (fmt and name) else None,
    )
    hdr = hdr.replace(backing_file=name or None)
    try:
        check_fits(hdr)
    except FormatError as e:
        raise OperationError(img.path, f"cannot store backing name: {e.message}") from None
    w.flush()
    w.switch_header(hdr)
