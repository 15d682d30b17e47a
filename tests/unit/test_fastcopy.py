"""Tests for pyqcow.fastcopy, each run with the C helper and the fallback."""

from __future__ import annotations

import array
import errno
import mmap
import os
import random
from collections.abc import Callable, Iterator

import pytest
from host_needs import require_native

from pyqcow import fastcopy

MiB = 1 << 20


class _NoNative:
    """Stands in for pyqcow._native in fallback mode: any use is a bug."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"fallback mode touched pyqcow._native.{name}")


@pytest.fixture(params=["native", "python"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test with the C helper, then with the pure-Python fallback."""
    if request.param == "native":
        require_native()
    else:
        fastcopy.native_available()  # import attempt done before the stand-in goes in
        monkeypatch.setattr(fastcopy, "_native", _NoNative())
    with fastcopy.backend(request.param):
        assert fastcopy.current_backend() == request.param
        yield request.param


@pytest.fixture
def open_file(tmp_path) -> Iterator[Callable[..., int]]:
    """open_file(name, data=b"", flags=O_RDWR) -> fd of a new file holding data."""
    fds: list[int] = []

    def opener(name: str, data: bytes = b"", flags: int = os.O_RDWR) -> int:
        path = tmp_path / name
        path.write_bytes(data)
        fd = os.open(path, flags)
        fds.append(fd)
        return fd

    yield opener
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def read_all(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def holes_supported(fd: int) -> bool:
    """Whether the file system reports holes through SEEK_HOLE (fd: empty file)."""
    os.ftruncate(fd, 2 * MiB)
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) == 0
    except OSError:
        return False
    finally:
        os.ftruncate(fd, 0)


# --------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------


def test_env_forces_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYQCOW_NO_NATIVE", "1")
    assert fastcopy.current_backend() == "python"
    with fastcopy.backend("python"):
        assert fastcopy.current_backend() == "python"
    monkeypatch.setenv("PYQCOW_NO_NATIVE", "0")
    expected = "native" if fastcopy.native_available() else "python"
    assert fastcopy.current_backend() == expected


def test_unknown_backend_rejected() -> None:
    with pytest.raises(ValueError, match="unknown fastcopy backend"), fastcopy.backend("rust"):  # type: ignore[arg-type]
        pass


def test_native_backend_overrides_env(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYQCOW_NO_NATIVE", "1")
    assert fastcopy.current_backend() == mode


# --------------------------------------------------------------------------
# copy_range
# --------------------------------------------------------------------------


def test_copy_range_between_files(mode: str, open_file) -> None:
    data = pattern(300_000, 1)
    src = open_file("src", data)
    dst = open_file("dst", b"\xff" * 10)
    fastcopy.copy_range(src, 1234, dst, 5, 200_001)
    assert read_all(dst) == b"\xff" * 5 + data[1234 : 1234 + 200_001]


def test_copy_range_zero_length_is_a_no_op(mode: str, open_file) -> None:
    src = open_file("src", b"abc")
    dst = open_file("dst", b"xyz")
    fastcopy.copy_range(src, 0, dst, 100, 0)
    assert read_all(dst) == b"xyz"


def test_copy_range_same_fd(mode: str, open_file) -> None:
    data = pattern(3 * MiB, 2)
    fd = open_file("img", data)
    fastcopy.copy_range(fd, 100, fd, 2 * MiB + 7, MiB - 7)
    expected = data[: 2 * MiB + 7] + data[100 : 100 + MiB - 7]
    assert read_all(fd) == expected


def test_copy_range_same_file_overlap_rejected(mode: str, open_file, tmp_path) -> None:
    fd = open_file("img", bytes(8192))
    with pytest.raises(ValueError, match="overlaps"):
        fastcopy.copy_range(fd, 0, fd, 4095, 4096)
    other = os.open(tmp_path / "img", os.O_RDWR)
    try:
        with pytest.raises(ValueError, match="overlaps"):
            fastcopy.copy_range(fd, 4096, other, 0, 4097)
        fastcopy.copy_range(fd, 4096, other, 0, 4096)  # adjacent is fine
    finally:
        os.close(other)


def test_copy_range_past_source_eof_writes_zeros(mode: str, open_file) -> None:
    data = pattern(1000, 3)
    src = open_file("src", data)
    dst = open_file("dst", b"\xff" * 9000)
    fastcopy.copy_range(src, 500, dst, 10, 5000)
    assert read_all(dst) == b"\xff" * 10 + data[500:] + bytes(4500) + b"\xff" * 3990
    # Entirely past the end, and a long stretch (several buffers).
    fastcopy.copy_range(src, 10_000, dst, 0, 3 * MiB + 3)
    assert read_all(dst) == bytes(3 * MiB + 3)


def test_copy_range_across_file_systems(mode: str, open_file) -> None:
    """memfd (shmem) to the test directory: copy_file_range says EXDEV, the
    pread/pwrite path takes over."""
    data = pattern(2 * MiB + 11, 4)
    src = os.memfd_create("pyqcow-test")
    try:
        os.write(src, data)
        dst = open_file("dst")
        fastcopy.copy_range(src, 3, dst, 0, len(data))
        assert read_all(dst) == data[3:] + bytes(3)
    finally:
        os.close(src)


def test_copy_range_from_procfs(mode: str, open_file) -> None:
    """procfs reports size 0; the data must still arrive (pread decides)."""
    with open("/proc/version", "rb") as f:
        expected = f.read()
    src = os.open("/proc/version", os.O_RDONLY)
    try:
        dst = open_file("dst")
        fastcopy.copy_range(src, 0, dst, 0, len(expected))
    finally:
        os.close(src)
    assert read_all(dst) == expected


def test_copy_range_fallback_when_copy_file_range_refused(
    mode: str, open_file, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", refuse)  # only the fallback uses it
    data = pattern(MiB + 5, 5)
    src = open_file("src", data)
    dst = open_file("dst")
    fastcopy.copy_range(src, 0, dst, 1, len(data) + 2)
    assert read_all(dst) == bytes(1) + data + bytes(2)


# --------------------------------------------------------------------------
# copy_runs
# --------------------------------------------------------------------------


def test_copy_runs_large_unaligned(mode: str, open_file) -> None:
    """20 MiB in shuffled, unaligned runs, some adjacent, some past EOF."""
    size = 20 * MiB
    data = bytearray(pattern(size, 6))
    data[3 * MiB : 5 * MiB] = bytes(2 * MiB)  # a zero region inside
    src = open_file("src", bytes(data))
    dst = open_file("dst")
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, size), 40))
    pieces = list(zip([0, *cuts], [*cuts, size + 12345]))  # last piece runs past EOF
    dst_order = pieces[:]
    rng.shuffle(dst_order)
    dst_start = {}
    position = 17
    for start, end in dst_order:
        dst_start[start] = position
        position += end - start
    runs = [(start, dst_start[start], end - start) for start, end in pieces]
    written = fastcopy.copy_runs(src, dst, runs)
    assert written == size + 12345
    result = read_all(dst)
    source = bytes(data) + bytes(12345)
    for start, end in pieces:
        assert result[dst_start[start] : dst_start[start] + end - start] == source[start:end]


def test_copy_runs_same_fd(mode: str, open_file) -> None:
    data = pattern(64 * 1024, 8)
    fd = open_file("img", data + bytes(64 * 1024))
    runs = [(0, 65536, 4096), (4096, 69632, 4096), (10_000, 100_000, 333)]
    assert fastcopy.copy_runs(fd, fd, runs) == 4096 * 2 + 333
    result = read_all(fd)
    assert result[65536 : 65536 + 8192] == data[:8192]
    assert result[100_000:100_333] == data[10_000:10_333]


def test_copy_runs_empty(mode: str, open_file) -> None:
    src = open_file("src", b"abc")
    dst = open_file("dst")
    assert fastcopy.copy_runs(src, dst, []) == 0
    assert fastcopy.copy_runs(src, dst, [(0, 0, 0)]) == 0
    assert read_all(dst) == b""


def test_copy_runs_merges_adjacent_runs(open_file) -> None:
    fd_a = open_file("a")
    fd_b = open_file("b")
    runs = [(0, 100, 10), (10, 110, 5), (15, 200, 5), (20, 205, 0), (20, 205, 1), (40, 300, 4)]
    assert fastcopy._check_runs(fd_a, fd_b, runs) == [(0, 100, 15), (15, 200, 6), (40, 300, 4)]


def test_copy_runs_skip_zero_makes_holes(mode: str, open_file) -> None:
    data = pattern(MiB, 9) + bytes(2 * MiB) + pattern(MiB, 10)
    src = open_file("src", data)
    dst = open_file("dst")
    sparse = holes_supported(dst)
    written = fastcopy.copy_runs(src, dst, [(0, 0, 4 * MiB)], skip_zero=True)
    assert written == 2 * MiB
    assert read_all(dst) == data
    if not sparse:
        pytest.skip("file system does not report holes")
    assert os.lseek(dst, 0, os.SEEK_HOLE) == MiB
    assert os.lseek(dst, MiB, os.SEEK_DATA) == 3 * MiB
    assert os.fstat(dst).st_blocks * 512 <= 2 * MiB + 64 * 1024


def test_copy_runs_skip_zero_chunks_follow_destination_alignment(mode: str, open_file) -> None:
    # Destination 3996..4096 gets A's, 4096..12288 zeros (two whole chunks,
    # skipped), 12288.. gets B's.
    data = b"A" * 100 + bytes(8192) + b"B" * 10
    src = open_file("src", data)
    dst = open_file("dst")
    written = fastcopy.copy_runs(src, dst, [(0, 3996, len(data))], skip_zero=True)
    assert written == 110
    assert read_all(dst) == bytes(3996) + data


def test_copy_runs_skip_zero_nonzero_byte_in_each_chunk(mode: str, open_file) -> None:
    data = bytearray(5 * 4096 + 100)
    for index in range(0, len(data), 4096):
        data[index + 4095 if index + 4095 < len(data) else -1] = 1
    src = open_file("src", bytes(data))
    dst = open_file("dst")
    assert fastcopy.copy_runs(src, dst, [(0, 0, len(data))], skip_zero=True) == len(data)
    assert read_all(dst) == data


def test_copy_runs_skip_zero_past_eof_extends_destination(mode: str, open_file) -> None:
    src = open_file("src", b"x" * 5000)
    dst = open_file("dst")
    written = fastcopy.copy_runs(src, dst, [(0, 4096, 3 * MiB)], skip_zero=True)
    assert written == 8192  # whole 4 KiB chunks: the second one is partly data
    assert os.fstat(dst).st_size == 4096 + 3 * MiB
    assert read_all(dst) == bytes(4096) + b"x" * 5000 + bytes(3 * MiB - 5000)


def test_copy_runs_skip_zero_does_not_shrink_destination(mode: str, open_file) -> None:
    src = open_file("src", bytes(8192))
    dst = open_file("dst", b"\x01" * 20000)
    assert fastcopy.copy_runs(src, dst, [(0, 0, 8192)], skip_zero=True) == 0
    assert read_all(dst) == b"\x01" * 20000


def test_copy_runs_without_skip_zero_writes_zeros(mode: str, open_file) -> None:
    src = open_file("src", bytes(8192))
    dst = open_file("dst", b"\x01" * 8192)
    assert fastcopy.copy_runs(src, dst, [(0, 0, 8192)]) == 8192
    assert read_all(dst) == bytes(8192)


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 0, 10), "source offset must be >= 0"),
        ((0, -1, 10), "destination offset must be >= 0"),
        ((0, 0, -1), "source length must be >= 0"),
        ((2**63 - 5, 0, 10), "exceeds the largest file offset"),
        ((0, 2**63 - 5, 10), "exceeds the largest file offset"),
    ],
)
def test_copy_range_bad_ranges(mode: str, open_file, args, match) -> None:
    src = open_file("src", b"abc")
    dst = open_file("dst")
    src_offset, dst_offset, length = args
    with pytest.raises(ValueError, match=match):
        fastcopy.copy_range(src, src_offset, dst, dst_offset, length)


def test_bad_fds(mode: str, open_file) -> None:
    src = open_file("src", b"abc")
    dst = open_file("dst")
    with pytest.raises(ValueError, match="must be a file descriptor"):
        fastcopy.copy_range(-1, 0, dst, 0, 3)
    with pytest.raises(ValueError, match="must be a file descriptor"):
        fastcopy.copy_runs(src, 2**40, [(0, 0, 3)])
    with pytest.raises(TypeError, match="must be an int"):
        fastcopy.copy_range("3", 0, dst, 0, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be an int"):
        fastcopy.copy_range(src, 0.0, dst, 0, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be an int"):
        fastcopy.copy_runs(True, dst, [(0, 0, 3)])  # type: ignore[arg-type]


def test_closed_fd_is_ebadf(mode: str, open_file) -> None:
    src = os.dup(open_file("src", b"abc"))  # a copy the fixture does not track
    dst = open_file("dst")
    os.close(src)
    with pytest.raises(OSError) as excinfo:
        fastcopy.copy_range(src, 0, dst, 0, 3)
    assert excinfo.value.errno == errno.EBADF
    with pytest.raises(OSError) as excinfo:
        fastcopy.copy_runs(dst, src, [(0, 0, 3)])
    assert excinfo.value.errno == errno.EBADF


def test_wrong_access_mode_is_ebadf(mode: str, open_file) -> None:
    src = open_file("src", b"abc" * 1000)
    read_only = open_file("ro", flags=os.O_RDONLY)
    write_only = open_file("wo", flags=os.O_WRONLY)
    for skip_zero in (False, True):
        with pytest.raises(OSError) as excinfo:
            fastcopy.copy_runs(src, read_only, [(0, 0, 3000)], skip_zero=skip_zero)
        assert excinfo.value.errno == errno.EBADF
        with pytest.raises(OSError) as excinfo:
            fastcopy.copy_runs(write_only, src, [(0, 5000, 3000)], skip_zero=skip_zero)
        assert excinfo.value.errno == errno.EBADF


def test_append_destination_rejected(mode: str, open_file) -> None:
    src = open_file("src", b"abc")
    dst = open_file("dst", flags=os.O_WRONLY | os.O_APPEND)
    with pytest.raises(ValueError, match="O_APPEND"):
        fastcopy.copy_range(src, 0, dst, 0, 3)


@pytest.mark.parametrize(
    ("runs", "match"),
    [
        ([(0, 0)], "must be \\(src_offset, dst_offset, length\\)"),
        ([5], "must be \\(src_offset, dst_offset, length\\)"),
        ([(0, 0, 1), (-3, 0, 1)], "run 1 source offset must be >= 0"),
        ([(0, -3, 1)], "run 0 destination offset must be >= 0"),
        ([(0, 0, -1)], "run 0 source length must be >= 0"),
        ([(0, 100, 200)], "overlaps"),  # src and dst are the same file here
    ],
)
def test_copy_runs_bad_runs(mode: str, open_file, runs, match) -> None:
    fd = open_file("img", bytes(1000))
    with pytest.raises(ValueError, match=match):
        fastcopy.copy_runs(fd, fd, runs)


# --------------------------------------------------------------------------
# is_zero / zero_runs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 2, 7, 15, 16, 17, 31, 33, 4095, 4096, 4097, MiB + 3])
def test_is_zero_sizes(mode: str, size: int) -> None:
    assert fastcopy.is_zero(bytes(size))
    assert fastcopy.is_zero(bytearray(size))
    for position in {0, size // 2, size - 1, 15, 16, 17} & set(range(size)):
        data = bytearray(size)
        data[position] = 0x80
        assert not fastcopy.is_zero(data), position
        assert not fastcopy.is_zero(memoryview(data))


def test_is_zero_every_position_small(mode: str) -> None:
    for size in range(1, 70):
        for position in range(size):
            data = bytearray(size)
            data[position] = 1
            assert not fastcopy.is_zero(data), (size, position)


def test_is_zero_buffer_kinds(mode: str) -> None:
    data = bytearray(b"\0" * 100 + b"\1" + b"\0" * 99)
    view = memoryview(data)
    assert fastcopy.is_zero(view[:100])
    assert fastcopy.is_zero(view[101:])
    assert not fastcopy.is_zero(view[50:150])
    assert fastcopy.is_zero(array.array("i", [0] * 9))
    assert not fastcopy.is_zero(array.array("d", [0.0, -0.0]))  # -0.0 has its sign bit set
    assert not fastcopy.is_zero(memoryview(data).cast("B", (20, 10)))
    assert fastcopy.is_zero(memoryview(bytes(200)).cast("B", (20, 10)))


def test_is_zero_noncontiguous_view(mode: str) -> None:
    data = bytearray(200)
    data[101] = 1
    view = memoryview(data)
    assert fastcopy.is_zero(view[::2])  # even indexes only
    assert not fastcopy.is_zero(view[1::2])


def test_is_zero_mmap_released(mode: str, tmp_path) -> None:
    path = tmp_path / "m"
    path.write_bytes(bytes(3 * 4096) + b"\1")
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0)
        assert not fastcopy.is_zero(mapped)
        assert fastcopy.is_zero(memoryview(mapped)[: 3 * 4096])
        assert fastcopy.zero_runs(mapped, 4096) == [(0, 3 * 4096, True), (3 * 4096, 1, False)]
        mapped.close()  # BufferError if a view were still exported


def test_is_zero_rejects_non_buffers(mode: str) -> None:
    with pytest.raises(TypeError):
        fastcopy.is_zero("0000")
    with pytest.raises(TypeError):
        fastcopy.zero_runs(12, 4)


def reference_zero_runs(data: bytes, granularity: int) -> list[tuple[int, int, bool]]:
    runs: list[tuple[int, int, bool]] = []
    for offset in range(0, len(data), granularity):
        block = data[offset : offset + granularity]
        zero = not any(block)
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], runs[-1][1] + len(block), zero)
        else:
            runs.append((offset, len(block), zero))
    return runs


@pytest.mark.parametrize("size", [0, 1, 3, 511, 512, 513, 4097, 65536 + 17])
@pytest.mark.parametrize("granularity", [1, 2, 512, 4096, 65536])
def test_zero_runs_edge_sizes(mode: str, size: int, granularity: int) -> None:
    assert fastcopy.zero_runs(bytes(size), granularity) == ([(0, size, True)] if size else [])
    data = bytearray(size)
    if size:
        data[-1] = 7
    assert fastcopy.zero_runs(data, granularity) == reference_zero_runs(bytes(data), granularity)


@pytest.mark.parametrize("seed", range(8))
def test_zero_runs_random(mode: str, seed: int) -> None:
    rng = random.Random(seed)
    granularity = 1 << rng.randrange(0, 13)
    data = bytearray()
    while len(data) < 200_000:
        length = rng.randrange(1, 5 * granularity + 2)
        data += bytes(length) if rng.random() < 0.5 else rng.randbytes(length)
    runs = fastcopy.zero_runs(data, granularity)
    assert runs == reference_zero_runs(bytes(data), granularity)
    assert sum(length for _, length, _ in runs) == len(data)


@pytest.mark.parametrize("granularity", [0, -4, 3, 4096 + 1])
def test_zero_runs_bad_granularity(mode: str, granularity: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        fastcopy.zero_runs(bytes(10), granularity)


def test_zero_runs_bad_granularity_type(mode: str) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        fastcopy.zero_runs(bytes(10), 4.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# the C helper's own error returns and _check
# --------------------------------------------------------------------------


def test_check_turns_negative_errno_into_oserror() -> None:
    assert fastcopy._check(0) == 0
    assert fastcopy._check(42) == 42
    with pytest.raises(OSError, match="Bad file descriptor") as excinfo:
        fastcopy._check(-errno.EBADF)
    assert excinfo.value.errno == errno.EBADF


@pytest.fixture
def native() -> object:
    """The C helper module itself."""
    require_native()
    return fastcopy._native


def test_native_returns_negative_errno(native, open_file) -> None:
    src = open_file("src", b"x" * 10)
    dst = open_file("dst")
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    assert native.lib.pyqcow_copy_range(fd, 0, dst, 0, 10) == -errno.EBADF
    runs = native.ffi.new("int64_t[]", [0, 0, 10])
    assert native.lib.pyqcow_copy_runs(src, fd, runs, 1, 0) == -errno.EBADF
    assert native.lib.pyqcow_copy_runs(src, fd, runs, 1, 1) == -errno.EBADF
    out = native.ffi.new("int64_t[]", 3)
    assert native.lib.pyqcow_zero_runs(b"ab", 2, 0, out, 1) == -errno.EINVAL
    assert native.lib.pyqcow_zero_runs(b"a\0", 2, 1, out, 1) == -errno.ENOSPC
