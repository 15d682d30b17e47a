"""Issue 11 (trustworthy workflow): rebase loops, ``-f FMT``, the XML pre-flight
and ``xml sync`` after a merge, ``write_atomic`` without umask changes.

In-process CLI tests (``pyqcow.cli.main.main``), images made with pyqcow's API.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import pyqcow
from pyqcow.cli.main import main
from pyqcow.create import create

KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB


def write(path: Path, offset: int, data: bytes) -> None:
    with pyqcow.open(path, "r+") as img:
        img.write(offset, data)
        img.flush()


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def snapshot_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    """base.qcow2 (data) <- top.qcow2 (data)."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    create(base, SIZE)
    write(base, 0, b"\xb0" * (256 * KiB))
    create(top, backing="base.qcow2", backing_format="qcow2")
    write(top, MiB, b"\x70" * (128 * KiB))
    return base, top


# -- item 18: a rebase that would make a loop --------------------------------------------
@pytest.mark.parametrize("unsafe", [False, True], ids=["safe", "unsafe"])
def test_rebase_onto_own_overlay_refused_as_loop(chain, capsys, unsafe):
    base, top = chain
    before = snapshot_files(base.parent)
    argv = ["rebase", *(["-u"] if unsafe else []), "-F", "qcow2", "-b", "top.qcow2", base]
    status, _, err = run(capsys, *argv)
    assert status == 1, err
    assert len(err.splitlines()) == 1, err
    assert "loop" in err and "holds the image" not in err, err
    # the message names the chain: base -> top -> base
    assert "base.qcow2 -> " in err and "top.qcow2 -> " in err, err
    assert snapshot_files(base.parent) == before


@pytest.mark.parametrize("unsafe", [False, True], ids=["safe", "unsafe"])
def test_rebase_onto_itself_refused_as_loop(chain, capsys, unsafe):
    base, top = chain
    before = snapshot_files(base.parent)
    argv = ["rebase", *(["-u"] if unsafe else []), "-F", "qcow2", "-b", "top.qcow2", top]
    status, _, err = run(capsys, *argv)
    assert status == 1, err
    assert "loop" in err and "holds the image" not in err, err
    assert snapshot_files(base.parent) == before


def test_rebase_loop_api(chain):
    from pyqcow.errors import BackingChainError
    from pyqcow.ops.rebase import rebase

    base, top = chain
    with pytest.raises(BackingChainError, match=r"loop.*base\.qcow2 -> .*top\.qcow2 -> .*base"):
        rebase(base, "top.qcow2", backing_format="qcow2")
    with pytest.raises(BackingChainError, match="loop"):
        rebase(base, "top.qcow2", backing_format="qcow2", unsafe=True)


def test_rebase_onto_sibling_still_works(chain, capsys):
    base, top = chain
    other = base.parent / "other.qcow2"
    create(other, SIZE)
    status, _, err = run(capsys, "rebase", "-F", "qcow2", "-b", "other.qcow2", top)
    assert status == 0, err
    with pyqcow.open(top) as img:
        assert img.read(0, 256 * KiB) == b"\xb0" * (256 * KiB)
        assert img.read(MiB, 128 * KiB) == b"\x70" * (128 * KiB)
