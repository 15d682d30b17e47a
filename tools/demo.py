#!/usr/bin/env python3
"""pyqcow demo (first cut): an overlay over a base, as pyqcow sees it.

Builds, in ./demo-out/ (recreated each run; --out DIR to choose):
    base.qcow2   64 MiB, written with qemu-io
    new.qcow2    overlay with backing file base.qcow2, some writes of its own
then runs `pyqcow info --backing-chain` and `pyqcow map --output=json` on
new.qcow2 and prints both, with qemu-img's view for comparison.

Run through tools/demo (which sets up .venv); exits 1 with a message if a tool
is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def run(argv: list[str], cwd: Path) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(
            f"demo: command failed (exit {proc.returncode}): {' '.join(argv)}\n"
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def show(title: str, argv: list[str], cwd: Path) -> None:
    print(f"\n$ {' '.join(argv)}    # {title}")
    print(run(argv, cwd).rstrip())


def pyqcow_command() -> list[str] | None:
    exe = shutil.which("pyqcow")
    if exe is None:
        return None
    probe = subprocess.run([exe, "--help"], capture_output=True, text=True, check=False)
    return [exe] if probe.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "demo-out",
        help="directory for the demo images (default: ./demo-out)",
    )
    args = ap.parse_args(argv)

    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"demo: {tool} not found (Debian: apt-get install qemu-utils)", file=sys.stderr)
            return 1

    out: Path = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    # Relative names from inside the directory: new.qcow2 records "base.qcow2".
    run(["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "64M"], out)
    run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0xb1 0 4M",
            "-c",
            "write -P 0xb2 32M 1M",
            "base.qcow2",
        ],
        out,
    )
    run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2"],
        out,
    )
    run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 1M 128k",
            "-c",
            "write -P 0x12 40M 64k",
            "-c",
            "write -z 33M 64k",
            "new.qcow2",
        ],
        out,
    )
    print(f"demo: made {out}/base.qcow2 <- {out}/new.qcow2")

    show("qemu-img's view", ["qemu-img", "info", "--backing-chain", "new.qcow2"], out)

    pyqcow = pyqcow_command()
    if pyqcow is None:
        print(
            "\ndemo: the `pyqcow` command is not runnable yet (not installed, or its CLI "
            "module pyqcow.cli.main is missing/broken); run tools/demo after it exists.",
            file=sys.stderr,
        )
        return 1

    show("pyqcow", [*pyqcow, "info", "--backing-chain", "new.qcow2"], out)
    show("pyqcow", [*pyqcow, "map", "--output=json", "new.qcow2"], out)
    show("qemu-img, for comparison", ["qemu-img", "map", "--output=json", "new.qcow2"], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
