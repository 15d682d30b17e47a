"""pyqcow.intenum's IntEnum and IntFlag behave as the standard library's (3.11 rules)
for the classes pyqcow declares with them (spec's feature bits and types,
entries.ClusterType): each is compared with the enum the same members make."""

from __future__ import annotations

import copy
import enum
import pickle

import pytest

from pyqcow import entries, spec
from pyqcow.intenum import IntFlag

CLASSES = [spec.Incompat, spec.Compat, spec.Autoclear, spec.CryptMethod,
           spec.CompressionType, spec.ExtType, entries.ClusterType]
FLAGS = [c for c in CLASSES if issubclass(c, IntFlag)]


def real(cls):
    """The enum (IntEnum or IntFlag) with cls's members."""
    base = enum.IntFlag if issubclass(cls, IntFlag) else enum.IntEnum
    return base(cls.__name__, [(m.name, int(m)) for m in cls])


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_members_as_enums(cls) -> None:
    ref = real(cls)
    assert [(m.name, m.value) for m in cls] == [(m.name, m.value) for m in ref]
    assert len(cls) == len(ref) > 0
    assert repr(cls) == repr(ref)
    for m, r in zip(cls, ref, strict=True):
        assert isinstance(m, cls) and isinstance(m, int) and m in cls
        assert getattr(cls, m.name) is m and cls(int(m)) is m and cls(m) is m
        assert (repr(m), str(m), f"{m}", f"{m:#010x}", f"{m:5d}", hash(m)) == \
               (repr(r), str(r), f"{r}", f"{r:#010x}", f"{r:5d}", hash(r))
        assert m == r == int(m) and not m != r
        assert pickle.loads(pickle.dumps(m)) is m and copy.copy(m) is m
        assert copy.deepcopy(m) is m
        with pytest.raises(AttributeError):
            setattr(cls, m.name, 5)
    for bad in (-1, -2, -(1 << 70), 99, "x", None, 1 << 70):
        if issubclass(cls, IntFlag) and isinstance(bad, int):  # (any int is a flag value)
            assert (repr(cls(bad)), int(cls(bad))) == (repr(ref(bad)), int(ref(bad)))
            continue
        with pytest.raises(ValueError) as lite_error:
            cls(bad)
        with pytest.raises(ValueError) as ref_error:
            ref(bad)
        assert str(lite_error.value) == str(ref_error.value)


@pytest.mark.parametrize("cls", FLAGS, ids=lambda c: c.__name__)
def test_flag_arithmetic_as_enums(cls) -> None:
    """Each comparison is with a new enum class: the standard library caches the
    flag values it has made, and CPython before 3.11.4 (Debian 12's python3 is 3.11.2)
    can then answer from a wrong entry, e.g. ``~(F(1) | -1) & -1`` as ``<F: 2>``
    after other operations on F; in a new class it is ``<F: 0>``, as in 3.11.4+
    (see test_the_standard_librarys_flag_cache_is_kept_out)."""
    members = list(cls)
    values = {0, 1, 2, 3, 0x1F, 0x100, 0x101, 0xFFFF, (1 << 64) - 1, -1, -3}
    values |= {int(a | b) for a in members for b in members}
    for v in values:
        m, r = cls(v), real(cls)(v)
        assert (repr(m), m.name, int(~m), repr(~m)) == (repr(r), r.name, int(~r), repr(~r))
        for x in values:
            for op in (lambda a, b: a & ~b, lambda a, b: a | b, lambda a, b: a & b,
                       lambda a, b: a ^ b, lambda a, b: ~(a | b) & b):
                assert repr(op(x, m)) == repr(op(x, real(cls)(v))), (x, v)
                assert repr(op(m, x)) == repr(op(real(cls)(v), x)), (x, v)


def test_the_standard_librarys_flag_cache_is_kept_out() -> None:
    """Ours has no such cache to go wrong: the same sequence that misleads
    CPython 3.11.2's enum leaves pyqcow's answer at the arithmetic's."""
    for v in (1, 2, 3, 0x1F):
        for x in (-3, -1, 0, 1, 2, 3):
            for op in (lambda a, b: a & ~b, lambda a, b: a | b, lambda a, b: ~(a | b) & b):
                op(spec.Compat(v), x)
    assert repr(~(spec.Compat(1) | -1) & -1) == "<Compat: 0>"
    assert repr(~(real(spec.Compat)(1) | -1) & -1) == "<Compat: 0>"


def test_header_extension_names_unchanged() -> None:
    from pyqcow.header import Extension

    assert Extension(spec.ExtType.BACKING_FORMAT, b"").name == "backing_format"
    assert Extension(0x12345678, b"").name == "unknown (0x12345678)"


def test_aliases_are_the_first_member() -> None:
    class T(IntFlag):
        A = 1
        B = 1
        C = 2

    assert T.B is T.A and list(T) == [T.A, T.C] and T(1).name == "A"
    assert real(T)(1).name == "A"
