"""Change the format options of an existing qcow2 image (qemu-img amend).

Options (``-o``): ``compat`` (0.10|v2 or 1.1|v3), ``lazy_refcounts``,
``refcount_bits``, ``data_file`` (a new name for an image that has an external
data file), ``data_file_raw=off``, ``size`` (as resize).  Everything is checked
before the first write; each step is crash-safe on its own:

- upgrade to v3: one header write;
- refcount_bits: the refcounts are computed from the image's references (as
  ``check`` does), written in the new width into clusters nothing uses (the old
  structures stay intact), and the header switches to them in one write; only
  then are the old table and blocks freed;
- downgrade to v2 (refused where v2 cannot hold the image: extended L2, zstd,
  persistent bitmaps, external data file, internal snapshots, refcount width
  other than 16): zero clusters are expanded first (v2 has no zero flag: a
  preallocated one gets zeros written into its cluster, a plain one becomes
  unallocated, or a cluster of written zeros over a backing file), made durable,
  and then the header is rewritten as v2.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .. import entries, spec
from ..errors import OperationError

__all__ = ["amend", "parse_amend_options"]

ProgressFn = Callable[[int, int], None]

_CREATION_ONLY = {
    "cluster_size", "extended_l2", "compression_type", "preallocation", "encryption",
    "encrypt.format", "encrypt.key-secret", "nocow",
}


def parse_amend_options(path: str, opts: str) -> dict:
    """``-o key=val,...`` -> {option: value}, every value checked."""
    from ..units import parse_size

    out: dict = {}
    for item in (opts or "").split(","):
        if not item:
            continue
        key, _, val = item.partition("=")
        key = key.strip()
        if key == "compat":
            if val not in ("0.10", "v2", "1.1", "v3"):
                raise OperationError(path, f"invalid value {val!r} for option compat: "
                                           "use 0.10 (v2) or 1.1 (v3)")
            out["compat"] = 2 if val in ("0.10", "v2") else 3
        elif key == "lazy_refcounts":
            if val not in ("on", "off", "true", "false", ""):
                raise OperationError(path, f"invalid value {val!r} for option lazy_refcounts: "
                                           "use on or off")
            out["lazy_refcounts"] = val in ("on", "true", "")
        elif key == "refcount_bits":
            try:
                n = int(val, 10)
            except ValueError:
                n = 0
            if n not in (1, 2, 4, 8, 16, 32, 64):
                raise OperationError(path, f"invalid value {val!r} for option refcount_bits: "
                                           "must be a power of two between 1 and 64")
            out["refcount_bits"] = n
        elif key == "data_file":
            if not val:
                raise OperationError(path, "data_file needs a file name")
            out["data_file"] = val
        elif key == "data_file_raw":
            if val not in ("on", "off", "true", "false", ""):
                raise OperationError(path, f"invalid value {val!r} for option data_file_raw: "
                                           "use on or off")
            out["data_file_raw"] = val in ("on", "true", "")
        elif key == "size":
            try:
                out["size"] = parse_size(val)
            except ValueError as e:
                raise OperationError(path, str(e)) from None
        elif key in ("backing_file", "backing_fmt"):
            raise OperationError(path, "cannot amend the backing file (use 'pyqcow rebase')")
        elif key in _CREATION_ONLY:
            raise OperationError(
                path, f"invalid parameter {key!r}: this option is only supported for image creation"
            )
        else:
            raise OperationError(path, f"invalid parameter {key!r}")
    if not out:
        raise OperationError(path, "no options to amend (-o key=value,...)")
    return out


def amend(path: str | os.PathLike, options: dict | str, *, progress: ProgressFn | None = None) -> None:
    """Apply ``options`` (a dict from parse_amend_options, or the ``-o`` text)."""
    from ..image import QcowImage
    from ..writer import require_writable_features

    path = os.fspath(path)
    if isinstance(options, str):
        options = parse_amend_options(path, options)
    with QcowImage(path, "r+") as probe:
        require_writable_features(probe)
        _check_plan(probe, options)
    steps = []
    h_version = None
    with QcowImage(path, "r+") as img:
        h_version = img.header.version
    if options.get("compat") == 3 and h_version == 2:
        steps.append(_upgrade)
    if "refcount_bits" in options:
        steps.append(lambda p, o, pr: _refcount_bits(p, o["refcount_bits"], pr))
    if "lazy_refcounts" in options and not (options.get("compat") == 2):
        steps.append(lambda p, o, pr: _set_lazy(p, o["lazy_refcounts"]))
    if "data_file" in options or "data_file_raw" in options:
        steps.append(_data_file)
    if "size" in options:
        steps.append(_size)
    if options.get("compat") == 2 and h_version == 3:
        steps.append(_downgrade)
    for step in steps:
        step(path, options, progress)


# ------------------------------------------------------------------ checks
def _check_plan(img, o: dict) -> None:
    path = img.path
    h = img.header
    version = o.get("compat", h.version)
    bits = o.get("refcount_bits", h.refcount_bits)
    if version == 2:
        if "refcount_bits" in o and bits != 16:
            raise OperationError(path, "compat=0.10 requires refcount_bits=16")
        if bits != 16:
            raise OperationError(
                path, f"cannot downgrade to compat=0.10: the image has {bits}-bit refcounts "
                      "(add refcount_bits=16)"
            )
        if o.get("lazy_refcounts"):
            raise OperationError(
                path, "lazy refcounts only supported with compatibility level 1.1 and above"
            )
        if h.version == 3:
            why = []
            if h.extended_l2:
                why.append("extended L2 entries")
            if h.compression_type:
                why.append("zstd compression")
            if h.bitmaps is not None and h.bitmaps.nb_bitmaps:
                why.append("persistent bitmaps")
            if h.has_data_file:
                why.append("an external data file")
            if h.nb_snapshots:
                why.append("internal snapshots")
            if why:
                raise OperationError(
                    path, "cannot downgrade to compat=0.10: v2 cannot hold " + ", ".join(why)
                )
    if "refcount_bits" in o and version == 2 and bits != 16:
        raise OperationError(
            path, "refcount widths other than 16 bits require compatibility level 1.1 or above "
                  "(use compat=1.1)"
        )
    if o.get("lazy_refcounts") and version == 2:
        raise OperationError(
            path, "lazy refcounts only supported with compatibility level 1.1 and above"
        )
    if "data_file" in o and not h.has_data_file:
        raise OperationError(path, "data_file can only be set for images that use an external "
                                   "data file")
    if "data_file_raw" in o:
        if o["data_file_raw"]:
            raise OperationError(path, "data_file_raw cannot be set on existing images")
        if not h.has_data_file:
            raise OperationError(path, "data_file_raw needs an image with an external data file")
    if "data_file" in o:
        name = o["data_file"]
        if len(name.encode()) > 1023:
            raise OperationError(path, "data_file name too long (maximum 1023 bytes)")
    if "refcount_bits" in o and bits != h.refcount_bits:
        _refcount_plan(img, bits)  # refuses when a refcount does not fit


# ------------------------------------------------------------------ steps
def _upgrade(path: str, o: dict, progress) -> None:
    from ..image import QcowImage

    with QcowImage(path, "r+") as img:
        img.flush()
        h = img.header
        img.switch_header(h.replace(
            version=3, incompatible_features=0, compatible_features=0, autoclear_features=0,
            refcount_order=4, header_length=spec.V3_MIN_HEADER_LENGTH + 8, compression_type=0,
            extra_fields=bytes(8),
        ))


def _set_lazy(path: str, on: bool) -> None:
    from ..image import QcowImage

    with QcowImage(path, "r+") as img:
        img.flush()
        h = img.header
        feats = h.compatible_features
        # ~ on the flag would stay inside the bits the class defines (LAZY_REFCOUNTS
        # alone: ~ is 0) and clear every other compatible bit; qemu keeps those
        lazy = int(spec.Compat.LAZY_REFCOUNTS)
        feats = feats | lazy if on else feats & ~lazy
        if feats != h.compatible_features:
            img.switch_header(h.replace(compatible_features=feats))


def _data_file(path: str, o: dict, progress) -> None:
    from ..header import with_extension
    from ..image import QcowImage

    with QcowImage(path, "r+", data_file=o.get("data_file")) as img:
        img.flush()
        h = img.header
        if "data_file" in o:
            h = with_extension(h, spec.ExtType.DATA_FILE, o["data_file"].encode())
        if o.get("data_file_raw") is False:
            h = h.replace(autoclear_features=h.autoclear_features & ~spec.Autoclear.DATA_FILE_RAW)
        if h != img.header:
            img.switch_header(h)


def _size(path: str, o: dict, progress) -> None:
    from .resize import resize

    resize(path, o["size"])


def _refcount_plan(img, bits: int):
    """A checker holding the true refcounts of ``img``; refuses if one exceeds ``bits``."""
    from ..repair import Repairer

    messages: list[str] = []
    ch = Repairer(img, messages.append)
    ch.calculate(0)
    if ch.res.corruptions or ch.res.check_errors:
        raise OperationError(img.path, "the image has errors; repair it first "
                                       "('pyqcow check -r all')")
    limit = entries.refcount_max((bits).bit_length() - 1)
    for cluster, count in enumerate(ch.imrt):
        if count > limit:
            raise OperationError(
                img.path, f"cannot decrease refcount entry width to {bits} bits: cluster at "
                          f"offset {cluster << img.cluster_bits:#x} has a refcount of {count}"
            )
    return ch


def _refcount_bits(path: str, bits: int, progress) -> None:
    from ..image import QcowImage

    order = bits.bit_length() - 1
    with QcowImage(path, "r+") as img:
        if img.header.refcount_order == order:
            return
        img.flush()
        ch = _refcount_plan(img, bits)
        old_table = (ch.reftable_offset, img.header.refcount_table_clusters)
        old_blocks = [b for b in map(entries.reftable_block_offset, ch.reftable) if b]
        # new width: new blocks and table go where nothing is (the old ones stay counted)
        ch.order = order
        ch.refcount_max = entries.refcount_max(order)
        ch.block_bits = ch.cb + 3 - order
        ch.block_entries = 1 << ch.block_bits
        # writes blocks + table, fsync, then the header switch (one write, new width)
        ch.rebuild(refcount_order=order)
        img.refcounts = None  # the writer's view is stale: no flush through it
        if progress:
            progress(1, 2)
    # the old structures are unreferenced now: free them through the new refcounts
    with QcowImage(path, "r+") as img:
        rc = img.refcounts
        off, n = old_table
        rc.free_later(off, n)
        for b in old_blocks:
            rc.free_later(b)
        img.writer.write_started = True
        rc.apply_pending_frees()
        if rc.write_blocks():
            img.hf.fsync()
    if progress:
        progress(2, 2)


def _downgrade(path: str, o: dict, progress) -> None:
    from ..chain import open_image

    with open_image(path, "r+", format="qcow2") as img:
        img.flush()
        _expand_zero_clusters(img, progress)
        img.flush()
        h = img.header
        img.switch_header(h.replace(
            version=2, incompatible_features=0, compatible_features=0, autoclear_features=0,
            refcount_order=4, header_length=spec.V2_HEADER_LENGTH, compression_type=0,
            extra_fields=b"",
        ))


def _expand_zero_clusters(img, progress) -> None:
    """Replace every zero-flag L2 entry of the active L1 with something v2 reads as zeros."""
    cs = img.cluster_size
    has_backing = img.backing is not None
    total = len(img.l1)
    zeros = bytes(cs)
    for l1_index in range(total):
        l2_off = entries.l1_l2_offset(img.l1[l1_index])
        if not l2_off:
            continue
        table = img.l2_table(l2_off)
        if not any(map(entries.has_zero_flag, table)):
            continue
        img.writer.begin_write()
        table, l2_off = img.writer.l2_for_write(l1_index * img.l2_entries)
        for i, e in enumerate(table):
            if not entries.has_zero_flag(e) or entries.is_compressed(e):
                continue
            host = entries.l2_host_offset(e)
            if host:
                img.hf.pwrite(zeros, host)  # the cluster's bytes must now be the zeros
                table[i] = entries.with_copied(host, entries.is_copied(e))
            elif has_backing:
                host = img.refcounts.alloc(1)
                img.writer.note_alloc()
                img.hf.pwrite(zeros, host)
                table[i] = entries.with_copied(host, True)
            else:
                table[i] = 0
        img.l2_cache.mark_dirty(l2_off)
        img.writer.data_written = True
        img.writer.flush_if_needed()  # a safe point: this table's data is written
        if progress:
            progress(l1_index + 1, total)
