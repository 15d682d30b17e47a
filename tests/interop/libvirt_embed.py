"""An isolated libvirt QEMU driver for the tests: ``qemu:///embed?root=DIR``.

Never the machine's own libvirt: every instance lives under its own root (its
configuration, state, sockets and QEMU logs), set up here with a qemu.conf
that runs QEMU as root and logs to files (no virtlogd).  An embedded driver
belongs to the first process that opens the root until that process exits, so
a root used in-process by a test worker is never handed to virsh; tests that
run virsh use a root of their own and drive pyqcow as a subprocess there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

QEMU_CONF = 'user = "root"\ngroup = "root"\nstdio_handler = "file"\n'


def require_libvirt() -> None:
    """Fail under CI, skip elsewhere, when the real QEMU driver cannot run here."""
    problems = []
    try:
        import libvirt  # noqa: F401
    except ImportError:
        problems.append("libvirt-python is not installed (pip install 'pyqcow[libvirt]')")
    for tool in ("virsh", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found")
    if os.geteuid() != 0:
        problems.append("the embedded QEMU driver is set up to run QEMU as root")
    if problems:
        msg = "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(f"libvirt tests cannot run under CI: {msg}")
        pytest.skip(msg)


def make_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="pyqcow-libvirt-"))
    (root / "etc").mkdir()
    (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
    return root


def uri(root: Path) -> str:
    return f"qemu:///embed?root={root}"


def virsh(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["virsh", "-q", "-c", uri(root), *args], capture_output=True, text=True,
                       timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed: {r.stderr}")
    return r


def pyqcow_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pyqcow.cli.main", *args], capture_output=True,
                       text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"pyqcow {' '.join(args)} failed: {r.stderr}")
    return r


def domain_xml(name: str, disks: list[tuple[str, str, str]], *, uuid: str | None = None) -> str:
    """A minimal shut-off domain (TCG, no OS) with file disks (target, path, format)."""
    parts = [f"<domain type='qemu'><name>{name}</name>"]
    if uuid:
        parts.append(f"<uuid>{uuid}</uuid>")
    parts.append("<memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os>"
                 "<devices>")
    for target, path, fmt in disks:
        parts.append(f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
                     f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>")
    parts.append("</devices></domain>")
    return "".join(parts)


def remove_root(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
