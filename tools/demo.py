#!/usr/bin/env python3
"""pyqcow demo: the seed scenario, end to end, on images and a domain XML it makes.

A VM's disk is base.qcow2.  We take an external snapshot offline (the disk
now writes into new.qcow2, and the libvirt domain XML must follow), the guest
writes ~5% of the disk, and then we want ONE image again, under the old name
base.qcow2, without copying the whole disk: pyqcow measures both directions
(commit new into base, or stream base into new and rename) and copies the
cheaper one, and rewrites the domain XML to match.

Everything happens in ./demo-out/ in the current directory (--out DIR to choose).
It is recreated each run, but only if an earlier run made it (it holds a
.pyqcow-demo marker): any other existing directory is refused, never deleted.

    1. base.qcow2 (64 MiB, 48 MiB of data written with qemu-io)
    2. dom.xml, a libvirt domain whose disk vda is base.qcow2 (absolute paths)
    3. pyqcow create -b base.qcow2 -F qcow2 new.qcow2 --domain-xml dom.xml --disk vda
       --snapshot-xml snap1.xml    (external snapshot: vda -> new.qcow2 -> base.qcow2)
    4. the "guest" writes 3.2 MiB (5%) into new.qcow2
    5. pyqcow merge --dry-run       (the plan, both directions' costs)
    6. pyqcow merge --keep base new.qcow2 --domain-xml dom.xml --disk vda -p
    7. the domain XML before and after (diff), validated by virt-xml-validate
    8. qemu-img compare: base.qcow2 reads what new.qcow2 read; qemu-img check
    9-13. the same on a libvirt-managed domain (an isolated qemu:///embed instance
       under ./demo-out/libvirt): pyqcow domain snapshot, the guest writes,
       pyqcow domain merge (dry run, then real), virsh shows the domain naming
       vm.qcow2 again and no snapshot left; qemu-img compare and check
       (skipped with a note where libvirt-python, virsh or root is missing)

Run through tools/demo (which sets up .venv); non-interactive, exits non-zero
with a message if a step fails or a required tool (qemu-img, qemu-io) is
missing.  virt-xml-validate is used when it is installed.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
DISK_SIZE = 64 * MiB

# What the guest wrote before the snapshot (base) and after it (new): (pattern, offset, length)
BASE_WRITES = [(0xB1, 0, 16 * MiB), (0xB2, 16 * MiB, 16 * MiB), (0xB3, 40 * MiB, 16 * MiB)]
NEW_WRITES = [
    (0x11, 1 * MiB, 1 * MiB),
    (0x12, 20 * MiB, 1 * MiB),
    (0x13, 36 * MiB, 512 * 1024),  # over a hole of the base
    (0x14, 60 * MiB, 704 * 1024),
]

DOMAIN_XML = """<?xml version='1.0' encoding='UTF-8'?>
<!-- pyqcow demo domain: disk vda is a qcow2 image chain -->
<domain type='kvm'>
  <name>pyqcow-demo</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='KiB'>524288</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{base}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
  </devices>
</domain>
"""


class DemoError(Exception):
    pass


def heading(number: int, title: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\n== {number}. {title}\n{bar}", flush=True)


def run(argv: list[str], cwd: Path, *, show: bool = True, env: dict | None = None,
        ok: tuple[int, ...] = (0,)) -> str:
    """Run a command in cwd, echo it (and its output) when ``show``; fail the demo on error."""
    if show:
        print(f"$ {shlex.join(argv)}", flush=True)
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode not in ok:
        raise DemoError(
            f"command failed (exit {proc.returncode}): {shlex.join(argv)}\n"
            f"{(proc.stderr.strip() or proc.stdout.strip())}"
        )
    if show:
        for stream in (proc.stdout, proc.stderr):
            text = stream.rstrip()
            if text:
                print(text, flush=True)
    return proc.stdout


def pyqcow_env() -> dict:
    """Environment in which ``python -m pyqcow.cli.main`` imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def pyqcow_argv() -> list[str]:
    """The pyqcow command: the console script next to this python, else ``-m``."""
    exe = Path(sys.executable).with_name("pyqcow")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "pyqcow.cli.main"]


def show_diff(old: str, new: str, name: str) -> None:
    lines = list(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                      fromfile=f"{name} (before)", tofile=f"{name} (after)"))
    print("".join(lines).rstrip() if lines else "(no change)", flush=True)


def validate_xml(path: Path, schema: str, cwd: Path) -> None:
    tool = shutil.which("virt-xml-validate")
    if tool is None or shutil.which("xmllint") is None:
        print(f"(virt-xml-validate/xmllint not installed: {path.name} not validated)")
        return
    run([tool, str(path), schema], cwd)


def demo(out: Path) -> None:
    env = pyqcow_env()
    pyqcow = pyqcow_argv()

    def pq(*args: str, show: bool = True) -> str:
        return run([*pyqcow, *args], out, show=show, env=env)

    base = out / "base.qcow2"
    new = out / "new.qcow2"
    dom = out / "dom.xml"

    heading(1, "A VM disk: base.qcow2 with data")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", str(DISK_SIZE)], out)
    io = ["qemu-io", "-f", "qcow2"]
    for pattern, offset, length in BASE_WRITES:
        io += ["-c", f"write -q -P {pattern:#x} {offset} {length}"]
    run([*io, "base.qcow2"], out)
    pq("info", "base.qcow2")

    heading(2, "The libvirt domain XML: disk vda is base.qcow2")
    dom.write_text(DOMAIN_XML.format(base=base))
    original_xml = dom.read_text()
    print(original_xml.rstrip())
    validate_xml(dom, "domain", out)

    heading(3, "External snapshot (offline): vda now writes into new.qcow2")
    pq("create", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2",
       "--domain-xml", "dom.xml", "--disk", "vda", "--snapshot-xml", "snap1.xml",
       "--snapshot-name", "snap1")
    snapshot_xml = dom.read_text()
    show_diff(original_xml, snapshot_xml, "dom.xml")
    pq("info", "--backing-chain", "new.qcow2")
    print(f"(snap1.xml: a <domainsnapshot> for `virsh snapshot-create pyqcow-demo "
          f"{out / 'snap1.xml'} --redefine`)")
    validate_xml(out / "snap1.xml", "domainsnapshot", out)

    heading(4, "The guest writes into new.qcow2 (~5% of the disk)")
    io = ["qemu-io", "-f", "qcow2"]
    written = 0
    for pattern, offset, length in NEW_WRITES:
        io += ["-c", f"write -q -P {pattern:#x} {offset} {length}"]
        written += length
    run([*io, "new.qcow2"], out)
    print(f"new.qcow2 holds {written} bytes = {100 * written / DISK_SIZE:.1f}% of the "
          f"{DISK_SIZE // MiB} MiB disk; base.qcow2 holds "
          f"{sum(n for _, _, n in BASE_WRITES) // MiB} MiB")
    # The guest's view now, to check the merge against.
    run(["qemu-img", "convert", "-O", "raw", "new.qcow2", "guest-view.raw"], out)

    heading(5, "Merge plan (dry run): which direction copies less?")
    pq("merge", "--dry-run", "--keep", "base", "new.qcow2", "--domain-xml", "dom.xml",
       "--disk", "vda")
    print()
    pq("merge", "--dry-run", "--keep", "top", "new.qcow2")

    heading(6, "Merge, keeping the base's file name")
    pq("merge", "--keep", "base", "new.qcow2", "--domain-xml", "dom.xml", "--disk", "vda", "-p")
    print(f"files now: {', '.join(sorted(p.name for p in out.iterdir() if p.suffix == '.qcow2'))}")
    if new.exists():
        raise DemoError("new.qcow2 still exists after the merge")

    heading(7, "The domain XML before and after the merge")
    merged_xml = dom.read_text()
    show_diff(snapshot_xml, merged_xml, "dom.xml")
    validate_xml(dom, "domain", out)
    pq("xml", "sync", "dom.xml", "--disk", "vda", "--dry-run")

    heading(8, "Verify with qemu-img")
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", "guest-view.raw", "base.qcow2"], out)
    run(["qemu-img", "check", "base.qcow2"], out)
    pq("info", "base.qcow2")
    (out / "guest-view.raw").unlink()

    print("\ndemo: OK: base.qcow2 holds the guest's data and dom.xml names it")
    libvirt_demo(out, pq)


LIBVIRT_QEMU_CONF = 'user = "root"\ngroup = "root"\nstdio_handler = "file"\n'


def libvirt_problem() -> str | None:
    """Why the libvirt part cannot run here (None: it can)."""
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed (pip install 'pyqcow[libvirt]')"
    for tool in ("virsh", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "the isolated libvirt instance runs QEMU as root; run the demo as root"
    return None


def libvirt_demo(out: Path, pq) -> None:
    """The same story on a domain that libvirt manages (an isolated embedded instance)."""
    why = libvirt_problem()
    if why:
        print(f"\n(libvirt part skipped: {why})")
        return
    import tempfile

    lv = out / "libvirt"
    lv.mkdir()
    # the instance's state lives in a short path of its own: QEMU's monitor sockets
    # under it must stay below the 108-byte limit of a unix socket path
    root = Path(tempfile.mkdtemp(prefix="pyqcow-demo-libvirt-"))
    try:
        (root / "etc").mkdir()
        (root / "etc" / "qemu.conf").write_text(LIBVIRT_QEMU_CONF)
        _libvirt_story(lv, f"qemu:///embed?root={root}", pq)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _libvirt_story(lv: Path, uri: str, pq) -> None:
    disk = lv / "vm.qcow2"

    def virsh(*args: str, show: bool = True) -> str:
        return run(["virsh", "-q", "-c", uri, *args], lv, show=show)

    heading(9, "A libvirt-managed VM (an isolated qemu:///embed instance, never the host's)")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", str(DISK_SIZE)], lv)
    io = ["qemu-io", "-f", "qcow2"]
    for pattern, offset, length in BASE_WRITES:
        io += ["-c", f"write -q -P {pattern:#x} {offset} {length}"]
    run([*io, "vm.qcow2"], lv)
    (lv / "vm.xml").write_text(DOMAIN_XML.format(base=disk).replace("'kvm'", "'qemu'"))
    virsh("define", "vm.xml")
    virsh("domblklist", "pyqcow-demo")

    heading(10, "pyqcow domain snapshot: an external snapshot libvirt knows about")
    pq("domain", "snapshot", "--connect", uri, "pyqcow-demo", "before-upgrade")
    virsh("domblklist", "pyqcow-demo")
    virsh("snapshot-list", "pyqcow-demo", "--tree")

    heading(11, "The guest writes ~5% of its disk into vm.before-upgrade")
    io = ["qemu-io", "-f", "qcow2"]
    for pattern, offset, length in NEW_WRITES:
        io += ["-c", f"write -q -P {pattern:#x} {offset} {length}"]
    run([*io, "vm.before-upgrade"], lv)
    run(["qemu-img", "convert", "-O", "raw", "vm.before-upgrade", "guest-view.raw"], lv)
    pq("domain", "show", "--connect", uri, "pyqcow-demo")

    heading(12, "pyqcow domain merge: the cheaper direction, vm.qcow2 kept, libvirt updated")
    pq("domain", "merge", "--connect", uri, "pyqcow-demo", "before-upgrade", "--dry-run")
    pq("domain", "merge", "--connect", uri, "pyqcow-demo", "before-upgrade")
    virsh("domblklist", "pyqcow-demo")
    listed = virsh("snapshot-list", "pyqcow-demo", "--name")
    if listed.strip():
        raise DemoError(f"libvirt still lists snapshots: {listed.strip()}")

    heading(13, "Verify with qemu-img")
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", "guest-view.raw", "vm.qcow2"], lv)
    run(["qemu-img", "check", "vm.qcow2"], lv)
    (lv / "guest-view.raw").unlink()
    print("\ndemo: OK: libvirt's domain names vm.qcow2 again, holding the guest's data, "
          "and the snapshot is gone")


MARKER = ".pyqcow-demo"


def prepare_out(out: Path) -> None:
    """Make ``out`` an empty directory holding the demo's marker.

    An existing ``out`` is deleted only if an earlier demo made it (marker
    present, or empty); anything else is refused, untouched.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DemoError(f"{out} exists and is not a directory; not touching it (use --out DIR)")
    if out.exists():
        if not (out / MARKER).is_file() and any(out.iterdir()):
            raise DemoError(
                f"{out} exists and was not made by the demo (no {MARKER} in it); "
                "not deleting it (remove it, or use --out DIR)"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by pyqcow's tools/demo; deleted by its next run\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo-out"),
                    help="directory for the demo files (default: ./demo-out in the current "
                         "directory; recreated if an earlier demo made it, else refused)")
    args = ap.parse_args(argv)

    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"demo: {tool} not found (Debian: apt-get install qemu-utils)", file=sys.stderr)
            return 1

    out: Path = args.out.resolve()
    try:
        prepare_out(out)
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    try:
        demo(out)
    except DemoError as e:
        print(f"\ndemo: FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
