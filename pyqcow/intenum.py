"""The format's named integers (spec's feature bits and types, entries.ClusterType)
without the enum module: enum (with functools and types) and the classes it builds
are milliseconds of every command's start-up.

``class X(IntEnum)`` / ``class X(IntFlag)`` with integer class attributes behaves as
the standard library's IntEnum / IntFlag does for what pyqcow uses: members are
``int`` instances of X with ``.name`` and ``.value``; ``X(value)`` is the member
(ValueError with enum's message for a value that is not one; for an IntFlag, a
combination of members is an X named by them); iteration, ``len`` and ``in`` over
the members in definition order; ``repr`` ``<X.NAME: value>``; ``str`` and
``format`` those of the int (Python 3.11's rules); a member pickles and copies as
itself; an IntFlag's ``|``, ``&`` and ``^`` give an X, and its ``~`` is enum's (only
the bits its members span).  Other arithmetic gives ints, as enum's does.  tests/unit/test_intenum.py compares them with enum's.
"""

from __future__ import annotations

__all__ = ["IntEnum", "IntFlag"]


class _IntEnumType(type):
    def __new__(mcls, name: str, bases: tuple, namespace: dict):
        members = {k: v for k, v in namespace.items()
                   if not k.startswith("_") and type(v) is int}
        for key in members:
            del namespace[key]
        cls = super().__new__(mcls, name, bases, namespace)
        by_value: dict[int, object] = {}
        for key, value in members.items():
            member = by_value.get(value)
            if member is None:  # (a second name for a value is an alias, as in enum)
                member = by_value[value] = int.__new__(cls, value)
                member._name_ = key
            type.__setattr__(cls, key, member)
        type.__setattr__(cls, "_value2member_map_", by_value)
        type.__setattr__(cls, "_member_names_", list(members))
        return cls

    def __call__(cls, value):
        try:
            return cls._value2member_map_[value]
        except (KeyError, TypeError):
            member = cls._missing_(value)
            if member is None:
                raise ValueError(f"{value!r} is not a valid {cls.__qualname__}") from None
            return member

    def __iter__(cls):
        return iter(cls._value2member_map_.values())

    def __len__(cls) -> int:
        return len(cls._value2member_map_)

    def __contains__(cls, value) -> bool:
        return isinstance(value, cls) and value in cls._value2member_map_

    def __setattr__(cls, key: str, value) -> None:
        if key in cls.__dict__.get("_member_names_", ()):
            raise AttributeError(f"cannot reassign member {key!r}")
        super().__setattr__(key, value)

    def __repr__(cls) -> str:
        kind = "flag" if any(getattr(b, "_is_flag", False) for b in cls.__mro__) else "enum"
        return f"<{kind} {cls.__name__!r}>"


class IntEnum(int, metaclass=_IntEnumType):
    _name_: str | None

    @property
    def name(self) -> str | None:
        return self._name_

    @property
    def value(self) -> int:
        return int(self)

    @classmethod
    def _missing_(cls, value):
        return None

    def __repr__(self) -> str:
        if self._name_ is None:
            return f"<{type(self).__name__}: {int(self)!r}>"
        return f"<{type(self).__name__}.{self._name_}: {int(self)!r}>"

    __str__ = int.__repr__
    __format__ = int.__format__

    def __reduce_ex__(self, protocol):
        return type(self), (int(self),)


class IntFlag(IntEnum):
    _is_flag = True

    @classmethod
    def _all_bits(cls) -> int:
        return (1 << max(map(int, cls._value2member_map_.values()), default=0).bit_length()) - 1

    @classmethod
    def _missing_(cls, value):
        """Any other int: an X named as enum names it ("A|B", "A|256"); a negative
        value wraps as enum wraps it (3.11, boundary KEEP)."""
        if type(value) is not int:
            return None
        all_bits = cls._all_bits()
        if value < ~all_bits:
            value += max(all_bits + 1, 2 ** value.bit_length())
        if value < 0:
            value += all_bits + 1
        if value in cls._value2member_map_:
            return cls._value2member_map_[value]
        names, rest = [], value
        for m in cls._value2member_map_.values():
            if int(m) & value == int(m) and int(m):
                names.append(m._name_)
                rest &= ~int(m)
        if rest and names:  # (bits no member names: their value, as enum shows them)
            names.append(str(rest))
        member = int.__new__(cls, value)
        member._name_ = "|".join(names) or None
        return member

    def __invert__(self):
        """enum's IntFlag inversion: within the bits its members span, so
        ``x & ~F.A`` also clears bits no member names, as it did with enum."""
        return type(self)(~int(self))

    def _combine(self, other, op):
        if not isinstance(other, int):
            return NotImplemented
        return type(self)(op(int(self), int(other)))

    def __or__(self, other):
        return self._combine(other, int.__or__)

    def __and__(self, other):
        return self._combine(other, int.__and__)

    def __xor__(self, other):
        return self._combine(other, int.__xor__)

    __ror__, __rand__, __rxor__ = __or__, __and__, __xor__
