"""qemu-img / qemu-io as test oracles: thin subprocess wrappers.

Import as ``import qemu`` / ``from qemu import qemu_img`` (tests/conftest.py
puts tests/ at the front of sys.path).

Every wrapper raises :class:`QemuError` (with the command line and stderr) when
the tool fails, so a broken oracle never looks like a passing test.  A missing
binary goes through :func:`require_tool`: ``pytest.fail`` when ``CI`` is set in
the environment, ``pytest.skip`` otherwise.

Defaults open images the normal way (qemu takes its image locks).  Pass
``share=True`` to add ``-U`` (force-share) where qemu supports it; for qemu-io
that also implies ``-r`` (qemu refuses force-share on a read-write open).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "QemuError",
    "bitmap_add",
    "check_json",
    "compare",
    "convert_raw",
    "create",
    "header_bytes",
    "incompatible_features",
    "info_json",
    "map_json",
    "qemu_img",
    "qemu_img_json",
    "qemu_io",
    "require_tool",
    "snapshot_create",
]

PathLike = str | os.PathLike[str]

# Lines qemu-io prints when a command did not do what was asked.  qemu-io 7.2
# exits 1 when any command fails, but keeps running the remaining commands;
# we check both the exit status and the text.
_QEMU_IO_FAILURE = re.compile(
    r"(failed|error|not found|Pattern verification|Invalid|Usage:|cannot|can't)",
    re.IGNORECASE,
)

_TIMEOUT = 120


def _no_core_dumps() -> None:
    # qemu-io's `abort` command raises SIGABRT; keep core files out of the tree.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class QemuError(RuntimeError):
    """A qemu-img/qemu-io invocation failed (message has argv, rc and stderr)."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        cmd = " ".join(_quote(a) for a in argv)
        detail = stderr.strip() or stdout.strip() or "(no output)"
        super().__init__(f"{cmd}\n  exit status {returncode}\n  {detail}")


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else repr(arg)


def need(cond: bool, msg: str) -> None:
    """A test's precondition (a tool, root, a device): when ``cond`` is false, fail
    under CI (everything the tests need is installed there) and skip elsewhere."""
    if not cond:
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def require_tool(name: str) -> str:
    """Return the path of executable *name*; fail (CI) or skip (elsewhere) if missing."""
    path = shutil.which(name)
    need(path is not None, f"required tool {name!r} is not on PATH (tools/_setup.sh installs it)")
    return path


def _run(
    argv: Sequence[str], *, cwd: PathLike | None = None, ok: Iterable[int] = (0,)
) -> subprocess.CompletedProcess[str]:
    exe = require_tool(argv[0])
    argv = [exe, *map(os.fspath, argv[1:])]
    env = dict(os.environ, LC_ALL="C")
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        check=False,
        preexec_fn=_no_core_dumps,
    )
    if proc.returncode not in tuple(ok):
        raise QemuError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


# --- qemu-img ---------------------------------------------------------------


def qemu_img(*args: PathLike, cwd: PathLike | None = None) -> str:
    """Run ``qemu-img ARGS...``; return stdout, raise QemuError on non-zero exit."""
    return _run(["qemu-img", *map(os.fspath, args)], cwd=cwd).stdout


def qemu_img_json(*args: PathLike, cwd: PathLike | None = None) -> Any:
    """Run ``qemu-img ARGS...`` (which must include ``--output=json``) and parse stdout."""
    out = qemu_img(*args, cwd=cwd)
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:
        raise QemuError(["qemu-img", *map(os.fspath, args)], 0, out, f"bad JSON: {exc}") from exc


def _fmt_args(fmt: str | None) -> list[str]:
    return ["-f", fmt] if fmt else []


def _share(share: bool) -> list[str]:
    return ["-U"] if share else []


def info_json(
    path: PathLike, backing_chain: bool = False, *, fmt: str | None = None, share: bool = False
) -> Any:
    """``qemu-img info --output=json [--backing-chain]``: a dict, or a list with the chain."""
    args: list[PathLike] = ["info", "--output=json", *_share(share), *_fmt_args(fmt)]
    if backing_chain:
        args.append("--backing-chain")
    return qemu_img_json(*args, path)


def map_json(
    path: PathLike,
    *,
    fmt: str | None = None,
    start_offset: int | None = None,
    max_length: int | None = None,
    share: bool = False,
) -> list[dict[str, Any]]:
    """``qemu-img map --output=json``: the list of extents."""
    args: list[PathLike] = ["map", "--output=json", *_share(share), *_fmt_args(fmt)]
    if start_offset is not None:
        args += ["--start-offset", str(start_offset)]
    if max_length is not None:
        args += ["--max-length", str(max_length)]
    return qemu_img_json(*args, path)


def check_json(
    path: PathLike, *, repair: str | None = None, fmt: str | None = None, share: bool = False
) -> tuple[dict[str, Any], int]:
    """``qemu-img check --output=json [-r leaks|all]`` -> (parsed JSON, exit status).

    qemu-img check exits 0 clean, 2 corruptions, 3 leaks only: those are returned.
    Exit 1 (check could not complete) and anything else raise QemuError.
    """
    args = ["qemu-img", "check", "--output=json", *_share(share), *_fmt_args(fmt)]
    if repair:
        args += ["-r", repair]
    proc = _run([*args, os.fspath(path)], ok=(0, 2, 3))
    try:
        return json.loads(proc.stdout), proc.returncode
    except json.JSONDecodeError as exc:
        raise QemuError(args, proc.returncode, proc.stdout, proc.stderr or str(exc)) from exc


def convert_raw(
    src: PathLike,
    dst: PathLike,
    snapshot: str | None = None,
    *,
    fmt: str | None = None,
    share: bool = False,
) -> Path:
    """``qemu-img convert -O raw [-l SNAPSHOT] SRC DST``; returns Path(dst).

    *snapshot* is passed to ``-l`` verbatim: a name/id, or
    ``snapshot.id=ID`` / ``snapshot.name=NAME``.
    """
    args: list[PathLike] = ["convert", *_share(share), *_fmt_args(fmt), "-O", "raw"]
    if snapshot is not None:
        args += ["-l", snapshot]
    qemu_img(*args, src, dst)
    return Path(dst)


def compare(
    a: PathLike,
    b: PathLike,
    strict: bool = False,
    *,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    share: bool = False,
) -> int:
    """``qemu-img compare [-s] A B`` -> 0 identical, 1 different; raises on error (2+)."""
    args = ["qemu-img", "compare", *_share(share)]
    if strict:
        args.append("-s")
    if fmt_a:
        args += ["-f", fmt_a]
    if fmt_b:
        args += ["-F", fmt_b]
    return _run([*args, os.fspath(a), os.fspath(b)], ok=(0, 1)).returncode


def _size_arg(size: int | str) -> str:
    return str(size)


def create(
    path: PathLike,
    size: int | str | None,
    *opts: str,
    fmt: str = "qcow2",
    backing: PathLike | None = None,
    backing_fmt: str | None = None,
    unsafe: bool = False,
    cwd: PathLike | None = None,
) -> Path:
    """``qemu-img create -f FMT [-b BACKING -F FMT] [-u] [-o OPTS] PATH [SIZE]``.

    *opts* are ``key=value`` strings, joined into one ``-o`` (a comma inside a
    value must already be doubled, as qemu expects).  *size* may be None when a
    backing file gives it.  *backing* is stored exactly as given (relative names
    are resolved by qemu against the new image's directory).  Returns the path
    (joined with *cwd* when relative).
    """
    args: list[PathLike] = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", backing]
        if backing_fmt is None and not unsafe:
            raise ValueError("qemu-img >= 6.1 needs backing_fmt (-F) with a backing file")
        if backing_fmt is not None:
            args += ["-F", backing_fmt]
    if unsafe:
        args.append("-u")
    if opts:
        args += ["-o", ",".join(opts)]
    args.append(path)
    if size is not None:
        args.append(_size_arg(size))
    qemu_img(*args, cwd=cwd)
    p = Path(path)
    return p if cwd is None or p.is_absolute() else Path(cwd) / p


def snapshot_create(path: PathLike, name: str) -> None:
    """``qemu-img snapshot -c NAME PATH`` (internal snapshot)."""
    qemu_img("snapshot", "-c", name, path)


def bitmap_add(path: PathLike, name: str, *, granularity: int | None = None) -> None:
    """``qemu-img bitmap --add [-g N] PATH NAME`` (persistent dirty bitmap)."""
    args: list[PathLike] = ["bitmap", "--add"]
    if granularity is not None:
        args += ["-g", str(granularity)]
    qemu_img(*args, path, name)


# --- qemu-io ----------------------------------------------------------------


def _qemu_io_sessions(cmds: Sequence[str]) -> list[list[str]]:
    """``cmds`` cut before each compressed write that follows a compressed write
    and then another command in the same session (see qemu_io)."""
    sessions: list[list[str]] = [[]]
    compressed = other_since = False
    for cmd in cmds:
        if _is_compressed_write(cmd):
            if compressed and other_since:
                sessions.append([])
            compressed, other_since = True, False
        elif compressed:
            other_since = True
        sessions[-1].append(cmd)
    return sessions


def _is_compressed_write(cmd: str) -> bool:
    """``write -c ...`` (options may come in any order before the offset)."""
    words = cmd.split()
    return bool(words) and words[0] in ("write", "aio_write") and any(
        w.startswith("-") and not w.startswith("--") and "c" in w[1:] and w[1:].isalpha()
        for w in words[1:])


def qemu_io(
    path: PathLike,
    *cmds: str,
    fmt: str | None = "qcow2",
    extra: Sequence[str] = (),
    share: bool = False,
    read_only: bool = False,
    cwd: PathLike | None = None,
    allow_failure: bool = False,
    one_session: bool = False,
) -> str:
    """``qemu-io [-f FMT] [-r] [-U] EXTRA... -c CMD... PATH`` -> stdout.

    Each *cmd* is one qemu-io command line (``"write -P 0xab 0 64k"``).  Raises
    QemuError if qemu-io exits non-zero or prints a failure line (it keeps going
    after a failed command).  ``allow_failure=True`` returns the output anyway
    (for ``abort`` and deliberate failures).

    A compressed write (``write -c``) that follows, in the script, a compressed
    write and then another command starts a new qemu-io process: in one session
    QEMU 7.2 packs it into the host cluster of the earlier compressed data, which
    the commands between may have freed and reused for plain data, and the image
    is then not what the script says (pyqcow.testing.guestops.qemu_io_sessions;
    seen in test_read_props and test_chain_props under CI).  Compressed writes
    in a row stay in one process, packed as before.  ``one_session=True`` keeps
    the script in one process (to show QEMU's behaviour itself).
    """
    if not one_session and not allow_failure and len(cmds) > 1:
        sessions = _qemu_io_sessions(cmds)
        if len(sessions) > 1:
            return "".join(qemu_io(path, *session, fmt=fmt, extra=extra, share=share,
                                   read_only=read_only, cwd=cwd, one_session=True)
                           for session in sessions)
    argv: list[str] = ["qemu-io"]
    if fmt:
        argv += ["-f", fmt]
    if read_only or share:
        argv.append("-r")
    if share:
        argv.append("-U")
    argv += list(extra)
    for cmd in cmds:
        argv += ["-c", cmd]
    argv.append(os.fspath(path))
    if allow_failure:
        proc = _run(argv, cwd=cwd, ok=range(-256, 256))
        return proc.stdout + proc.stderr
    proc = _run(argv, cwd=cwd)
    bad = [
        line
        for line in (proc.stdout + "\n" + proc.stderr).splitlines()
        if _QEMU_IO_FAILURE.search(line)
    ]
    if bad:
        raise QemuError(argv, proc.returncode, proc.stdout, "\n".join(bad))
    return proc.stdout


# --- raw header peeks (for states qemu-img will not report) -----------------


def header_bytes(path: PathLike, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of the file, e.g. header_bytes(p, 72, 8)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def incompatible_features(path: PathLike) -> int:
    """The v3 header's incompatible_features field (bytes 72..79, big-endian)."""
    return int.from_bytes(header_bytes(path, 72, 8), "big")


def create_luks(path: PathLike, size: str = "1M") -> Path:
    """A LUKS-encrypted qcow2 (secret "123456").

    qemu times its PBKDF to pick an iteration count; on a busy machine a short
    measurement fails ("Unable to get accurate CPU usage"), so each retry
    measures for longer.
    """
    for iter_time in (10, 50, 200, 500, 1000):
        try:
            qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
                     "-o", f"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time={iter_time}",
                     path, size)
            break
        except QemuError:
            if iter_time == 1000:
                raise
    return Path(path)
