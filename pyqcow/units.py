"""Sizes as qemu-img reads and prints them.

``parse_size`` accepts what qemu-img's ``cvtnum`` accepts (util/cutils.c
``qemu_strtosz``): a plain number of bytes, or a number with one of the
binary suffixes ``B k K M G T P E`` (case-insensitive; ``1.5G`` is allowed
with a suffix).  ``format_size`` is qemu's ``size_to_str`` ("852 KiB").
"""

from __future__ import annotations

__all__ = ["SUFFIXES", "format_size", "parse_size"]

SUFFIXES = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_INT64_MAX = (1 << 63) - 1
_SIZE_PATTERN = (
    r"\s*(?:(?P<hex>0[xX][0-9a-fA-F]+)|(?P<int>[0-9]+)(?P<frac>\.[0-9]*)?)\s*(?P<suffix>[a-zA-Z]*)\s*"
)


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Bytes for ``text`` ("64k", "1.5G", "1048576"); ValueError on anything else."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid {what} {text!r}: must not be negative")
        return text
    # the common forms ("4096", "4k") without re, which is milliseconds of a start-up
    digits, unit = (text[:-1], text[-1:].lower()) if text[-1:].isalpha() else (text, "")
    if digits.isascii() and digits.isdigit() and (not unit or unit in SUFFIXES):
        value = int(digits) << SUFFIXES.get(unit, 0)
        if value <= _INT64_MAX:
            return value
    return _parse_size_text(text, what)


def _parse_size_text(text: str, what: str) -> int:
    """parse_size of any text, with the pattern (its fast path's forms too)."""
    import re  # (on first use: re is milliseconds of a command's start-up)

    m = re.fullmatch(_SIZE_PATTERN, text)
    if not m:
        raise ValueError(
            f"invalid {what} {text!r}: expected a number of bytes, optionally followed by "
            "k, M, G, T, P or E"
        )
    suffix = m.group("suffix").lower()
    if suffix and suffix not in SUFFIXES:
        raise ValueError(f"invalid {what} {text!r}: unknown suffix {m.group('suffix')!r}")
    shift = SUFFIXES.get(suffix, 0)
    if m.group("hex"):
        if suffix:
            raise ValueError(f"invalid {what} {text!r}: a hexadecimal size takes no suffix")
        value = int(m.group("hex"), 16)
    else:
        frac = m.group("frac")
        if frac and len(frac) > 1:
            if not shift:
                raise ValueError(f"invalid {what} {text!r}: a fraction needs a unit (k, M, G...)")
            num, den = int(m.group("int") + frac[1:]), 10 ** (len(frac) - 1)
            value = (num << shift) // den
        else:
            value = int(m.group("int")) << shift
    if value > _INT64_MAX:
        raise ValueError(f"invalid {what} {text!r}: too large")
    return value


def format_size(value: int) -> str:
    """qemu's size_to_str: three significant digits and a binary unit ("1.5 MiB")."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    # frexp(val / (1000/1024)) gives the exponent; switch unit once >= 1000.  That
    # exponent is the bit length of the quotient's integer part (for a quotient below 1
    # both give i = 0): no math module, a shared library to load, at every start.
    exp = int(value / (1000.0 / 1024.0)).bit_length()
    i = max(0, (exp - 1) // 10) if value else 0
    i = min(i, len(suffixes) - 1)
    return f"{_c_g(value / (1 << (i * 10)))} {suffixes[i]}B"


def _c_g(x: float) -> str:
    """C's printf("%0.3g")."""
    return f"{x:.3g}"
