#!/usr/bin/env python3
"""Read benchmark: pyqcow's reader() beside dissect.hypervisor, libqcow and qemu-img.

    tools/bench read [--size-gib 2] [--data-gib 1] [--random-reads 20000] [--repeat 5]
                     [--dir DIR] [--cache-dir DIR] [--no-others] [--keep] [--json PATH]
                     [--clock wall|cpu] [--readers pyqcow,libqcow,...]

Builds, in a scratch directory, a qcow2 image (64 KiB clusters) of SIZE GiB
holding DATA GiB of random bytes in 256 KiB chunks (the rest holes), made by
``qemu-img convert`` from a sparse raw file, and an overlay on top of it in
which ``qemu-io`` rewrote a random half of the 64 KiB clusters with other
random bytes.  On each image it measures, hot page cache, best of --repeat:

* sequential: the whole guest disk in 1 MiB reads (MB/s);
* random: --random-reads 4 KiB reads at random 512-byte aligned offsets (reads/s);

for pyqcow (row ``pyqcow``: random reads are ``reader().pread(4096, offset)``,
which returns bytes as libqcow's ``read_buffer_at_offset`` and dissect's
``read`` do, sequential reads are ``reader().readinto`` into one reused 1 MiB
buffer; ``pyqcow-into``: random ``reader().preadinto(buffer, offset)`` into one
reused 4 KiB buffer; ``pyqcow-read``: ``seek`` + ``read``; all three through the
mmap-backed C helper; ``pyqcow-python`` is ``seek`` + ``readinto`` with
``PYQCOW_NO_NATIVE=1``, the pure-Python ``os.preadv`` path),
pyqcow's libyal-compatible API (``pyqcow.file``: ``read_buffer`` /
``read_buffer_at_offset``, the chain joined with ``set_parent``),
dissect.hypervisor's QCow2 stream (``read``), libyal's libqcow binding (the same
calls; its module is also called ``pyqcow``, so it runs in a venv of its own),
``qemu-img bench`` (sequential only), and two FUSE mounts read as plain files
(``os.preadv`` / ``os.pread``, the file's page cache dropped before each pass so
every read reaches the FUSE server): ``pyqcow mount`` (disk.raw; and with
``--page-cache``) and libyal's ``qcowmount`` (Debian libqcow-utils).  The mounts need root and /dev/fuse.  The other readers live in venvs under --cache-dir (default
~/.cache/pyqcow-bench), made on first use with pip; each runs in a subprocess
of its venv's python.  Every reader's output is hashed in an untimed pass and
compared with ``qemu-img convert -O raw``: a wrong reader is reported, not
hidden.  A benchmark, not a test: it prints figures and ratios and always
exits 0 unless its own set-up fails.

``--json PATH`` also writes the issue 14 rows (group "read") for ``tools/bench
all``: random reads/s of the ``pyqcow`` row beside libqcow and beside dissect
(goal >= 1,000,000 reads/s), and sequential MB/s beside libqcow (goal >= 2x),
on the image and on the overlay.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
CLUSTER = 64 * 1024
CHUNK = 256 * 1024
SEQ_BLOCK = MiB
RAND_BLOCK = 4096

# ---------------------------------------------------------------------------
# The measuring worker: one script, run by each venv's python.
# argv: KIND IMAGE SIZE SEED COUNT REPEAT MODE(time|verify)
# ---------------------------------------------------------------------------
WORKER = r'''
import hashlib, json, os, random, sys, time
kind, image, size, seed, count, repeat, mode = sys.argv[1:8]
size, seed, count, repeat = int(size), int(seed), int(count), int(repeat)
SEQ, RND = 1 << 20, 4096
rng = random.Random(seed)
offsets = [rng.randrange(0, size - RND) & ~511 for _ in range(count)]

def open_reader():
    if kind in ("pyqcow", "pyqcow-into", "pyqcow-read", "pyqcow-python"):
        if kind == "pyqcow-python":
            os.environ["PYQCOW_NO_NATIVE"] = "1"  # the pure-Python (os.preadv) path
        sys.path.insert(0, os.environ["PYQCOW_REPO"])
        import pyqcow
        img = pyqcow.open(image)
        r = img.reader()
        if kind != "pyqcow-python" and r._gmap is None:
            raise SystemExit("the mmap-backed reader is not in use (pyqcow._native not built?)")
        return img, r
    if kind == "dissect":
        from pathlib import Path
        from dissect.hypervisor.disk.qcow2 import QCow2
        q = QCow2(Path(image))
        return q, q.open()
    if kind.startswith("file-"):
        fd = os.open(image, os.O_RDONLY)
        return fd, fd
    if kind in ("libqcow", "pyqcow-libyal"):
        if kind == "pyqcow-libyal":
            sys.path.insert(0, os.environ["PYQCOW_REPO"])
        import pyqcow  # libqcow: libyal's binding (own venv); else this repo's
        files = []
        path = image
        import subprocess
        chain = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", "--backing-chain", "-U", image],
            check=True, capture_output=True, text=True).stdout)
        for entry in chain:
            f = pyqcow.file()
            f.open(entry["filename"])
            files.append(f)
        for child, parent in zip(files, files[1:]):
            child.set_parent(parent)
        return files, files[0]
    raise SystemExit("unknown reader " + kind)

def drop_cache(fd):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

def seq_pass(r, h):
    if kind.startswith("file-"):
        drop_cache(r)
        buf = bytearray(SEQ); mv = memoryview(buf)
        total = 0
        while True:
            n = os.preadv(r, [buf], total)
            if not n:
                break
            if h is not None:
                h.update(mv[:n])
            total += n
        return total
    if kind in ("pyqcow", "pyqcow-into", "pyqcow-python"):
        buf = bytearray(SEQ); mv = memoryview(buf)
        r.seek(0)
        total = 0
        while True:
            n = r.readinto(buf)
            if not n:
                break
            if h is not None:
                h.update(mv[:n])
            total += n
        return total
    if kind in ("libqcow", "pyqcow-libyal"):
        r.seek_offset(0, os.SEEK_SET)
        total = 0
        while total < size:
            data = r.read_buffer(min(SEQ, size - total))
            if not data:
                break
            if h is not None:
                h.update(data)
            total += len(data)
        return total
    r.seek(0)
    total = 0
    while True:
        data = r.read(SEQ)
        if not data:
            break
        if h is not None:
            h.update(data)
        total += len(data)
    return total

def rand_pass(r, h):
    if kind.startswith("file-"):
        drop_cache(r)
        pread = os.pread
        for off in offsets:
            data = pread(r, RND, off)
            if h is not None:
                h.update(data)
        return
    if kind == "pyqcow":
        pread = r.pread  # bytes, as libqcow's read_buffer_at_offset and dissect's read
        for off in offsets:
            data = pread(RND, off)
            if h is not None:
                h.update(data)
        return
    if kind == "pyqcow-into":
        buf = bytearray(RND); mv = memoryview(buf)
        preadinto = r.preadinto
        for off in offsets:
            preadinto(buf, off)
            if h is not None:
                h.update(mv)
        return
    if kind == "pyqcow-python":
        buf = bytearray(RND); mv = memoryview(buf)
        seek, readinto = r.seek, r.readinto
        for off in offsets:
            seek(off)
            readinto(buf)
            if h is not None:
                h.update(mv)
        return
    if kind in ("libqcow", "pyqcow-libyal"):
        rb = r.read_buffer_at_offset
        for off in offsets:
            data = rb(RND, off)
            if h is not None:
                h.update(data)
        return
    seek, read = r.seek, r.read
    for off in offsets:
        seek(off)
        data = read(RND)
        if h is not None:
            h.update(data)

owner, r = open_reader()
out = {}
if mode == "verify":
    h = hashlib.sha256()
    out["seq_bytes"] = seq_pass(r, h)
    out["seq_sha256"] = h.hexdigest()
    h = hashlib.sha256()
    rand_pass(r, h)
    out["rand_sha256"] = h.hexdigest()
else:
    # --clock cpu: this process's CPU time (robust on a busy machine); the FUSE
    # rows (file-*) keep wall time, their work is in the FUSE server
    clock = (time.process_time if os.environ.get("PYQCOW_BENCH_CLOCK") == "cpu"
             and not kind.startswith("file-") else time.perf_counter)
    seq, rnd = [], []
    for _ in range(repeat):
        t = clock(); n = seq_pass(r, None); seq.append(clock() - t)
        t = clock(); rand_pass(r, None); rnd.append(clock() - t)
    out["seq_mbs"] = n / min(seq) / 1e6
    out["rand_per_s"] = count / min(rnd)
    out["seq_bytes"] = n
print(json.dumps(out))
'''


def log(msg: str) -> None:
    print(msg, flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------
def build_images(d: Path, size: int, data: int, seed: int) -> tuple[Path, Path]:
    rng = random.Random(seed)
    chunks = size // CHUNK
    chosen = sorted(rng.sample(range(chunks), data // CHUNK))
    raw = d / "base-src.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for c in chosen:
            f.seek(c * CHUNK)
            f.write(rng.randbytes(CHUNK))
    base = d / "base.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base)])
    raw.unlink()
    top = d / "top.qcow2"
    # relative backing name: dissect resolves it next to the overlay
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
        cwd=d)
    patterns = []
    for i in range(8):
        p = d / f"pattern{i}.bin"
        p.write_bytes(rng.randbytes(4 * MiB))
        patterns.append(p)
    clusters = size // CLUSTER
    rewrite = sorted(rng.sample(range(clusters), clusters // 2))
    cmds = []
    i = 0
    while i < len(rewrite):
        j = i
        while j + 1 < len(rewrite) and rewrite[j + 1] == rewrite[j] + 1 and j - i < 63:
            j += 1
        start, n = rewrite[i] * CLUSTER, (j - i + 1) * CLUSTER
        cmds.append(f"write -q -s {patterns[len(cmds) % len(patterns)]} {start} {n}")
        i = j + 1
    script = "\n".join(cmds) + "\nquit\n"
    proc = subprocess.run(["qemu-io", "-f", "qcow2", str(top)], input=script, text=True,
                          capture_output=True, check=False)
    if proc.returncode or "error" in proc.stdout.lower() + proc.stderr.lower():
        raise SystemExit(f"qemu-io failed building the overlay: {proc.stdout[-500:]}{proc.stderr[-500:]}")
    for p in patterns:
        p.unlink()
    return base, top


def reference(image: Path, d: Path, size: int, seed: int, count: int) -> dict:
    """sha256 of qemu-img convert -O raw, and of the random 4 KiB reads from it."""
    import hashlib

    raw = d / (image.stem + ".ref.raw")
    run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)])
    h = hashlib.sha256()
    with open(raw, "rb") as f:
        while True:
            b = f.read(8 * MiB)
            if not b:
                break
            h.update(b)
    seq = h.hexdigest()
    rng = random.Random(seed)
    offsets = [rng.randrange(0, size - RAND_BLOCK) & ~511 for _ in range(count)]
    h = hashlib.sha256()
    fd = os.open(raw, os.O_RDONLY)
    try:
        for off in offsets:
            h.update(os.pread(fd, RAND_BLOCK, off))
    finally:
        os.close(fd)
    raw.unlink()
    return {"seq_sha256": seq, "rand_sha256": h.hexdigest()}


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------
def ensure_venv(cache: Path, name: str, package: str) -> Path | None:
    venv = cache / name
    py = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.exists() and py.exists():
        return py
    log(f"  setting up {name}: pip install {package} (once, in {venv})")
    try:
        if venv.exists():
            shutil.rmtree(venv)
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(py), "-m", "pip", "install", "-q", package])
    except subprocess.CalledProcessError as e:
        log(f"  ! could not install {package}: {(e.stderr or e.stdout or '').strip()[-300:]}")
        return None
    marker.write_text(package + "\n")
    return py


def measure(python: str, kind: str, image: Path, size: int, seed: int, count: int,
            repeat: int, mode: str, worker: Path, clock: str = "wall") -> dict | str:
    env = dict(os.environ, PYQCOW_REPO=str(REPO), PYQCOW_BENCH_CLOCK=clock)
    proc = subprocess.run(
        [python, str(worker), kind, str(image), str(size), str(seed), str(count), str(repeat), mode],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return "failed: " + (tail[-1] if tail else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class FuseMount:
    """``pyqcow mount -d`` or ``qcowmount`` of IMAGE on a fresh directory; .file is the disk."""

    def __init__(self, kind: str, image: Path, scratch: Path) -> None:
        self.mnt = scratch / f"mnt-{kind}-{image.stem}"
        self.mnt.mkdir()
        if kind.startswith("pyqcow-fuse"):
            extra = ["--page-cache"] if kind == "pyqcow-fuse-pc" else []
            argv = [sys.executable, "-m", "pyqcow.cli.main", "mount", "-d", *extra,
                    str(image), str(self.mnt)]
            self.file = self.mnt / "disk.raw"
        else:
            argv = ["qcowmount", str(image), str(self.mnt)]  # daemonizes itself
            self.file = self.mnt / "qcow1"
        proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not os.path.ismount(self.mnt):
            raise RuntimeError(f"{argv[0]} did not mount: {(proc.stderr or proc.stdout).strip()}")

    def close(self) -> None:
        subprocess.run(["umount", str(self.mnt)], capture_output=True, check=False)
        deadline = time.monotonic() + 30
        while os.path.ismount(self.mnt) and time.monotonic() < deadline:
            time.sleep(0.05)


def fuse_reason() -> str | None:
    """Why the FUSE rows cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


def qemu_img_bench(image: Path, size: int, repeat: int) -> float | None:
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        try:
            run(["qemu-img", "bench", "-U", "-f", "qcow2", "-t", "writeback", "-d", "1",
                 "-c", str(size // SEQ_BLOCK), "-s", str(SEQ_BLOCK), "-S", str(SEQ_BLOCK),
                 str(image)])
        except (subprocess.CalledProcessError, FileNotFoundError):
            return None
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return size / best / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--data-gib", type=float, default=1)
    ap.add_argument("--random-reads", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "pyqcow-bench"),
                    help="where the dissect and libqcow venvs live")
    ap.add_argument("--no-others", action="store_true", help="measure pyqcow (and qemu-img) only")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--readers", default=None, metavar="A,B",
                    help="measure only these rows (e.g. pyqcow,libqcow,dissect); qemu-img "
                         "bench always runs")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time the in-process readers by wall clock (default) or by their "
                         "process's CPU time (steadier on a busy machine; the FUSE rows and "
                         "qemu-img bench stay wall time)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write the issue 14 rows (group read) to PATH")
    args = ap.parse_args(argv)
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            log(f"bench read: {tool} not found; nothing measured")
            return 0
    size = int(args.size_gib * GiB) // CHUNK * CHUNK
    data = int(args.data_gib * GiB) // CHUNK * CHUNK
    scratch = Path(tempfile.mkdtemp(prefix="pyqcow-bench-read-", dir=args.dir))
    try:
        log(f"bench read: building a {size / GiB:g} GiB image with {data / GiB:g} GiB of random "
            f"data and a 50%-rewritten overlay in {scratch}")
        t = time.perf_counter()
        base, top = build_images(scratch, size, data, args.seed)
        log(f"  built in {time.perf_counter() - t:.1f} s; computing reference hashes "
            "(qemu-img convert -O raw)")
        refs = {img: reference(img, scratch, size, args.seed, args.random_reads)
                for img in (base, top)}
        worker = scratch / "worker.py"
        worker.write_text(WORKER)
        readers: list[tuple[str, str, str]] = [
            ("pyqcow", sys.executable, "pyqcow reader(): random pread(4096, off) -> bytes; "
             "sequential readinto(1 MiB buffer) (mmap, C)"),
            ("pyqcow-into", sys.executable, "pyqcow reader().preadinto(4 KiB buffer, off) "
             "(mmap, C)"),
            ("pyqcow-read", sys.executable, "pyqcow reader().seek + read (mmap, C)"),
            ("pyqcow-python", sys.executable, "pyqcow reader().seek + readinto, "
             "PYQCOW_NO_NATIVE=1 (pure Python, os.preadv)"),
            ("pyqcow-libyal", sys.executable, "pyqcow.file (libyal API)"),
        ]
        why = fuse_reason()
        if why is None:
            readers.append(("pyqcow-fuse", sys.executable, "pyqcow mount, disk.raw"))
            readers.append(("pyqcow-fuse-pc", sys.executable, "pyqcow mount --page-cache"))
        else:
            log(f"  FUSE rows skipped: {why}")
        if not args.no_others:
            cache = Path(args.cache_dir)
            cache.mkdir(parents=True, exist_ok=True)
            py = ensure_venv(cache, "venv-dissect", "dissect.hypervisor")
            if py:
                readers.append(("dissect", str(py), "dissect.hypervisor QCow2 stream"))
            py = ensure_venv(cache, "venv-libqcow", "libqcow-python")
            if py:
                readers.append(("libqcow", str(py), "libqcow-python (libyal)"))
            if why is None and shutil.which("qcowmount"):
                readers.append(("qcowmount", sys.executable, "qcowmount (libqcow-utils)"))
            elif why is None:
                log("  qcowmount row skipped: qcowmount not found (Debian: libqcow-utils)")
        if args.readers:
            wanted = set(args.readers.split(","))
            readers = [r for r in readers if r[0] in wanted]
        results: dict = {}
        load_before = os.getloadavg()[0]
        for img in (base, top):
            label = "image" if img == base else "overlay"
            for kind, py, _ in readers:
                log(f"  {label}: {kind} ...")
                mount = None
                target, wkind = img, kind
                if kind in ("pyqcow-fuse", "pyqcow-fuse-pc", "qcowmount"):
                    try:
                        mount = FuseMount(kind, img, scratch)
                    except RuntimeError as e:
                        results[(label, kind)] = (f"failed: {e}", "")
                        continue
                    target, wkind = mount.file, "file-" + kind
                try:
                    timed = measure(py, wkind, target, size, args.seed, args.random_reads,
                                    args.repeat, "time", worker, args.clock)
                    check = measure(py, wkind, target, size, args.seed, args.random_reads, 1,
                                    "verify", worker)
                finally:
                    if mount is not None:
                        mount.close()
                if isinstance(check, dict):
                    ok_seq = check["seq_sha256"] == refs[img]["seq_sha256"]
                    ok_rand = check["rand_sha256"] == refs[img]["rand_sha256"]
                    verdict = "correct" if ok_seq and ok_rand else (
                        "WRONG DATA (" + ", ".join(
                            w for w, ok in (("sequential", ok_seq), ("random", ok_rand)) if not ok
                        ) + ")")
                else:
                    verdict = check
                results[(label, kind)] = (timed, verdict)
            results[(label, "qemu-img")] = (
                {"seq_mbs": qemu_img_bench(img, size, args.repeat)}, "(not checked)")
        report(results, readers, size, data, args)
        if args.json:
            rows = json_rows(results, args)
            Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
            log(f"wrote {len(rows)} rows to {args.json}")
        log(f"load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
            f"the measurements, on {os.cpu_count()} CPUs: figures drop when the machine is busy")
    finally:
        if args.keep:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def report(results: dict, readers, size: int, data: int, args) -> None:
    log("")
    log(f"pyqcow read benchmark: {size / GiB:g} GiB disk, {data / GiB:g} GiB random data, "
        f"64 KiB clusters; sequential = whole disk in 1 MiB reads, random = "
        f"{args.random_reads} x 4 KiB; hot page cache, best of {args.repeat}, "
        f"{args.clock} clock" + (" (FUSE rows and qemu-img: wall)" if args.clock == "cpu" else ""))
    names = [k for k, _, _ in readers] + ["qemu-img"]
    for label in ("image", "overlay"):
        log("")
        log(f"[{label}{' (over the image)' if label == 'overlay' else ''}]")
        log(f"  {'reader':<16}{'sequential MB/s':>17}{'random reads/s':>17}  output")
        ours = results.get((label, "pyqcow"), ({}, ""))[0]
        for kind in names:
            timed, verdict = results.get((label, kind), ({}, "not run"))
            if isinstance(timed, str):
                log(f"  {kind:<16}{'-':>17}{'-':>17}  {timed}")
                continue
            seq = timed.get("seq_mbs")
            rnd = timed.get("rand_per_s")
            log(f"  {kind:<16}{_num(seq):>17}{_num(rnd):>17}  {verdict}")
        if isinstance(ours, dict) and ours:
            for kind in [k for k in names if not k.startswith("pyqcow")]:
                timed = results.get((label, kind), ({}, ""))[0]
                if not isinstance(timed, dict):
                    continue
                parts = []
                if timed.get("seq_mbs"):
                    parts.append(f"sequential x{ours['seq_mbs'] / timed['seq_mbs']:.2f}")
                if timed.get("rand_per_s"):
                    parts.append(f"random x{ours['rand_per_s'] / timed['rand_per_s']:.2f}")
                if parts:
                    log(f"  pyqcow vs {kind}: " + ", ".join(parts))
        for a, b in (("pyqcow-libyal", "libqcow"), ("pyqcow-fuse", "qcowmount"),
                     ("pyqcow-fuse-pc", "qcowmount")):
            ta = results.get((label, a), ({}, ""))[0]
            tb = results.get((label, b), ({}, ""))[0]
            if isinstance(ta, dict) and isinstance(tb, dict) and ta and tb:
                parts = [f"{what} x{ta[k] / tb[k]:.2f}"
                         for what, k in (("sequential", "seq_mbs"), ("random", "rand_per_s"))
                         if ta.get(k) and tb.get(k)]
                log(f"  {a} vs {b}: " + ", ".join(parts))
    log("")
    log("row pyqcow: random = reader().pread(4096, offset) -> bytes, sequential = "
        "reader().readinto(1 MiB buffer); pyqcow-into: random = reader().preadinto(4 KiB "
        "buffer, offset)")
    log("goals (issue 14): pyqcow random >= 1,000,000 reads/s, sequential >= 2x libqcow; "
        "(issue 16) pyqcow-libyal >= libqcow, pyqcow-fuse >= qcowmount")


RANDOM_GOAL = 1_000_000  # reads/s (issue 14)
SEQ_GOAL = 2.0  # x libqcow


def json_rows(results: dict, args) -> list[dict]:
    """The issue 14 rows: pyqcow random reads/s beside libqcow and dissect,
    sequential MB/s beside libqcow, on the image and the overlay."""
    rows = []
    for label in ("image", "overlay"):
        timed, verdict = results.get((label, "pyqcow"), ({}, "not run"))
        ours = timed if isinstance(timed, dict) else {}
        correct = verdict == "correct"
        api = "reader().pread(4096, off)"
        for anchor, key, unit in (("libqcow", "rand_per_s", "reads/s"),
                                  ("dissect", "rand_per_s", "reads/s"),
                                  ("libqcow", "seq_mbs", "MB/s")):
            other = results.get((label, anchor), ({}, ""))[0]
            theirs = other.get(key) if isinstance(other, dict) else None
            mine = ours.get(key)
            ratio = mine / theirs if mine and theirs else None
            if key == "rand_per_s":
                row = f"random 4 KiB, {label}, vs {anchor}"
                goal = f">= {RANDOM_GOAL:,} reads/s"
                ok = bool(mine and mine >= RANDOM_GOAL)
                note = f"{api}, {args.random_reads} reads, best of {args.repeat}, {args.clock} clock"
            else:
                row = f"sequential 1 MiB, {label}, vs {anchor}"
                goal = f">= {SEQ_GOAL:g}"
                ok = bool(ratio and ratio >= SEQ_GOAL)
                note = f"reader().readinto, whole disk, best of {args.repeat}, {args.clock} clock"
            if not correct:
                ok = False
                note += f"; pyqcow output: {verdict}"
            rows.append({"group": "read", "row": row,
                         "pyqcow": None if mine is None else round(mine, 1),
                         "anchor": None if theirs is None else round(theirs, 1),
                         "anchor_name": anchor, "unit": unit,
                         "ratio": None if ratio is None else round(ratio, 3),
                         "goal": goal, "ok": ok, "note": note})
    return rows


def _num(v) -> str:
    return "-" if not v else f"{v:,.0f}"


if __name__ == "__main__":
    sys.exit(main())
