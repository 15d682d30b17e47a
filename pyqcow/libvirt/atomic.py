"""Replacing a file atomically: a temporary file next to it (``open_temp``),
written, fsynced, given the original's mode and owner, renamed over it, and
the directory fsynced (``write_atomic``)."""

from __future__ import annotations

import errno
import os
import secrets
import stat

#: temporary files next to the target: ".<name>.<8 random hex digits>.tmp"
_TEMP_ATTEMPTS = 100


def open_temp(target: str, mode: int = 0o666) -> tuple[int, str]:
    """Create and open (write-only) a new temporary file next to ``target``.

    Named ``.<target name>.<random>.tmp`` in ``target``'s directory, created
    with ``O_EXCL | O_NOFOLLOW`` and ``mode`` (the kernel applies the umask; the
    process-wide umask is never read or changed, which would not be
    thread-safe).  Returns (fd, path).  ``OSError`` passes through.
    """
    directory = os.path.dirname(target) or "."
    prefix = f".{os.path.basename(target)}."
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(_TEMP_ATTEMPTS):
        tmp = os.path.join(directory, f"{prefix}{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no usable temporary file name", os.path.join(directory, prefix))


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically.

    A temporary file in the same directory is written, fsynced, given the
    original file's mode (and owner and group when running as root; the group
    otherwise, when allowed), renamed over the target (a symlink is followed:
    the file it points to is replaced) and the directory fsynced.  On failure
    the temporary file is removed and the target is untouched.  ``OSError``
    passes through.
    """
    target = os.path.realpath(os.fspath(path))
    directory = os.path.dirname(target) or "."
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    # a new file gets 0666 minus the umask from the kernel, as open(2) would give
    # it; an existing file's mode is set with fchmod below (0600 until then)
    fd, tmp = open_temp(target, 0o666 if st is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if st is not None:
                if os.geteuid() == 0:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                elif st.st_gid != os.getegid():
                    try:
                        os.fchown(f.fileno(), -1, st.st_gid)
                    except PermissionError:
                        pass
                os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
