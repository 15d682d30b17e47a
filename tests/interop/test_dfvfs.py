"""dfvfs (the `[forensics-test]` extra) reads QCOW evidence through this package.

dfvfs's QCOW path spec does ``import pyqcow`` and uses libyal's API
(``pyqcow.file().open_file_object(...)``, ``backing_filename``, ``set_parent``)
with its own file-like objects.  The evidence is a zstd-compressed chain that
libqcow refuses: an ext2 file system made by mkfs.ext2 on a raw file, converted
to a compressed base, and a compressed overlay holding what changed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from qemu import info_json, need, qemu_img, require_tool

import pyqcow

FS_SIZE = 8 << 20


def _import_dfvfs():
    try:
        from dfvfs.file_io import qcow_file_io
        from dfvfs.lib import definitions
        from dfvfs.path import factory
        from dfvfs.resolver import resolver
    except ImportError as e:
        msg = f"dfvfs is not installed (pip install -e '.[forensics-test]'): {e}"
        need(False, msg)
    return qcow_file_io, definitions, factory, resolver


def _mkfs_ext2(raw: Path, root: Path) -> None:
    mkfs = require_tool("mkfs.ext2")
    with open(raw, "wb") as f:
        f.truncate(FS_SIZE)
    subprocess.run([mkfs, "-q", "-F", "-b", "1024", "-d", str(root), str(raw)],
                   check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def evidence(tmp_path_factory) -> Path:
    require_tool("qemu-img")
    d = tmp_path_factory.mktemp("dfvfs")
    v1, v2 = d / "root1", d / "root2"
    v1.mkdir()
    (v1 / "hello.txt").write_bytes(b"hello from the base image\n")
    (v1 / "notes.txt").write_bytes(b"first version\n" * 300)
    (v1 / "big.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    _mkfs_ext2(d / "v1.raw", v1)
    v2.mkdir()
    for p in v1.iterdir():
        (v2 / p.name).write_bytes(p.read_bytes())
    (v2 / "notes.txt").write_bytes(b"second version, written in the overlay\n" * 200)
    (v2 / "added.txt").write_bytes(b"only in the overlay\n")
    _mkfs_ext2(d / "v2.raw", v2)
    zstd = ("-c", "-O", "qcow2", "-o", "compression_type=zstd")
    qemu_img("convert", "-q", "-f", "raw", *zstd, "v1.raw", "base.qcow2", cwd=d)
    # the overlay holds only the clusters where v2 differs from the base
    qemu_img("convert", "-q", "-f", "raw", *zstd, "-B", "base.qcow2", "-F", "qcow2",
             "v2.raw", "evidence.qcow2", cwd=d)
    info = info_json(d / "evidence.qcow2")
    assert info["backing-filename"] == "base.qcow2"
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    return d / "evidence.qcow2"


def test_dfvfs_reads_ext2_files_inside_a_zstd_chain(evidence):
    qcow_file_io, definitions, factory, resolver = _import_dfvfs()
    assert qcow_file_io.pyqcow is pyqcow  # dfvfs's `import pyqcow` is this package
    os_spec = factory.Factory.NewPathSpec(definitions.TYPE_INDICATOR_OS, location=str(evidence))
    qcow_spec = factory.Factory.NewPathSpec(definitions.TYPE_INDICATOR_QCOW, parent=os_spec)

    disk = resolver.Resolver.OpenFileObject(qcow_spec)
    assert disk.get_size() == FS_SIZE
    disk.seek(0)
    assert disk.read(FS_SIZE) == (evidence.parent / "v2.raw").read_bytes()

    def read(location: str) -> bytes:
        spec = factory.Factory.NewPathSpec(
            definitions.TYPE_INDICATOR_EXT, location=location, parent=qcow_spec)
        f = resolver.Resolver.OpenFileObject(spec)
        return f.read()

    assert read("/hello.txt") == b"hello from the base image\n"  # from the base
    assert read("/notes.txt") == b"second version, written in the overlay\n" * 200
    assert read("/added.txt") == b"only in the overlay\n"
    assert read("/big.bin") == bytes(range(256)) * 4096

    fs_spec = factory.Factory.NewPathSpec(
        definitions.TYPE_INDICATOR_EXT, location="/", parent=qcow_spec)
    fs = resolver.Resolver.OpenFileSystem(fs_spec)
    root = fs.GetFileEntryByPathSpec(fs_spec)
    names = {e.name for e in root.sub_file_entries}
    assert {"hello.txt", "notes.txt", "added.txt", "big.bin", "lost+found"} <= names
