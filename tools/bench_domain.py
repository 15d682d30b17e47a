#!/usr/bin/env python3
"""Deleting an external snapshot of a shut-off libvirt domain: pyqcow beside libvirt.

    tools/bench domain [--size-gib 2] [--dirty 0.05] [--rounds 3] [--dir DIR] [--keep]

Builds a 2 GiB qcow2 disk (64 KiB clusters) full of random data, defines a
domain using it in an isolated libvirt QEMU driver (``qemu:///embed?root=DIR``,
never the machine's own), takes a disk-only external snapshot with libvirt
(``base.s1``) and rewrites 5% of the disk's clusters in the overlay with
qemu-io.  Then, --rounds times, alternating which goes first, on fresh copies
of the files and freshly redefined metadata (untimed):

  libvirt   virsh snapshot-delete DOM s1          (a paused QEMU block-commits)
  pyqcow    pyqcow domain merge DOM s1            (offline, the cheaper direction)

Both are whole processes (each opens the embedded driver itself), and both
results are checked: the disk reads the overlay's content afterwards, and the
snapshot is gone.  Prints the median of each and the ratio pyqcow/libvirt (goal
<= 0.2).  A benchmark, not a test: it always exits 0 unless its set-up fails.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
CLUSTER = 64 * 1024
QEMU_CONF = 'user = "root"\ngroup = "root"\nstdio_handler = "file"\n'


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kw)


def virsh(uri: str, *args) -> subprocess.CompletedProcess:
    return run(["virsh", "-q", "-c", uri, *args])


def same_content(path: Path, ref: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", str(path), str(ref)],
                          capture_output=True).returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--dirty", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("tools/bench domain: runs the embedded QEMU driver as root; run it as root")
        return 1
    work = Path(tempfile.mkdtemp(prefix="pyqcow-bench-domain-", dir=args.dir))
    root = work / "libvirt"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
    uri = f"qemu:///embed?root={root}"
    pristine, live = work / "pristine", work / "live"
    pristine.mkdir()
    size = int(args.size_gib * GiB)
    try:
        log(f"building a {args.size_gib} GiB disk and a {args.dirty:.0%} dirty overlay ...")
        base = pristine / "disk.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(size)])
        raw = work / "fill.raw"
        with open(raw, "wb") as f:
            rnd = random.Random(1)
            for _ in range(size // (64 * MiB)):
                f.write(rnd.randbytes(64 * MiB))
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", raw, base])
        raw.unlink()
        xml = work / "dom.xml"
        xml.write_text(
            "<domain type='qemu'><name>bench</name><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64'>hvm</type></os><devices>"
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{live / 'disk.qcow2'}'/><target dev='vda' bus='virtio'/></disk>"
            "</devices></domain>")
        shutil.copytree(pristine, live)
        virsh(uri, "define", xml)
        virsh(uri, "snapshot-create-as", "bench", "s1", "--disk-only")
        overlay = live / "disk.s1"
        clusters = size // CLUSTER
        rnd = random.Random(2)
        picks = sorted(rnd.sample(range(clusters), int(clusters * args.dirty)))
        cmds = [f"write -P {(i % 250) + 1} {c * CLUSTER} {CLUSTER}" for i, c in enumerate(picks)]
        for i in range(0, len(cmds), 2000):
            run(["qemu-io", "-f", "qcow2", *sum((["-c", c] for c in cmds[i:i + 2000]), []),
                 overlay])
        snap_xml = work / "s1.xml"
        snap_xml.write_text(virsh(uri, "snapshot-dumpxml", "bench", "s1", "--security-info").stdout)
        dom_xml = work / "dom-s1.xml"
        dom_xml.write_text(virsh(uri, "dumpxml", "bench", "--inactive", "--security-info").stdout)
        shutil.rmtree(pristine)
        shutil.copytree(live, pristine)
        ref = work / "expected.raw"
        run(["qemu-img", "convert", "-O", "raw", overlay, ref])

        def reset() -> None:
            shutil.rmtree(live)
            subprocess.run(["cp", "-a", "--reflink=never", pristine, live], check=True)
            subprocess.run(["virsh", "-q", "-c", uri, "undefine", "bench",
                            "--snapshots-metadata"], capture_output=True)
            virsh(uri, "define", dom_xml)
            virsh(uri, "snapshot-create", "bench", snap_xml, "--redefine", "--current")
            subprocess.run(["sync"], check=True)

        env = dict(os.environ, PYTHONPATH=str(REPO))
        # as installed: Python caches compiled bytecode (the first round writes it)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        sides = {
            "libvirt": ["virsh", "-q", "-c", uri, "snapshot-delete", "bench", "s1"],
            "pyqcow": [sys.executable, "-m", "pyqcow.cli.main", "domain", "merge",
                       "--connect", uri, "bench", "s1"],
        }
        times: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                reset()
                t = time.perf_counter()
                p = subprocess.run(sides[name], capture_output=True, text=True, env=env)
                subprocess.run(["sync"], check=True)
                dt = time.perf_counter() - t
                if p.returncode != 0:
                    log(f"{name}: failed: {p.stderr.strip()}")
                    continue
                got = virsh(uri, "domblklist", "bench").stdout.split()[-1]
                ok = same_content(Path(got), ref) and virsh(
                    uri, "snapshot-list", "bench", "--name").stdout.strip() == ""
                times[name].append(dt)
                log(f"round {r + 1}: {name:8s} {dt:7.3f} s  {'ok' if ok else 'WRONG RESULT'}"
                    f"  (disk now {got})")
        lv, pq = (statistics.median(times[k]) if times[k] else float("nan")
                  for k in ("libvirt", "pyqcow"))
        print(f"snapshot delete, {args.size_gib:g} GiB disk, {args.dirty:.0%} dirty "
              f"(median of {args.rounds}, sync included)")
        print(f"  virsh snapshot-delete   {lv:8.3f} s")
        print(f"  pyqcow domain merge     {pq:8.3f} s")
        print(f"  ratio pyqcow/libvirt    {pq / lv:8.3f}   (goal <= 0.2)")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
