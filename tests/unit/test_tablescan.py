"""pyqcow.tablescan: the nonzero-entry scan, C helper and fallback, against the
obvious per-entry loop."""

from __future__ import annotations

import subprocess
import sys
from array import array

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fastcopy import mode  # noqa: F401  (the native/python fixture)

from pyqcow import tablescan


def _naive(raw: bytes, width: int) -> list[int]:
    entry = 8 * width
    return [i for i in range(len(raw) // entry) if any(raw[i * entry : (i + 1) * entry])]


def _table(count: int, width: int, hits: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(count * 8 * width)
    for index, byte, value in hits:
        if not count:
            break
        pos = (index % count) * 8 * width + byte % (8 * width)
        buf[pos] = value
    return bytes(buf)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.sampled_from([0, 1, 7, 8, 9, 129, 1024, 2500, 8192]),
       width=st.sampled_from([1, 2]),
       hits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 15), st.integers(1, 255)),
                     max_size=40))
def test_nonzero_indices_equal_naive_scan(mode, count, width, hits) -> None:  # noqa: F811
    raw = _table(count, width, hits)
    assert tablescan.nonzero_indices(raw, width) == _naive(raw, width)
    # the scanner of many tables (one backend choice, one output array) agrees,
    # used twice (its output array is reused)
    scan = tablescan.scanner(width)
    assert scan(raw) == _naive(raw, width)
    assert scan(raw[: len(raw) // 2]) == _naive(raw[: len(raw) // 2], width)


def test_more_than_one_call_of_the_helper(mode) -> None:  # noqa: F811
    # every entry set: the C side fills its output buffer several times over
    raw = b"\x01" * (8 * 5000)
    assert tablescan.nonzero_indices(raw, 1) == list(range(5000))
    assert tablescan.nonzero_indices(raw, 2) == list(range(2500))
    assert tablescan.scanner(1)(raw) == list(range(5000))


def test_decoded_array_and_raw_bytes_agree(mode) -> None:  # noqa: F811
    table = array("Q", [0] * 8192)
    for i in (0, 7, 8, 4095, 8191):
        table[i] = 1 << (i % 64)
    assert tablescan.nonzero_indices(table) == [0, 7, 8, 4095, 8191]
    assert tablescan.nonzero_indices(table.tobytes()) == [0, 7, 8, 4095, 8191]
    assert tablescan.nonzero_indices(bytes(65536)) == []


def test_c_helper_loaded_only_past_the_python_tables() -> None:
    """A process that has not loaded the C helper scans its first tables in Python
    (cffi's import costs more than they do), then loads it; the answers agree."""
    code = (
        "import sys\n"
        "from pyqcow import tablescan\n"
        "t = bytearray(65536); t[800:808] = b'x' * 8; t[-8:] = b'y' * 8\n"
        "for i in range(tablescan._PYTHON_TABLES):\n"
        "    assert tablescan.nonzero_indices(t) == [100, 8191]\n"
        "assert 'pyqcow.fastcopy' not in sys.modules\n"
        "assert tablescan.nonzero_indices(t) == [100, 8191]\n"
        "assert 'pyqcow.fastcopy' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
