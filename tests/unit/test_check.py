"""pyqcow.check without qemu: images built by hand, corrupted by hand.

The layout of the images built here (64 KiB clusters unless asked otherwise):
cluster 0 header, 1 refcount table, 2 refcount block, 3 L1 table, 4 L2 table,
5.. data clusters for guest clusters 0.. (one per entry of ``data``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import struct
from array import array
from pathlib import Path

import pytest

import pyqcow
from pyqcow import entries, spec
from pyqcow.check_result import CheckFailed, CheckResult
from pyqcow.cli import check as cli_check
from pyqcow.cli.output import qemu_json
from pyqcow.header import Header, build_cluster0
from pyqcow.ops.check import check

COPIED = spec.QCOW_OFLAG_COPIED


def build_image(
    path: Path,
    data: list[bytes],
    *,
    cluster_bits: int = 16,
    refcount_order: int = 4,
    size: int = 64 << 20,
    incompatible: int = 0,
    compatible: int = 0,
) -> Path:
    cs = 1 << cluster_bits
    assert len(data) <= cs // 8
    l2_entries = cs // 8
    l1_size = -(-size // (cs * l2_entries))
    assert l1_size * 8 <= cs
    header = Header(
        version=3,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=3 * cs,
        refcount_table_offset=cs,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        incompatible_features=incompatible,
        compatible_features=compatible,
        refcount_order=refcount_order,
        header_length=112,
        extra_fields=bytes(8),
    )
    nclusters = 5 + len(data)
    buf = bytearray(nclusters * cs)
    buf[:cs] = build_cluster0(header).ljust(cs, b"\0")
    buf[cs : cs + 8] = struct.pack(">Q", 2 * cs)
    block = entries.RefcountBlock(bytes(cs), refcount_order)
    for c in range(nclusters):
        block.set(c, 1)
    buf[2 * cs : 3 * cs] = block.tobytes()
    buf[3 * cs : 3 * cs + 8] = struct.pack(">Q", (4 * cs) | COPIED)
    l2 = array("Q", [((5 + i) * cs) | COPIED for i in range(len(data))])
    buf[4 * cs : 4 * cs + 8 * len(l2)] = entries.encode_u64_table(l2)
    for i, d in enumerate(data):
        buf[(5 + i) * cs : (5 + i) * cs + len(d)] = d
    path.write_bytes(bytes(buf))
    return path


def peek64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def poke64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def set_refcount(path: Path, cluster: int, value: int, cs: int = 65536, order: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(2 * cs)
        block = entries.RefcountBlock(f.read(cs), order)
        block.set(cluster, value)
        f.seek(2 * cs)
        f.write(block.tobytes())


def stored_refcount(path: Path, cluster: int, cs: int = 65536, order: int = 4) -> int:
    with open(path, "rb") as f:
        f.seek(peek64(path, cs) & spec.REFT_OFFSET_MASK)
        return entries.RefcountBlock(f.read(cs), order).get(cluster)


DATA = [bytes([0x10 + i]) * 65536 for i in range(4)]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return build_image(tmp_path / "img.qcow2", DATA)


def append_leak(path: Path, cs: int = 65536, order: int = 4) -> int:
    """Append a cluster nothing references and give it refcount 1; returns its index."""
    cluster = -(-path.stat().st_size // cs)
    with open(path, "r+b") as f:
        f.truncate((cluster + 1) * cs)
    set_refcount(path, cluster, 1, cs, order)
    return cluster


def read_guest(path: Path, length: int = 4 * 65536) -> bytes:
    with pyqcow.open(path) as img:
        return img.read(0, length)


# --- result rendering ------------------------------------------------------------


def test_json_keys_present_only_when_nonzero() -> None:
    r = CheckResult("x.qcow2", image_end_offset=262144, total_clusters=1024)
    assert r.as_qemu_json() == {
        "filename": "x.qcow2",
        "format": "qcow2",
        "check-errors": 0,
        "image-end-offset": 262144,
        "total-clusters": 1024,
    }
    r = CheckResult(
        "x",
        corruptions=2,
        leaks=1,
        leaks_fixed=3,
        corruptions_fixed=4,
        allocated_clusters=5,
        fragmented_clusters=6,
        compressed_clusters=7,
    )
    assert set(r.as_qemu_json()) == {
        "filename",
        "format",
        "check-errors",
        "corruptions",
        "leaks",
        "leaks-fixed",
        "corruptions-fixed",
        "allocated-clusters",
        "fragmented-clusters",
        "compressed-clusters",
    }


def test_json_text_is_qemus() -> None:
    # qemu-img 7.2 printed exactly this for a 64 MiB image with 1 MiB written
    # and 128 KiB compressed
    r = CheckResult(
        "a.qcow2",
        image_end_offset=1441792,
        total_clusters=1024,
        allocated_clusters=18,
        fragmented_clusters=2,
        compressed_clusters=2,
    )
    assert qemu_json(r.as_qemu_json()) == (
        "{\n"
        '    "image-end-offset": 1441792,\n'
        '    "compressed-clusters": 2,\n'
        '    "total-clusters": 1024,\n'
        '    "check-errors": 0,\n'
        '    "allocated-clusters": 18,\n'
        '    "filename": "a.qcow2",\n'
        '    "format": "qcow2",\n'
        '    "fragmented-clusters": 2\n'
        "}"
    )


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({}, 0),
        ({"leaks": 1}, 3),
        ({"corruptions": 1, "leaks": 1}, 2),
        ({"check_errors": 1}, 1),
        ({"leaks_fixed": 4}, 0),
    ],
)
def test_exit_codes(fields: dict, status: int) -> None:
    assert CheckResult("x", **fields).exit_code == status


def test_human_report() -> None:
    clean = CheckResult(
        "x",
        image_end_offset=1441792,
        total_clusters=1024,
        allocated_clusters=18,
        fragmented_clusters=2,
        compressed_clusters=2,
    )
    assert cli_check.human_report(clean) == (
        "No errors were found on the image.\n"
        "18/1024 = 1.76% allocated, 11.11% fragmented, 11.11% compressed clusters\n"
        "Image end offset: 1441792\n"
    )
    bad = CheckResult("x", corruptions=3, leaks=2, image_end_offset=65536, total_clusters=16)
    assert cli_check.human_report(bad) == (
        "\n3 errors were found on the image.\n"
        "Data may be corrupted, or further writes to the image may corrupt it.\n"
        "\n2 leaked clusters were found on the image.\n"
        "This means waste of disk space, but no harm to data.\n"
        "Image end offset: 65536\n"
    )
    fixed = CheckResult("x", leaks_fixed=2, corruptions_fixed=1, image_end_offset=65536)
    assert cli_check.human_report(fixed).startswith(
        "The following inconsistencies were found and repaired:\n\n"
        "    2 leaked clusters\n    1 corruptions\n\nDouble checking the fixed image now...\n"
        "No errors were found on the image.\n"
    )


# --- checking ---------------------------------------------------------------------


def test_clean_image(image: Path) -> None:
    r = check(image)
    assert r.as_qemu_json() == {
        "filename": str(image),
        "format": "qcow2",
        "check-errors": 0,
        "image-end-offset": 9 * 65536,
        "total-clusters": 1024,
        "allocated-clusters": 4,
    }
    assert r.messages == []


@pytest.mark.parametrize("order", range(7))
def test_every_refcount_width(tmp_path: Path, order: int) -> None:
    p = build_image(tmp_path / "w.qcow2", DATA, refcount_order=order)
    assert check(p).clean
    set_refcount(p, 20, 1, order=order)  # beyond the file: qemu does not look there
    assert check(p).clean
    with open(p, "r+b") as f:
        f.truncate(12 * 65536)
    set_refcount(p, 11, 1, order=order)
    r = check(p)
    assert (r.leaks, r.corruptions) == (1, 0)
    assert r.messages == ["Leaked cluster 11 refcount=1 reference=0"]
    r = check(p, "leaks")
    assert (r.leaks, r.leaks_fixed) == (0, 1)
    assert stored_refcount(p, 11, order=order) == 0
    assert check(p).clean


def test_small_clusters(tmp_path: Path) -> None:
    p = build_image(tmp_path / "s.qcow2", [b"\x42" * 512] * 30, cluster_bits=9, size=1 << 20)
    r = check(p)
    assert r.clean and r.allocated_clusters == 30 and r.total_clusters == 2048


def test_leak_is_repaired_by_leaks(image: Path) -> None:
    leaked = append_leak(image)
    r = check(image)
    assert (r.leaks, r.corruptions, r.exit_code) == (1, 0, 3)
    r = check(image, "leaks")
    assert r.leaks_fixed == 1 and r.clean
    assert stored_refcount(image, leaked) == 0
    assert read_guest(image) == b"".join(DATA)


def test_shared_refcount_is_a_leak_and_a_copied_error(image: Path) -> None:
    set_refcount(image, 6, 2)  # refcount 2, one reference: leak, and COPIED now wrong
    r = check(image)
    assert (r.leaks, r.corruptions, r.exit_code) == (1, 1, 2)
    r = check(image, "leaks")  # qemu fixes COPIED under -r leaks once the leak is gone
    assert (r.leaks_fixed, r.corruptions_fixed) == (1, 0) and r.clean
    assert stored_refcount(image, 6) == 1


def test_refcount_zero_needs_rebuild(image: Path) -> None:
    set_refcount(image, 5, 0)
    r = check(image)
    # refcount 0 for a referenced cluster, and its COPIED flag now wrong
    assert (r.corruptions, r.exit_code) == (2, 2)
    assert r.messages == [
        "ERROR cluster 5 refcount=0 reference=1",
        "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0",
    ]
    with pytest.raises(CheckFailed, match="Check failed"):
        check(image, "leaks")
    r = check(image, "all")
    assert r.clean and r.corruptions_fixed == 1
    assert "Rebuilding refcount structure" in r.messages
    assert check(image).clean
    assert read_guest(image) == b"".join(DATA)
    # the new structure lives elsewhere; the old one was freed
    assert peek64(image, 48) != 65536


def test_rebuild_with_no_refcount_block_at_all(image: Path) -> None:
    poke64(image, 65536, 0)
    r = check(image)
    assert r.corruptions == 9 + 4  # every cluster, plus the COPIED flags of the data
    r = check(image, "all")
    assert r.clean
    assert check(image).clean
    assert read_guest(image) == b"".join(DATA)


def test_copied_flag(image: Path) -> None:
    poke64(image, 4 * 65536 + 8, 6 * 65536)  # COPIED cleared
    r = check(image)
    assert r.corruptions == 1
    assert r.messages == ["ERROR OFLAG_COPIED data cluster: l2_entry=60000 refcount=1"]
    r = check(image, "all")
    assert r.corruptions_fixed == 1 and r.clean
    assert peek64(image, 4 * 65536 + 8) == 6 * 65536 | COPIED


def test_l2_entry_past_eof(image: Path) -> None:
    poke64(image, 4 * 65536 + 8 * 2, (100 << 20) | COPIED)
    r = check(image)
    assert r.corruptions == 2
    assert r.leaks == 1  # the cluster that entry used to point at
    r = check(image, "all")
    # as qemu: the dangling entry stays (1 corruption), its COPIED flag is fixed
    assert (r.corruptions, r.corruptions_fixed, r.leaks_fixed) == (1, 1, 1)


def test_overlapping_metadata_is_a_corruption(image: Path) -> None:
    poke64(image, 4 * 65536 + 8 * 3, 3 * 65536 | COPIED)  # data "in" the L1 table
    r = check(image)
    assert "ERROR cluster 3 refcount=1 reference=2" in r.messages
    assert r.corruptions >= 1


def test_corrupt_bit_cleared_by_repair(tmp_path: Path) -> None:
    p = build_image(tmp_path / "c.qcow2", DATA, incompatible=spec.Incompat.CORRUPT)
    with pytest.raises(pyqcow.CorruptImageError):
        pyqcow.open(p, "r+")
    with pytest.warns(UserWarning):
        pyqcow.open(p).close()
    assert check(p).clean  # check itself opens it without complaint
    r = check(p, "leaks")
    assert r.clean
    assert not peek64(p, 72) & spec.Incompat.CORRUPT
    pyqcow.open(p, "r+").close()


def test_dirty_image_repaired_on_rw_open(tmp_path: Path) -> None:
    p = build_image(
        tmp_path / "d.qcow2",
        DATA,
        incompatible=spec.Incompat.DIRTY,
        compatible=spec.Compat.LAZY_REFCOUNTS,
    )
    set_refcount(p, 7, 0)  # refcounts stale, as lazy refcounts leave them
    set_refcount(p, 8, 0)
    assert check(p).corruptions == 4
    assert peek64(p, 72) & spec.Incompat.DIRTY  # a read-only check does not repair
    with pyqcow.open(p, "r+") as img:
        assert not img.header.dirty
        assert img.refcounts.get(7) == 1
        img.write(4 * 65536, b"\x99" * 65536)
    assert not peek64(p, 72) & spec.Incompat.DIRTY
    assert check(p).clean
    assert read_guest(p, 5 * 65536) == b"".join(DATA) + b"\x99" * 65536


def test_check_on_open_image(image: Path) -> None:
    leaked = append_leak(image)
    with pyqcow.open(image, "r+") as img:
        r = check(img, "leaks")
        assert r.leaks_fixed == 1
        assert img.refcounts.get(leaked) == 0
        img.write(0, b"\x01" * 100)
    assert check(image).clean
    with pyqcow.open(image) as img, pytest.raises(pyqcow.QcowError, match="read-write"):
        check(img, "all")


def test_bad_repair_mode(image: Path) -> None:
    with pytest.raises(pyqcow.QcowError, match="repair mode"):
        check(image, "everything")


def test_not_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(65536))
    with pytest.raises(pyqcow.QcowError, match="does not support checks"):
        check(raw)


def test_api_export(image: Path) -> None:
    assert pyqcow.check(image).clean
    assert "check" in pyqcow.__all__


# --- the CLI module ----------------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli_check.register(sub)
    args = parser.parse_args(["check", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_check.run(args)
    return status, out.getvalue(), err.getvalue()


def test_cli(image: Path) -> None:
    status, out, err = run_cli(str(image))
    assert (status, err) == (0, "")
    assert out.startswith("No errors were found on the image.\n4/1024 = 0.39% allocated")
    leaked = append_leak(image)
    status, out, err = run_cli("--output", "json", str(image))
    assert status == 3
    assert json.loads(out)["leaks"] == 1
    assert err == f"Leaked cluster {leaked} refcount=1 reference=0\n"
    status, out, err = run_cli("-r", "leaks", str(image))
    assert status == 0
    assert "    1 leaked clusters\n" in out
    assert err == (
        f"Leaked cluster {leaked} refcount=1 reference=0\n"
        f"Repairing cluster {leaked} refcount=1 reference=0\n"
    )
    status, out, _ = run_cli("-q", str(image))
    assert (status, out) == (0, "")


def test_nonzero_entries_agrees_with_a_plain_scan():
    """The sparse-table fast path (a byte search) finds exactly the non-zero entries."""
    import random
    from array import array

    from pyqcow.walk import nonzero_entries as _nonzero_entries

    rnd = random.Random(7)
    for extended in (False, True):
        width = 2 if extended else 1
        for density in (0.0, 0.0005, 0.01, 0.05, 0.2, 0.9, 1.0):
            n = 8192
            table = array("Q", bytes(8 * n))
            for i in range(n):
                if rnd.random() < density:
                    table[i] = rnd.choice([1, 1 << 63, rnd.getrandbits(64) or 1])
            expected = [i for i in range(n // width)
                        if any(table[i * width + k] for k in range(width))]
            assert list(_nonzero_entries(table, extended)) == expected, (extended, density)


def test_repair_writes_header_l1_and_refcount_table_only_through_the_door(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repair that rebuilds the refcount structure and fixes an L1 COPIED flag
    writes the header, the active L1 and the refcount table only inside the
    image's metadata door (pyqcow/writer.py)."""
    from pyqcow.hostfile import HostFile
    from pyqcow.image import QcowImage

    cs = 65536
    set_refcount(image, 5, 0)  # forces a rebuild
    poke64(image, 3 * cs, 4 * cs)  # active L1 entry 0 without COPIED
    inside: list[str] = []
    calls: list[str] = []
    writes: list[tuple[int, int, bool]] = []
    real_pwrite = HostFile.pwrite

    def pwrite(self, data, offset):
        writes.append((offset, len(data), bool(inside)))
        return real_pwrite(self, data, offset)

    monkeypatch.setattr(HostFile, "pwrite", pwrite)
    for name in ("switch_header", "write_l1_entry", "write_refcount_table", "replace_active_l1"):
        real = getattr(QcowImage, name)

        def door(self, *a, _real=real, _name=name, **k):
            inside.append(_name)
            calls.append(_name)
            try:
                return _real(self, *a, **k)
            finally:
                inside.pop()

        monkeypatch.setattr(QcowImage, name, door)
    r = check(image, "all")
    assert r.clean and "Rebuilding refcount structure" in r.messages
    assert {"switch_header", "write_l1_entry", "write_refcount_table"} <= set(calls)
    new_reftable = peek64(image, 48)
    assert new_reftable != cs
    guarded = [(0, cs), (3 * cs, 8), (new_reftable, cs)]  # header, active L1, new reftable
    for offset, length, in_door in writes:
        for start, size in guarded:
            if offset < start + size and start < offset + length:
                assert in_door, (offset, length)
    assert peek64(image, 3 * cs) == 4 * cs | COPIED
    assert read_guest(image) == b"".join(DATA)
