"""Crash and fault injection for pyqcow's write paths (used by tests/reliability).

``Injector`` wraps every place where pyqcow changes a file: HostFile.pwrite,
HostFile.truncate, HostFile.fsync, the fastcopy entry points (copy_runs,
copy_range), raw os.pwrite/os.ftruncate/os.fsync (create, convert, fsync_dir)
and os.replace/os.unlink (merge).  Each wrapped call is one *fault point*.  In a
run, the call with index ``at`` either

* ``crash``: raises SimulatedCrash (a BaseException, so no ``except Exception``
  swallows it); from then on every wrapped call raises too, so the process
  issues no more I/O, as if it had died there; or
* ``enospc`` / ``eio``: raises OSError(ENOSPC / EIO) once; later calls work
  (the error handling and cleanup paths run for real).

While a run is active the injector also keeps a journal: for every file (by
inode) the writes and truncations since its last fsync, and the renames and
unlinks since the last fsync of their directory.  ``torn(...)`` rebuilds what a
power cut at the crash point could leave on disk: every un-fsynced write dropped
(``keep=None``), or a random subset of them kept (``keep=random.Random``), and
directory changes not yet made durable undone.  This is what tests the fsync
ordering; an exception alone loses nothing from the page cache.

``verify_state`` then checks a directory the way a user would after a crash.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import stat
import subprocess
import tempfile
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pyqcow
from pyqcow import fastcopy, hostfile
from pyqcow.errors import QcowError

_real_os_pwrite = os.pwrite
_real_os_ftruncate = os.ftruncate
_real_os_fsync = os.fsync
_real_os_replace = os.replace
_real_os_unlink = os.unlink
_real_os_rename = os.rename
_real_hf_init = hostfile.HostFile.__init__
_real_hf_pwrite = hostfile.HostFile.pwrite
_real_hf_truncate = hostfile.HostFile.truncate
_real_hf_fsync = hostfile.HostFile.fsync
_real_copy_runs = fastcopy.copy_runs
_real_copy_range = fastcopy.copy_range

# power-cut variants with a random subset of un-fsynced writes kept, per crash point
TORN_RANDOM_VARIANTS = int(os.environ.get("PYQCOW_TORN_VARIANTS", "1"))

WRITE_KINDS = ("pwrite", "truncate", "copy_runs", "copy_range", "os.pwrite", "os.ftruncate")


class SimulatedCrash(BaseException):
    """The simulated process death (not an Exception: nothing may catch it)."""


# ---------------------------------------------------------------------------- statistics
class Stats:
    """Counts of injected faults per operation, fault kind and outcome."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.lock = threading.Lock()

    def add(self, op: str, kind: str, outcome: str) -> None:
        with self.lock:
            self.counts[(op, kind, outcome)] += 1

    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        by_op: dict[str, Counter] = defaultdict(Counter)
        for (op, kind, outcome), n in self.counts.items():
            by_op[op][f"{kind}:{outcome}"] += n
        lines = [f"pyqcow crash/fault injection: {self.total()} injected crashes and faults"]
        for op in sorted(by_op):
            c = by_op[op]
            lines.append(
                f"  {op}: {sum(c.values())} -- "
                + ", ".join(f"{k}={v}" for k, v in sorted(c.items()))
            )
        return "\n".join(lines)


STATS = Stats()


# ---------------------------------------------------------------------------- journal
@dataclass
class _Write:
    kind: str  # "w" or "t"
    offset: int  # write offset, or new size for "t"
    old: bytes
    new: bytes
    old_size: int
    new_size: int


@dataclass
class _DirOp:
    kind: str  # "replace" or "unlink"
    src: str
    dst: str | None
    stash_dst: str | None  # hard link to what dst (replace) or src (unlink) was


def _pread(fd: int, n: int, offset: int) -> bytes:
    """pread that also works on write-only fds (reopened through /proc)."""
    try:
        return os.pread(fd, n, offset)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(rfd, n, offset)
        finally:
            os.close(rfd)


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


@dataclass
class Injector:
    mode: str = "count"  # count | crash | enospc | eio
    at: int = -1
    journal: bool = True
    stash: str | None = None
    calls: list[str] = field(default_factory=list)
    fired: str | None = None
    dead: bool = False
    files: dict = field(default_factory=lambda: defaultdict(list))
    dirops: list = field(default_factory=list)
    open_hostfiles: list = field(default_factory=list)
    _depth: int = 0

    # -- the decision at each fault point ------------------------------------------
    def _point(self, kind: str) -> None:
        if self.dead:
            raise SimulatedCrash(f"after crash: {kind}")
        index = len(self.calls)
        self.calls.append(kind)
        if index != self.at or self.mode == "count":
            return
        self.fired = kind
        if self.mode == "crash":
            self.dead = True
            raise SimulatedCrash(f"crash at call {index} ({kind})")
        if self.mode == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if self.mode == "eio":
            raise OSError(errno.EIO, "Input/output error (injected)")

    # -- journal ---------------------------------------------------------------------
    def _note_write(self, fd: int, offset: int, new: bytes) -> None:
        if not self.journal:
            return
        size = os.fstat(fd).st_size
        old = _pread(fd, len(new), offset)
        self.files[_key(fd)].append(
            _Write("w", offset, old, bytes(new), size, max(size, offset + len(new)))
        )

    def _note_truncate(self, fd: int, new_size: int) -> None:
        if not self.journal:
            return
        size = os.fstat(fd).st_size
        tail = _pread(fd, size - new_size, new_size) if new_size < size else b""
        self.files[_key(fd)].append(_Write("t", new_size, tail, b"", size, new_size))

    def _note_fsync(self, fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            path = os.readlink(f"/proc/self/fd/{fd}")
            self.dirops = [
                d for d in self.dirops
                if os.path.dirname(os.path.abspath(d.src)) != path
                and (d.dst is None or os.path.dirname(os.path.abspath(d.dst)) != path)
            ]
        else:
            self.files.pop((st.st_dev, st.st_ino), None)

    def _stash(self, path: str) -> str | None:
        if not self.journal or self.stash is None or not os.path.exists(path):
            return None
        os.makedirs(self.stash, exist_ok=True)
        target = os.path.join(self.stash, f"{len(os.listdir(self.stash))}")
        os.link(path, target)
        return target

    # -- wrappers ------------------------------------------------------------------
    def install(self):
        inj = self

        def hf_init(self_, *a, **k):
            _real_hf_init(self_, *a, **k)
            inj.open_hostfiles.append(self_)

        def hf_pwrite(self_, data, offset):
            inj._point("pwrite")
            inj._depth += 1
            try:
                inj._note_write(self_.fd, offset, bytes(memoryview(data).cast("B")))
                return _real_hf_pwrite(self_, data, offset)
            finally:
                inj._depth -= 1

        def hf_truncate(self_, size):
            inj._point("truncate")
            inj._depth += 1
            try:
                inj._note_truncate(self_.fd, size)
                return _real_hf_truncate(self_, size)
            finally:
                inj._depth -= 1

        def hf_fsync(self_):
            inj._point("fsync")
            inj._depth += 1
            try:
                r = _real_hf_fsync(self_)
                inj._note_fsync(self_.fd)
                return r
            finally:
                inj._depth -= 1

        def os_pwrite(fd, data, offset):
            if inj._depth:
                return _real_os_pwrite(fd, data, offset)
            inj._point("os.pwrite")
            inj._note_write(fd, offset, bytes(memoryview(data).cast("B")))
            return _real_os_pwrite(fd, data, offset)

        def os_ftruncate(fd, size):
            if inj._depth:
                return _real_os_ftruncate(fd, size)
            inj._point("os.ftruncate")
            inj._note_truncate(fd, size)
            return _real_os_ftruncate(fd, size)

        def os_fsync(fd):
            if inj._depth:
                return _real_os_fsync(fd)
            inj._point("os.fsync")
            r = _real_os_fsync(fd)
            inj._note_fsync(fd if isinstance(fd, int) else fd.fileno())
            return r

        def os_replace(src, dst, *a, **k):
            inj._point("replace")
            stash = inj._stash(os.fspath(dst))
            r = _real_os_replace(src, dst, *a, **k)
            if inj.journal:
                inj.dirops.append(_DirOp("replace", os.path.abspath(src), os.path.abspath(dst), stash))
            return r

        def os_unlink(path, *a, **k):
            inj._point("unlink")
            stash = inj._stash(os.fspath(path))
            r = _real_os_unlink(path, *a, **k)
            if inj.journal:
                inj.dirops.append(_DirOp("unlink", os.path.abspath(path), None, stash))
            return r

        def copy_runs(src_fd, dst_fd, runs, **k):
            inj._point("copy_runs")
            inj._depth += 1
            try:
                before = []
                if inj.journal:
                    size = os.fstat(dst_fd).st_size
                    for _, d, n in runs:
                        before.append((d, n, _pread(dst_fd, n, d), size))
                r = _real_copy_runs(src_fd, dst_fd, runs, **k)
                if inj.journal:
                    key = _key(dst_fd)
                    for d, n, old, size in before:
                        new = _pread(dst_fd, n, d).ljust(n, b"\0")
                        inj.files[key].append(_Write("w", d, old, new, size, max(size, d + n)))
                return r
            finally:
                inj._depth -= 1

        def copy_range(src_fd, src_offset, dst_fd, dst_offset, length):
            inj._point("copy_range")
            inj._depth += 1
            try:
                if inj.journal:
                    size = os.fstat(dst_fd).st_size
                    old = _pread(dst_fd, length, dst_offset)
                r = _real_copy_range(src_fd, src_offset, dst_fd, dst_offset, length)
                if inj.journal:
                    new = _pread(dst_fd, length, dst_offset)
                    inj.files[_key(dst_fd)].append(
                        _Write("w", dst_offset, old, new, size, max(size, dst_offset + length))
                    )
                return r
            finally:
                inj._depth -= 1

        self._saved = [
            (hostfile.HostFile, "__init__", hf_init),
            (hostfile.HostFile, "pwrite", hf_pwrite),
            (hostfile.HostFile, "truncate", hf_truncate),
            (hostfile.HostFile, "fsync", hf_fsync),
            (os, "pwrite", os_pwrite),
            (os, "ftruncate", os_ftruncate),
            (os, "fsync", os_fsync),
            (os, "replace", os_replace),
            (os, "unlink", os_unlink),
            (fastcopy, "copy_runs", copy_runs),
            (fastcopy, "copy_range", copy_range),
        ]
        originals = []
        for obj, name, fn in self._saved:
            originals.append((obj, name, getattr(obj, name)))
            setattr(obj, name, fn)
        self._originals = originals
        return self

    def uninstall(self) -> None:
        for obj, name, fn in self._originals:
            setattr(obj, name, fn)
        # a crashed process has no open files any more: drop fds and their locks
        for hf in self.open_hostfiles:
            if getattr(hf, "fd", -1) >= 0:
                try:
                    os.close(hf.fd)
                except OSError:
                    pass
                hf.fd = -1
                hf._locked.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # -- power-cut reconstruction ---------------------------------------------------
    def torn(self, directory: str, keep: random.Random | None = None) -> None:
        """Turn ``directory`` into what a power cut at the crash point could leave."""
        # 1. directory entries not yet durable: undo renames/unlinks (all, or a suffix)
        pending = list(self.dirops)
        cut = 0 if keep is None else keep.randint(0, len(pending))
        for d in reversed(pending[cut:]):
            if d.kind == "replace":
                if os.path.exists(d.dst):
                    _real_os_replace(d.dst, d.src)
                if d.stash_dst is not None:
                    os.link(d.stash_dst, d.dst)
            else:
                if d.stash_dst is not None and not os.path.exists(d.src):
                    os.link(d.stash_dst, d.src)
        # 2. file contents: drop un-fsynced writes (optionally keep a random subset)
        by_inode = {}
        for root, _dirs, names in os.walk(directory):
            for n in names:
                p = os.path.join(root, n)
                st = os.lstat(p)
                by_inode[(st.st_dev, st.st_ino)] = p
        for key, writes in self.files.items():
            path = by_inode.get(key)
            if path is None or not writes:
                continue
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                for w in reversed(writes):
                    if w.kind == "w":
                        _real_os_pwrite(fd, w.old, w.offset)
                        _real_os_ftruncate(fd, w.old_size)
                    else:
                        _real_os_ftruncate(fd, w.old_size)
                        if w.old:
                            _real_os_pwrite(fd, w.old, w.offset)
                if keep is not None:
                    for w in writes:
                        if keep.random() < 0.5:
                            continue
                        if w.kind == "w":
                            _real_os_pwrite(fd, w.new, w.offset)
                        else:
                            _real_os_ftruncate(fd, w.new_size)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------- checks
class Inconsistent(AssertionError):
    pass


def qcow2_files(directory: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".stash")]
        for n in sorted(names):
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                if f.read(4) == b"QFI\xfb":
                    out.append(p)
    return out


def qemu_check(path: str, repair: str | None = None) -> tuple[int, dict]:
    argv = ["qemu-img", "check", "--output=json"]
    if repair:
        argv += ["-r", repair]
    r = subprocess.run(argv + [path], capture_output=True, text=True)
    try:
        data = json.loads(r.stdout) if r.stdout.strip() else {}
    except ValueError:
        data = {}
    return r.returncode, data | {"stderr": r.stderr}


def qemu_read(path: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="pyqcow-qemu-read-") as tmpdir:
        out = os.path.join(tmpdir, "qemu-read.raw")
        r = subprocess.run(["qemu-img", "convert", "-O", "raw", path, out],
                           capture_output=True, text=True)
        if r.returncode:
            raise Inconsistent(f"qemu-img convert {path} failed: {r.stderr.strip()}")
        with open(out, "rb") as f:
            return f.read()


def pyqcow_read(path: str) -> bytes:
    with pyqcow.open(path) as img:
        return img.read(0, img.virtual_size)


def matches_any_bytewise(data: bytes, states: list[bytes]) -> bool:
    """Every byte of ``data`` equals that byte in one of ``states``."""
    if any(data == s for s in states):
        return True
    if any(len(s) != len(data) for s in states):
        return False
    step = 4096
    for i in range(0, len(data), step):
        chunk = data[i : i + step]
        if any(chunk == s[i : i + step] for s in states):
            continue
        for j, b in enumerate(chunk):
            if not any(s[i + j] == b for s in states):
                return False
    return True


@dataclass
class Expect:
    """What the user must see: ``path`` reads as one of ``states``.

    ``bytewise``: each byte may come from any state (guest writes without a
    flush in between promise nothing more).  ``alternatives``: (path, states)
    tried in order when an earlier path does not exist (merge's promise).
    """

    alternatives: list[tuple[str, list[bytes]]]
    bytewise: bool = False
    extra: object = None  # callable(path) raising Inconsistent: more promises to check


def verify_state(directory: str, expect: Expect, *, use_qemu: bool = True,
                 repair: bool = True) -> str:
    """Check a directory after a crash/fault.  Returns which state was seen."""
    for path, states in expect.alternatives:
        if os.path.exists(path):
            break
    else:
        raise Inconsistent(f"none of {[p for p, _ in expect.alternatives]} exists")
    files = qcow2_files(directory)
    leaks = False
    # the data promise first, so that a metadata complaint below says the data was right
    got = pyqcow_read(path)
    which = _which(got, states, expect.bytewise)
    if which is None:
        raise Inconsistent(f"{path}: pyqcow reads neither the data before nor after "
                           f"({_diff(got, states)})")
    if use_qemu:
        qgot = qemu_read(path)
        if _which(qgot, states, expect.bytewise) is None:
            raise Inconsistent(f"{path}: qemu-img reads neither the data before nor after "
                               f"({_diff(qgot, states)})")
    if expect.extra is not None:
        expect.extra(path)
    if use_qemu:
        for f in files:
            rc, data = qemu_check(f)
            if rc not in (0, 3) or data.get("corruptions", 0):
                raise Inconsistent(f"qemu-img check {f}: exit {rc} (the guest data read "
                                   f"right): {data}")
            leaks |= rc == 3
    if repair and pyqcow_check is not None:
        for f in files:
            res = pyqcow_check(f, repair="leaks")
            after = pyqcow_check(f)
            if _bad(after):
                raise Inconsistent(f"pyqcow check {f} after -r leaks: {after}")
            if use_qemu:
                rc, data = qemu_check(f)
                if rc != 0:
                    raise Inconsistent(f"qemu-img check {f} after pyqcow -r leaks: exit {rc}: {data}")
            del res
        # and the repair did not change what the user reads
        if _which(pyqcow_read(path), states, expect.bytewise) is None:
            raise Inconsistent(f"{path}: content changed by check -r leaks")
    return ("leaks," if leaks else "") + which


def _which(got: bytes, states: list[bytes], bytewise: bool) -> str | None:
    if all(s == states[0] for s in states):
        return "same-data" if got == states[0] else None
    for i, s in enumerate(states):
        if got == s:
            return "before" if i == 0 else ("after" if i == len(states) - 1 else f"state{i}")
    if bytewise and matches_any_bytewise(got, states):
        return "mixed"
    return None


def _diff(got: bytes, states: list[bytes]) -> str:
    parts = []
    for i, s in enumerate(states):
        if len(s) != len(got):
            parts.append(f"state{i}: size {len(s)} vs {len(got)}")
            continue
        first = next((j for j in range(len(s)) if s[j] != got[j]), None)
        parts.append(f"state{i}: first difference at {first}")
    return "; ".join(parts)


def _bad(result) -> bool:
    for name in ("corruptions", "leaks", "check_errors"):
        if getattr(result, name, 0):
            return True
    return False


try:  # the checker is being written in parallel; use it when present
    from pyqcow.ops.check import check as pyqcow_check
except ImportError:  # pragma: no cover
    pyqcow_check = None


# ---------------------------------------------------------------------------- driver
def copy_dir(src: str, dst: str) -> None:
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)


def count_points(pristine: str, work: str, op) -> list[str]:
    copy_dir(pristine, work)
    inj = Injector(mode="count", journal=False)
    with inj:
        op(work)
    return list(inj.calls)


def run_faults(name: str, pristine: str, work: str, op, expect_fn, *, indices=None,
               modes=("crash", "enospc", "eio"), torn: bool = True, use_qemu: bool = True,
               seed: int = 0, stats: Stats = STATS, failures: list | None = None) -> int:
    """Inject every fault of ``modes`` at every fault point of ``op`` and check.

    ``op(dir)`` runs the operation on the scenario copied to ``dir``;
    ``expect_fn(dir) -> Expect``.  Returns the number of injected faults.  A
    broken promise is appended to ``failures`` (raised at once if None).
    """
    points = count_points(pristine, work, op)
    if indices is None:
        indices = range(len(points))
    rng = random.Random(seed)
    n = 0

    def record(mode, label, raised, prefix=""):
        try:
            outcome = prefix + _check(work, expect_fn, use_qemu, name, label, raised)
        except Inconsistent as e:
            if failures is None:
                raise
            failures.append((name, mode, str(e)))
            outcome = "FAILED"
        stats.add(name, mode, outcome)

    for i in indices:
        if i >= len(points):
            continue
        kind = points[i]
        for mode in modes:
            if mode == "enospc" and kind not in WRITE_KINDS:
                continue
            copy_dir(pristine, work)
            stash = work + ".stash"
            shutil.rmtree(stash, ignore_errors=True)
            inj = Injector(mode=mode, at=i, journal=False)
            raised: BaseException | None = None
            with inj:
                try:
                    op(work)
                except SimulatedCrash as e:
                    raised = e
                except (OSError, QcowError) as e:
                    raised = e
            prefix = "completed-despite-error," if mode != "crash" and raised is None else ""
            if mode != "crash":
                # the process lives on after ENOSPC/EIO: nothing temporary may remain
                extra = sorted(set(_names(work)) - set(_names(pristine)) - {"converted.raw"})
                if extra:
                    e = Inconsistent(f"{name} {mode}@{i}:{kind}: left behind {extra}")
                    if failures is None:
                        raise e
                    failures.append((name, mode, str(e)))
            record(mode, f"{mode}@{i}:{kind}", raised, prefix)
            n += 1
            if mode == "crash" and torn:
                variants = [("torn-all", None)] + [("torn-random", rng)] * TORN_RANDOM_VARIANTS
                for variant, keep in variants:
                    copy_dir(pristine, work)
                    # replay the same run with the journal on, then cut the power
                    inj2 = Injector(mode="crash", at=i, journal=True, stash=stash + variant)
                    with inj2:
                        try:
                            op(work)
                        except SimulatedCrash:
                            pass
                    inj2.torn(work, keep)
                    record(variant, f"{variant}@{i}:{kind}", None)
                    n += 1
                    shutil.rmtree(stash + variant, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return n


def _names(directory: str) -> list[str]:
    out = []
    for root, _dirs, names in os.walk(directory):
        out += [os.path.relpath(os.path.join(root, n), directory) for n in names]
    return out


def _check(work, expect_fn, use_qemu, name, label, raised) -> str:
    try:
        return verify_state(work, expect_fn(work), use_qemu=use_qemu)
    except Inconsistent as e:
        raise Inconsistent(f"{name} {label} (op raised {raised!r}): {e}") from None
    except QcowError as e:
        raise Inconsistent(f"{name} {label} (op raised {raised!r}): unreadable: {e}") from None
