"""New qcow2 images: ``create`` (qemu-img create), its option parsing and checks,
and ``OutputFile``, the locked output a create or convert writes.

``pyqcow.create(path, size, **options)`` is :func:`create`."""

from __future__ import annotations

import errno
import os

from . import entries, layout, spec
from .chain import dependents, header_chain, identity, probe_format, resolve_backing
from .errors import OperationError, QcowError
from .header import Extension, Header
from .hostfile import LOCK_WRITE, HostFile, fsync_dir
from .metadata import first_metadata, write_new_image

# QEMU's feature name table (written into every v3 image)
FEATURE_TABLE = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]


def _feature_table() -> bytes:
    return layout.build(
        layout.FeatureNameTable,
        [{"type": t, "bit": b, "name": n} for t, b, n in FEATURE_TABLE],
    )


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


#: errno values of a write that found no room (named after the output, not the source)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})

COMPAT_VALUES = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
REFCOUNT_BITS = (1, 2, 4, 8, 16, 32, 64)
COMPRESSION_TYPES = ("zlib", "zstd")
PREALLOCATION_MODES = ("off", "metadata")


class OutputFile:
    """The file a create or convert writes, locked before its first byte changes.

    A new file is created (``O_EXCL``); an existing one is opened as it is, not
    truncated.  Either way QEMU's write lock (``LOCK_WRITE``) is taken at once, so
    a file a VM, qemu-nbd or qemu-io holds is refused before anything changes, and
    nobody else can open it until the output is complete and this object closed.

    Used as a context manager: if the body fails, a file this object created is
    removed again (a pre-existing file is never removed), and an out-of-space
    ``OSError`` that names no file is given the output's name.  ``all_errors``
    names every file-less ``OSError`` (create touches nothing else while writing).
    """

    def __init__(self, path: str | os.PathLike, *, all_errors: bool = False) -> None:
        self.path = os.fspath(path)
        self.created = False
        self.all_errors = all_errors
        self.hf: HostFile | None = None
        if os.path.isdir(self.path):
            raise QcowError(self.path, "is a directory")
        # a dangling symlink: create its target (as qemu-img does), and remember that
        # the target, not the link, is what we created
        self._new_path = os.path.realpath(self.path) if os.path.islink(self.path) else self.path
        fd = None
        try:
            fd = os.open(self._new_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            self.created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise QcowError(self.path, f"cannot create: {e.strerror}") from e
        try:
            self.hf = HostFile(self.path, writable=True)
            if fd is not None:
                a, b = os.fstat(fd), os.fstat(self.hf.fd)
                if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                    raise OperationError(self.path, "was replaced while it was being created")
            self.hf.lock(LOCK_WRITE)
        except BaseException:
            if self.hf is not None:
                self.hf.close()
            self._remove_if_created(fd)
            raise
        finally:
            if fd is not None:
                os.close(fd)

    @property
    def fd(self) -> int:
        assert self.hf is not None
        return self.hf.fd

    def _remove_if_created(self, fd: int | None = None) -> bool:
        """Unlink the file if this object created it and it is still the same file."""
        if not self.created:
            return False
        ours = os.fstat(fd) if fd is not None else None
        if ours is None and self.hf is not None and self.hf.fd >= 0:
            ours = os.fstat(self.hf.fd)
        try:
            if ours is not None:
                st = os.stat(self._new_path)
                if (st.st_dev, st.st_ino) != (ours.st_dev, ours.st_ino):
                    return False
            os.unlink(self._new_path)
            fsync_dir(self._new_path)
        except OSError:
            return False
        self.created = False
        return True

    def close(self) -> None:
        if self.hf is not None:
            self.hf.close()

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        removed = self._remove_if_created()
        self.close()
        if (
            isinstance(exc, OSError)
            and exc.filename is None
            and (self.all_errors or exc.errno in WRITE_ERRNOS)
        ):
            what = exc.strerror or str(exc)
            if removed:
                what += " (the incomplete output was removed)"
            elif self.hf is not None and self.hf.writable:
                what += " (the output is incomplete)"
            raise OSError(exc.errno, what, self.path) from exc


def _invalid(path: str, option: str, value, why: str) -> OperationError:
    return OperationError(path, f"invalid value {value!r} for option {option}: {why}")


def _check_options(
    path: str, *, compat, cluster_size, refcount_bits, compression_type, preallocation,
    lazy_refcounts, extended_l2,
) -> int:
    """Validate the creation options (messages name the option); returns the version."""
    version = COMPAT_VALUES.get(str(compat))
    if version is None:
        raise _invalid(path, "compat", compat, "use 0.10 (v2) or 1.1 (v3)")
    if (
        not isinstance(cluster_size, int)
        or not _is_pow2(cluster_size)
        or not 512 <= cluster_size <= 2 * 1024 * 1024
    ):
        raise _invalid(path, "cluster_size", cluster_size,
                       "must be a power of two between 512 bytes and 2 MiB")
    if refcount_bits not in REFCOUNT_BITS or isinstance(refcount_bits, bool):
        raise _invalid(path, "refcount_bits", refcount_bits,
                       "must be a power of two between 1 and 64")
    if compression_type not in COMPRESSION_TYPES:
        raise _invalid(path, "compression_type", compression_type, "use zlib or zstd")
    if preallocation not in PREALLOCATION_MODES:
        raise _invalid(path, "preallocation", preallocation,
                       "supported: " + ", ".join(PREALLOCATION_MODES))
    if version == 2:
        for bad, name in (
            (lazy_refcounts, "lazy_refcounts"),
            (extended_l2, "extended_l2"),
            (compression_type != "zlib", "compression_type=zstd"),
            (refcount_bits != 16, "refcount_bits other than 16"),
        ):
            if bad:
                raise OperationError(path, f"{name} requires compat=1.1")
    if extended_l2 and cluster_size < 16384:
        raise OperationError(path, "extended_l2 requires a cluster size of at least 16 KiB")
    return version


def chain_files(path: str, fmt: str | None = None) -> list[str]:
    """Every file of the backing chain that starts at ``path``: images and data files
    (headers only; see :func:`pyqcow.chain.header_chain`)."""
    return header_chain(path, fmt, data_files=True)


def _refuse_chain_member(path: str, backing: str, bpath: str) -> None:
    """Never create over a file of the chain the new image is backed onto."""
    own = identity(path)
    if own is None:
        return
    for member in chain_files(bpath):
        if identity(member) == own:
            if identity(bpath) == own:
                raise OperationError(path, "an image cannot be its own backing file")
            raise OperationError(
                path,
                f"is part of the backing chain of {backing!r} ({member}); creating it would "
                "destroy that chain's data and make the chain loop",
            )


def refuse_backing_loop(path: str | os.PathLike, backing: str) -> str:
    """Creating ``path`` over ``backing`` must not overwrite a file of that backing's
    chain (itself included); returns the backing file's path."""
    path = os.fspath(path)
    bpath = resolve_backing(path, backing)
    _refuse_chain_member(path, backing, bpath)
    return bpath


def _holds_data(path: str) -> str | None:
    """What creating over the existing qcow2 file ``path`` would lose, or None."""
    from .chain import probe_format as probe
    from .image import QcowImage

    try:
        if probe(path) != "qcow2":
            return None
    except QcowError:
        return None
    try:
        img = QcowImage(path, "r", force_share=True)  # the caller holds the write lock
    except QcowError as e:
        return f"cannot tell whether it holds data ({e.message})"
    try:
        lost = []
        nb = img.header.nb_snapshots
        if nb:
            lost.append(f"{nb} internal snapshot(s)")
        step = 1 << 30
        for start in range(0, img.virtual_size, step):
            if any(r.allocated for r in img.runs(start, min(step, img.virtual_size - start))):
                lost.insert(0, "data (allocated clusters)")
                break
        return " and ".join(lost) or None
    except QcowError as e:
        return f"cannot tell whether it holds data ({e.message})"
    finally:
        img.close()


def _refuse_overwrite(path: str) -> None:
    """An existing image that holds data, or that other images are backed by, is kept."""
    lost = _holds_data(path)
    if lost is not None:
        what = f"exists; {lost}" if lost.startswith("cannot") else f"exists and holds {lost}"
        raise OperationError(
            path, what + "; creating over it would lose them (use --force / force=True "
            "to overwrite)",
        )
    deps = dependents(path)
    if deps:
        raise OperationError(
            path,
            f"is the backing file of {', '.join(deps)}; creating over it would corrupt "
            f"{'them' if len(deps) > 1 else 'it'} (use --force / force=True to overwrite)",
        )


def round_size(size: int) -> int:
    """qemu-img rounds a new image's size up to whole 512-byte sectors."""
    return -(-size // 512) * 512


def _check_backing(
    path: str, backing: str, backing_format: str | None, unsafe: bool, size: int | None
) -> tuple[str | None, str | None, int | None]:
    """Validate the backing file; -> (backing format, probed format or None, size:
    the backing file's virtual size when ``size`` is None)."""
    if len(backing.encode()) > spec.MAX_BACKING_FILE_NAME:
        raise OperationError(
            path,
            f"backing file name too long ({len(backing.encode())} bytes; "
            f"the maximum is {spec.MAX_BACKING_FILE_NAME})",
        )
    bpath = refuse_backing_loop(path, backing)
    if backing_format not in (None, "qcow2", "raw"):
        raise OperationError(path, f"unsupported backing format {backing_format!r}")
    probed = None
    if not unsafe or size is None:
        if not os.path.exists(bpath):
            raise QcowError(path, f"backing file {backing!r} not found ({bpath})")
        actual = probe_format(bpath)
        if backing_format is None:
            backing_format = probed = actual
        elif backing_format != actual and not unsafe:
            raise OperationError(
                path, f"backing file {backing!r} is {actual}, not {backing_format}"
            )
    if size is None:
        from .chain import open_image

        with open_image(bpath, format=backing_format, force_share=True) as b:
            size = b.virtual_size
    return backing_format, probed, size


def _check_size(path: str, size, overwrite: bool) -> int:
    """The validated, rounded size; refuses a directory and (``overwrite`` False) any
    existing file at ``path``."""
    if size is None:
        raise OperationError(path, "image size required (no backing file to take it from)")
    if not isinstance(size, int) or size < 0:
        raise OperationError(path, f"invalid size {size!r}")
    size = round_size(size)
    if size > spec.MAX_VIRTUAL_SIZE:
        raise OperationError(path, f"invalid size {size}: larger than 2^61 bytes")
    if os.path.isdir(path):
        raise QcowError(path, "is a directory")
    if not overwrite and os.path.lexists(path):
        raise OperationError(path, "file exists")
    return size


def _new_header(
    *, version: int, cluster_size: int, backing: str | None, backing_format: str | None,
    lazy_refcounts: bool, extended_l2: bool, compression_type: str, refcount_bits: int,
) -> Header:
    """The header of an empty image: refcount table in cluster 1, no L1 yet."""
    incompat = 0
    if extended_l2:
        incompat |= spec.Incompat.EXTL2
    ctype = 1 if compression_type == "zstd" else 0
    if ctype:
        incompat |= spec.Incompat.COMPRESSION
    exts = []
    if backing_format is not None and backing is not None:
        exts.append(Extension(spec.ExtType.BACKING_FORMAT, backing_format.encode()))
    if version == 3:
        exts.append(Extension(spec.ExtType.FEATURE_TABLE, _feature_table()))
    return Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_size.bit_length() - 1,
        size=0,
        crypt_method=0,
        l1_size=0,
        l1_table_offset=0,
        refcount_table_offset=cluster_size,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        incompatible_features=incompat,
        compatible_features=spec.Compat.LAZY_REFCOUNTS if lazy_refcounts else 0,
        autoclear_features=0,
        refcount_order=refcount_bits.bit_length() - 1,
        header_length=spec.V3_HEADER_LENGTH if version == 3 else spec.V2_HEADER_LENGTH,
        compression_type=ctype,
        extra_fields=bytes([ctype]) + bytes(7) if version == 3 else b"",
        extensions=tuple(exts),
        backing_file=backing,
    )


def _dry_run(path: str, force: bool) -> None:
    """Every check the real run makes on an existing ``path`` (its lock included)."""
    if os.path.exists(path):
        with HostFile(path, writable=True) as hf:
            hf.lock(LOCK_WRITE)
            if not force:
                _refuse_overwrite(path)


def _write(
    path: str, out: OutputFile, metadata: tuple[bytes, bytes, bytes], cluster_size: int,
    size: int, preallocation: str, force: bool,
) -> None:
    """Lay the new image down in ``out`` (locked), then size it."""
    if not force and not out.created:
        _refuse_overwrite(path)
    write_new_image(out.hf, cluster_size, *metadata)
    fsync_dir(path)
    from .image import QcowImage

    # we hold QEMU's write lock through ``out``: this second open must not ask again
    img = QcowImage(path, "r+", force_share=True)
    try:
        img.resize(size)
        if preallocation == "metadata":
            _preallocate_metadata(img)
        img.flush()
    finally:
        img.close()


def create(
    path: str | os.PathLike,
    size: int | None = None,
    *,
    backing: str | None = None,
    backing_format: str | None = None,
    cluster_size: int = 65536,
    compat: str = "1.1",
    lazy_refcounts: bool = False,
    extended_l2: bool = False,
    compression_type: str = "zlib",
    refcount_bits: int = 16,
    preallocation: str = "off",
    unsafe: bool = False,
    overwrite: bool = True,
    force: bool = False,
    dry_run: bool = False,
    _output: OutputFile | None = None,
) -> str | None:
    """Create a qcow2 image.  Returns the probed backing format if it had to probe.

    ``size`` defaults to the backing file's virtual size and is rounded up to a
    multiple of 512 bytes, as qemu-img does.  The backing name is stored as given
    (relative names stay relative to the new image's directory).

    Everything is checked before the first byte changes: the options, the
    backing file, that ``path`` is no file of the backing chain, and QEMU's lock
    on ``path`` (taken before any truncation and held until the image is
    complete).  An existing qcow2 image that holds data (allocated clusters,
    internal snapshots) or that other images in its directory are backed by is
    refused unless ``force``; an empty one is replaced, as qemu-img does.
    ``dry_run`` makes every check (lock included) and writes nothing.
    If writing fails, a file this call created is removed again.
    """
    path = os.fspath(path)
    probed = None
    version = _check_options(
        path, compat=compat, cluster_size=cluster_size, refcount_bits=refcount_bits,
        compression_type=compression_type, preallocation=preallocation,
        lazy_refcounts=lazy_refcounts, extended_l2=extended_l2,
    )
    if backing is not None and backing == "":
        backing = None
    if backing is not None:
        backing_format, probed, size = _check_backing(
            path, backing, backing_format, unsafe, size
        )
    size = _check_size(path, size, overwrite)
    hdr = _new_header(
        version=version, cluster_size=cluster_size, backing=backing,
        backing_format=backing_format, lazy_refcounts=lazy_refcounts, extended_l2=extended_l2,
        compression_type=compression_type, refcount_bits=refcount_bits,
    )
    metadata = first_metadata(path, hdr)
    if dry_run:
        _dry_run(path, force)
        return probed
    out = _output if _output is not None else OutputFile(path, all_errors=True)
    owned = out
    if _output is not None:  # the caller's output: the caller closes it
        import contextlib  # (start-up time: only then is it needed)

        owned = contextlib.nullcontext()
    with owned:
        _write(path, out, metadata, cluster_size, size, preallocation, force)
    return probed


def _preallocate_metadata(img) -> None:
    """Allocate L2 tables and data clusters for the whole disk (contents stay zero)."""
    cb = img.cluster_bits
    nb = (img.virtual_size + img.cluster_size - 1) >> cb
    for cluster in range(nb):
        table, l2_off = img.writer.l2_for_write(cluster)
        i = cluster & (img.l2_entries - 1)
        entry = entries.with_copied(img.refcounts.alloc(1), True)
        if img.extended_l2:
            table[2 * i] = entry
            table[2 * i + 1] = 0xFFFFFFFF  # all subclusters allocated
        else:
            table[i] = entry
        img.l2_cache.mark_dirty(l2_off)
    img.writer.note_alloc()
    end = img.refcounts.end_cluster << cb
    if img.hf.size() < end:
        img.hf.truncate(end)


def parse_options(path: str, opts: str) -> dict:
    """-o key=val,key=val -> keyword arguments of create().

    Every value is checked here, so a bad one is reported with the option's name
    and the text given (never as a Python error from deeper down).
    """
    out: dict = {}
    if not opts:
        return out
    from .units import parse_size

    for item in opts.split(","):
        if not item:
            continue
        key, _, val = item.partition("=")
        key = key.strip()
        if key == "cluster_size":
            try:
                n = parse_size(val, what="cluster_size")
            except ValueError:
                raise _invalid(path, key, val, "expected a size such as 64k") from None
            if not _is_pow2(n) or not 512 <= n <= 2 * 1024 * 1024:
                raise _invalid(path, key, val,
                               "must be a power of two between 512 bytes and 2 MiB")
            out["cluster_size"] = n
        elif key == "compat":
            if val not in COMPAT_VALUES:
                raise _invalid(path, key, val, "use 0.10 (v2) or 1.1 (v3)")
            out["compat"] = val
        elif key in ("lazy_refcounts", "extended_l2"):
            if val not in ("on", "off", "true", "false", ""):
                raise _invalid(path, key, val, "use on or off")
            out[key] = val in ("on", "true", "")
        elif key == "compression_type":
            if val not in COMPRESSION_TYPES:
                raise _invalid(path, key, val, "use zlib or zstd")
            out["compression_type"] = val
        elif key == "refcount_bits":
            try:
                n = int(val, 10)
            except ValueError:
                n = None
            if n not in REFCOUNT_BITS:
                raise _invalid(path, key, val, "must be a power of two between 1 and 64")
            out["refcount_bits"] = n
        elif key == "preallocation":
            if val not in PREALLOCATION_MODES:
                raise _invalid(path, key, val, "supported: " + ", ".join(PREALLOCATION_MODES))
            out["preallocation"] = val
        elif key == "backing_file":
            out["backing"] = val
        elif key == "backing_fmt":
            if val not in ("qcow2", "raw"):
                raise _invalid(path, key, val, "use qcow2 or raw")
            out["backing_format"] = val
        else:
            raise OperationError(path, f"unknown or unsupported option {key!r}")
    return out

