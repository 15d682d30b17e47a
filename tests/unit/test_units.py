"""units.py: qemu-img size suffixes and qemu's size_to_str."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqcow.units import _parse_size_text, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0), ("512", 512), ("1b", 1), ("64k", 65536), ("64K", 65536), ("1M", 1 << 20),
        ("2G", 2 << 30), ("16T", 16 << 40), ("1P", 1 << 50), ("1E", 1 << 60),
        ("1.5k", 1536), ("0.5M", 512 << 10), ("0x200", 512), (" 8M ", 8 << 20), (4096, 4096),
    ],
)
def test_parse_size(text, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1x", "k", "1.5", "0x10k", "8E", "1.2.3", -5])
def test_parse_size_rejects(text) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"), (512, "512 B"), (999, "999 B"), (1000, "0.977 KiB"), (65536, "64 KiB"),
        (532480, "520 KiB"), (872448, "852 KiB"), (4194304, "4 MiB"), (1 << 44, "16 TiB"),
        (1536 << 20, "1.5 GiB"),
    ],
)
def test_format_size_like_qemu(value: int, text: str) -> None:
    assert format_size(value) == text


def _outcome(f, text: str):
    try:
        return f(text)
    except ValueError as e:
        return ("ValueError", str(e))


@settings(max_examples=500)
@given(st.one_of(st.from_regex(r"\s?[0-9]{0,21}\.?[0-9]{0,2}\s?[kKmMgGtTpPeEbBxX]{0,2}\s?",
                               fullmatch=True),
                 st.text(max_size=6)))
def test_parse_size_fast_path_agrees_with_the_pattern(text: str) -> None:
    """parse_size reads "4096" and "4k" without re (start-up time): whatever it
    answers, value or error, is what the pattern answers."""
    assert _outcome(lambda t: parse_size(t, what="size"), text) == \
        _outcome(lambda t: _parse_size_text(t, "size"), text)
