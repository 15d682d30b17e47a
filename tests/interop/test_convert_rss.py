"""convert's peak RSS does not grow with the data copied (h-conv2)."""

from __future__ import annotations

import subprocess
import sys

import qemu

MiB = 1024 * 1024


def test_convert_qcow2_peak_rss_stays_small(tmp_path):
    """convert -O qcow2 scans the source through read-only mappings and lets the
    pages go every DROP_BYTES; the chunks it reads ahead are scanned after their
    window was let go, and those pages must go too (was: peak RSS 146 MiB on the
    4 GiB bench chain).  DROP_BYTES is made 1 MiB in the child, so that a leak
    shows on a small chain: nearly every chunk is scanned late."""
    size = 192 * MiB
    base = qemu.create(tmp_path / "base.qcow2", size)
    qemu.qemu_io(base, f"write -P 0x5a 0 {size}")
    top = qemu.create(tmp_path / "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2",
                      cwd=tmp_path)
    for k in range(0, size, 8 * MiB):  # the chain's layers alternate inside chunks
        qemu.qemu_io(top, f"write -P 0x6b {k + 3 * MiB} 64k")
    out = tmp_path / "out.qcow2"
    # the child reports its own peak (VmHWM: since its exec)
    code = ("import sys; from pyqcow.ops import convert_common as cc; cc.DROP_BYTES = 1 << 20; "
            "from pyqcow.cli.main import main; rc = main(['convert', '-O', 'qcow2', "
            "sys.argv[1], sys.argv[2]]); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(top), str(out)], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    peak_mib = int(proc.stdout.split()[1]) / 1024  # "VmHWM:  22408 kB"
    assert peak_mib < 120, f"peak RSS {peak_mib:.0f} MiB for {size // MiB} MiB converted"
    assert qemu.compare(top, out) == 0
