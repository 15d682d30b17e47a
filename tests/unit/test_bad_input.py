"""Bad input (issue 2): every broken image gets one ``pyqcow: <file>: ...`` line,
exit status 1 (compare: 2), no traceback, within a second, with bounded memory.

The images are made by qemu-img/qemu-io and then patched in place with
``struct.pack_into`` at the offsets documented in ``HEADER_FIELDS`` (qcow2.rst
"Header") and by the table helpers below.
"""

from __future__ import annotations

import os
import random
import struct
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from qemu import create, create_luks, qemu_img, qemu_io, require_tool

from pyqcow.cli.main import main

KiB = 1024
CS = 64 * KiB  # cluster size of every base image here

# field -> (byte offset, struct format), big-endian (qcow2.rst "Header")
HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),  # v3 from here on
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}
FEATURE_TABLE_MAGIC = 0x6803F857
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62

MAX_SECONDS = 1.0
MAX_PEAK_BYTES = 32 * 1024 * 1024


# -- patching helpers ----------------------------------------------------------------------
def poke_at(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        buf = bytearray(struct.calcsize(fmt))
        struct.pack_into(fmt, buf, 0, value)
        f.write(buf)


def peek_at(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def poke(path: Path, name: str, value: int) -> None:
    offset, fmt = HEADER_FIELDS[name]
    poke_at(path, offset, fmt, value)


def peek(path: Path, name: str) -> int:
    offset, fmt = HEADER_FIELDS[name]
    return peek_at(path, offset, fmt)


def l1_entry_offset(path: Path, l1_index: int = 0) -> int:
    """File offset of active L1 entry ``l1_index``."""
    return peek(path, "l1_table_offset") + 8 * l1_index


def l2_entry_offset(path: Path, guest_offset: int) -> int:
    """File offset of the (standard, 8-byte) L2 entry mapping ``guest_offset``."""
    cb = peek(path, "cluster_bits")
    cluster = guest_offset >> cb
    l2_entries = 1 << (cb - 3)
    l1e = peek_at(path, l1_entry_offset(path, cluster // l2_entries), ">Q")
    return (l1e & L2E_OFFSET_MASK) + 8 * (cluster % l2_entries)


def beyond_eof(path: Path, clusters: int = 16) -> int:
    size = os.path.getsize(path)
    return (size + CS - 1) // CS * CS + clusters * CS


def feature_table_offset(path: Path) -> int:
    """File offset of the feature name table extension's data (v3 image)."""
    pos = peek(path, "header_length")
    while True:
        t, n = peek_at(path, pos, ">I"), peek_at(path, pos + 4, ">I")
        if t == FEATURE_TABLE_MAGIC:
            return pos + 8
        if t == 0:
            raise AssertionError("no feature name table")
        pos += 8 + (n + 7) // 8 * 8


# -- base images ----------------------------------------------------------------------------
def base_image(d: Path, name: str = "img.qcow2") -> Path:
    """4 MiB v3 image: data at 0, a compressed cluster at 1 MiB, data at 2 MiB."""
    p = create(d / name, 4 * 1024 * KiB)
    qemu_io(p, "write -P 0x5a 0 64k", "write -c -P 0x6b 1M 64k", "write -P 0x7c 2M 4k")
    return p


@dataclass
class Case:
    build: Callable[[Path], Path]  # makes the image, returns the path to give pyqcow
    match: str  # substring of the error message
    fail: tuple[str, ...] = ("info", "map", "convert", "compare")  # commands that must fail
    ok: tuple[str, ...] = ()  # commands that must succeed
    culprit: Callable[[Path], Path] | None = None  # file the message names (default: image)
    fmt: str | None = None
    info_args: tuple[str, ...] = field(default=())


def patched(**fields: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = base_image(d)
        for name, value in fields.items():
            poke(p, name, value)
        return p

    return build


def _truncated(length: Callable[[Path], int]) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = base_image(d)
        os.truncate(p, length(p))
        return p

    return build


def _garbage(d: Path) -> Path:
    p = d / "garbage.qcow2"
    rnd = random.Random(1234)
    p.write_bytes(b"QFI\xfb" + bytes(rnd.getrandbits(8) for _ in range(3 * CS)))
    return p


def _garbage_no_magic(d: Path) -> Path:
    p = d / "noise.bin"
    rnd = random.Random(99)
    p.write_bytes(bytes(rnd.getrandbits(8) for _ in range(3 * CS)))
    return p


def _l1_unaligned(d: Path) -> Path:
    p = base_image(d)
    poke(p, "l1_table_offset", peek(p, "l1_table_offset") + 512)
    return p


def _l1_beyond(d: Path) -> Path:
    p = base_image(d)
    poke(p, "l1_table_offset", beyond_eof(p))
    return p


def _reftable_unaligned(d: Path) -> Path:
    p = base_image(d)
    poke(p, "refcount_table_offset", peek(p, "refcount_table_offset") + 8)
    return p


def _reftable_beyond(d: Path) -> Path:
    p = base_image(d)
    poke(p, "refcount_table_offset", beyond_eof(p))
    return p


def _snapshots_at(offset: Callable[[Path], int]) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = base_image(d)
        poke(p, "nb_snapshots", 1)
        poke(p, "snapshots_offset", offset(p))
        return p

    return build


def _snapshot_extra_data(d: Path) -> Path:
    p = base_image(d)
    qemu_img("snapshot", "-c", "s1", p)
    poke_at(p, peek(p, "snapshots_offset") + 36, ">I", 0xFFFF)  # extra_data_size
    return p


def _snapshot_l1_unaligned(d: Path) -> Path:
    p = base_image(d)
    qemu_img("snapshot", "-c", "s1", p)
    sn = peek(p, "snapshots_offset")
    poke_at(p, sn, ">Q", peek_at(p, sn, ">Q") + 512)  # l1_table_offset of entry 0
    return p


def _backing_name(size: int, offset: int | None = None) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        (d / "base.qcow2").touch()
        p = create(d / "top.qcow2", 1024 * KiB, backing="base.qcow2", backing_fmt="qcow2",
                   unsafe=True)
        if offset is not None:
            poke(p, "backing_file_offset", offset)
        poke(p, "backing_file_size", size)
        return p

    return build


def _entry(where: Callable[[Path], int], value: Callable[[Path], int]) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = base_image(d)
        poke_at(p, where(p), ">Q", value(p))
        return p

    return build


def _compressed_past_eof(p: Path) -> int:
    e = peek_at(p, l2_entry_offset(p, 1024 * KiB), ">Q")
    assert e & COMPRESSED
    shift = 62 - (16 - 8)
    return (e & ~((1 << shift) - 1)) | beyond_eof(p)


def _compressed_garbage(p: Path) -> int:
    # point the compressed cluster at the plain data cluster of guest offset 0
    e = peek_at(p, l2_entry_offset(p, 1024 * KiB), ">Q")
    host = peek_at(p, l2_entry_offset(p, 0), ">Q") & L2E_OFFSET_MASK
    shift = 62 - (16 - 8)
    return (e & ~((1 << shift) - 1)) | host


def _loop(d: Path) -> Path:
    create(d / "a.qcow2", 1024 * KiB, backing="b.qcow2", backing_fmt="qcow2", unsafe=True)
    create(d / "b.qcow2", 1024 * KiB, backing="a.qcow2", backing_fmt="qcow2", unsafe=True)
    return d / "a.qcow2"


def _self_reference(d: Path) -> Path:
    return create(d / "self.qcow2", 1024 * KiB, backing="self.qcow2", backing_fmt="qcow2",
                  unsafe=True)


def _missing_backing(d: Path) -> Path:
    return create(d / "top.qcow2", 1024 * KiB, backing="gone.qcow2", backing_fmt="qcow2",
                  unsafe=True)


def _backing_directory(d: Path) -> Path:
    (d / "dir.qcow2").mkdir()
    return create(d / "top.qcow2", 1024 * KiB, backing="dir.qcow2", backing_fmt="qcow2",
                  unsafe=True)


def _directory(d: Path) -> Path:
    (d / "adir").mkdir()
    return d / "adir"


def _nonexistent(d: Path) -> Path:
    return d / "does-not-exist.qcow2"


def _unknown_bit_named(d: Path) -> Path:
    p = base_image(d)
    # rename the table's first entry (incompatible bit 0, "dirty bit") to bit 5
    table = feature_table_offset(p)
    poke_at(p, table, ">B", 0)
    poke_at(p, table + 1, ">B", 5)
    with open(p, "r+b") as f:
        f.seek(table + 2)
        f.write(b"quantum entanglement".ljust(46, b"\0"))
    poke(p, "incompatible_features", 1 << 5)
    return p


def _luks(d: Path) -> Path:
    return create_luks(d / "luks.qcow2")


def _sub(name: str) -> Callable[[Path], Path]:
    return lambda d: d / name


DATA = ("map", "convert", "compare")
CHAIN = ("map", "convert", "compare", "info-chain")

CASES: dict[str, Case] = {
    "truncated-header": Case(_truncated(lambda p: 50), "too short"),
    "truncated-v3-header": Case(_truncated(lambda p: 90), "too short"),
    "truncated-tables": Case(_truncated(lambda p: peek(p, "l1_table_offset")), "beyond the end"),
    "truncated-l2": Case(_truncated(lambda p: peek(p, "l1_table_offset") + CS),
                         "beyond the end of the file", fail=DATA, ok=("info",)),
    "empty-file-as-qcow2": Case(lambda d: (d / "empty.qcow2").write_bytes(b"") or d / "empty.qcow2",
                                "empty file", fmt="qcow2", fail=("info", "map", "convert")),
    "garbage": Case(_garbage, "version"),
    "garbage-as-qcow2": Case(_garbage_no_magic, "bad magic", fmt="qcow2",
                             fail=("info", "map", "convert")),
    "cluster_bits-8": Case(patched(cluster_bits=8), "cluster_bits 8"),
    "cluster_bits-63": Case(patched(cluster_bits=63), "cluster_bits 63"),
    "l1_size-2^31": Case(patched(l1_size=1 << 31), "L1 table too large"),
    "l1_size-too-small": Case(patched(l1_size=0), "L1 table too small"),
    "virtual-size-2^62": Case(patched(size=1 << 62), "virtual size"),
    "l1-unaligned": Case(_l1_unaligned, "not cluster-aligned"),
    "l1-beyond-eof": Case(_l1_beyond, "beyond the end of the file"),
    "reftable-unaligned": Case(_reftable_unaligned, "not cluster-aligned"),
    "reftable-beyond-eof": Case(_reftable_beyond, "beyond the end of the file"),
    "reftable-too-large": Case(patched(refcount_table_clusters=1 << 20), "refcount table too large"),
    "reftable-empty": Case(patched(refcount_table_clusters=0), "refcount table is empty"),
    "snapshots-unaligned": Case(_snapshots_at(lambda p: beyond_eof(p, 0) - CS + 8),
                                "not cluster-aligned"),
    "snapshots-beyond-eof": Case(_snapshots_at(lambda p: beyond_eof(p)), "beyond the end"),
    "nb_snapshots-huge": Case(patched(nb_snapshots=0xFFFFFFFF), "too many snapshots"),
    "snapshot-extra-data-too-large": Case(_snapshot_extra_data, "too much extra data",
                                          fail=("info",), ok=("map",)),
    "snapshot-l1-unaligned": Case(_snapshot_l1_unaligned, "not cluster-aligned",
                                  fail=("info",), ok=("map",)),
    "refcount_order-7": Case(patched(refcount_order=7), "refcount_order 7"),
    "header_length-50": Case(patched(header_length=50), "header_length 50"),
    "header_length-past-cluster": Case(patched(header_length=CS + 8), "header_length"),
    "backing-name-too-long": Case(_backing_name(2000), "too long"),
    "backing-name-outside-cluster0": Case(_backing_name(10, offset=CS + 8), "first cluster"),
    "backing-name-crosses-cluster0": Case(_backing_name(100, offset=CS - 50), "first cluster"),
    "l1-entry-past-eof": Case(_entry(lambda p: l1_entry_offset(p), lambda p: COPIED | beyond_eof(p)),
                              "beyond the end of the file", fail=DATA, ok=("info",)),
    "l1-entry-unaligned": Case(_entry(lambda p: l1_entry_offset(p),
                                      lambda p: peek_at(p, l1_entry_offset(p), ">Q") + 512),
                               "unaligned", fail=DATA, ok=("info",)),
    "l2-entry-past-eof": Case(_entry(lambda p: l2_entry_offset(p, 0),
                                     lambda p: COPIED | beyond_eof(p)),
                              "beyond the end of the file", fail=DATA, ok=("info",)),
    "l2-entry-unaligned": Case(_entry(lambda p: l2_entry_offset(p, 0),
                                      lambda p: peek_at(p, l2_entry_offset(p, 0), ">Q") + 512),
                               "malformed", fail=DATA, ok=("info",)),
    "compressed-past-eof": Case(_entry(lambda p: l2_entry_offset(p, 1024 * KiB),
                                       _compressed_past_eof),
                                "beyond the end of the file", fail=("convert", "compare"),
                                ok=("info", "map")),
    "compressed-garbage": Case(_entry(lambda p: l2_entry_offset(p, 1024 * KiB),
                                      _compressed_garbage),
                               "compressed cluster", fail=("convert", "compare"),
                               ok=("info", "map")),
    "backing-loop": Case(_loop, "loops", fail=CHAIN, ok=("info",), culprit=_sub("b.qcow2")),
    "backing-self-reference": Case(_self_reference, "loops", fail=CHAIN, ok=("info",)),
    "backing-missing": Case(_missing_backing, "not found", fail=CHAIN, ok=("info",)),
    "backing-is-directory": Case(_backing_directory, "directory", fail=CHAIN, ok=("info",),
                                 culprit=_sub("dir.qcow2")),
    "directory": Case(_directory, "is a directory"),
    "nonexistent": Case(_nonexistent, "no such file"),
    "unknown-incompatible-bit": Case(patched(incompatible_features=1 << 9),
                                     "unknown incompatible feature bit 9"),
    "unknown-incompatible-bit-named": Case(_unknown_bit_named, "quantum entanglement"),
    "compression-bit-without-type": Case(patched(incompatible_features=1 << 3),
                                         "compression"),
    "encryption-aes": Case(patched(crypt_method=1), "AES"),
    "encryption-luks": Case(_luks, "LUKS"),
}


@dataclass
class Outcome:
    status: int
    out: str
    err: str
    seconds: float
    peak: int


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Outcome:
    capsys.readouterr()
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        status = main(argv)
    finally:
        seconds = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    out, err = capsys.readouterr()
    return Outcome(status, out, err, seconds, peak)


def argv_for(cmd: str, path: Path, tmp: Path, fmt: str | None) -> list[str]:
    f = ["-f", fmt] if fmt else []
    if cmd == "info":
        return ["info", *f, str(path)]
    if cmd == "info-chain":
        return ["info", "--backing-chain", *f, str(path)]
    if cmd == "map":
        return ["map", "--output=json", *f, str(path)]
    if cmd == "convert":
        return ["convert", "-O", "raw", *f, str(path), str(tmp / "out.raw")]
    if cmd == "compare":
        return ["compare", *f, str(path), str(path)]
    raise AssertionError(cmd)


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    d = tmp_path / "img"
    d.mkdir()
    path = case.build(d)
    culprit = case.culprit(d) if case.culprit else path
    for cmd in case.fail:
        o = run_cli(argv_for(cmd, path, tmp_path, case.fmt), capsys)
        expected_status = 2 if cmd == "compare" else 1
        assert o.status == expected_status, f"{cmd}: exit {o.status}, stderr {o.err!r}"
        lines = o.err.splitlines()
        assert len(lines) == 1, f"{cmd}: stderr is not one line: {o.err!r}"
        assert "Traceback" not in o.err and "internal error" not in o.err
        assert lines[0].startswith(f"pyqcow: {culprit}: "), f"{cmd}: {lines[0]!r}"
        assert case.match in lines[0], f"{cmd}: {lines[0]!r}"
        assert o.seconds < MAX_SECONDS, f"{cmd} took {o.seconds:.2f} s"
        assert o.peak < MAX_PEAK_BYTES, f"{cmd} peaked at {o.peak} bytes"
    for cmd in case.ok:
        o = run_cli(argv_for(cmd, path, tmp_path, case.fmt), capsys)
        assert o.status == 0, f"{cmd} should succeed (as qemu-img does): {o.err!r}"


def test_info_of_broken_chain_shows_backing_name(tmp_path: Path, capsys) -> None:
    """qemu-img info opens no backing file: a broken chain can still be inspected."""
    path = _missing_backing(tmp_path)
    o = run_cli(["info", str(path)], capsys)
    assert o.status == 0
    assert "backing file: gone.qcow2" in o.out


def test_usage_errors_do_not_trace(capsys) -> None:
    for argv, status in ((["info"], 1), (["compare", "a"], 2), (["nosuch"], 1),
                         (["map", "--start-offset", "12q", "x"], 1), ([], 1)):
        o = run_cli(argv, capsys)
        assert o.status == status, argv
        assert "Traceback" not in o.err
