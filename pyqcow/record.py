"""Mutable records without ``dataclasses``.

``dataclasses`` imports ``inspect`` (and with it ast, dis, tokenize...) and builds
each class with ``exec``: a third of a small command's start-up.  A ``Record``
subclass names its fields in ``__slots__`` and gets what ``@dataclass`` gave
(positional or keyword construction with ``_defaults`` and ``_factories``, ==,
repr; mutable, so unhashable).  Frozen records are ``FrozenRecord``
(header.py's records, walk's Problem).
"""

from __future__ import annotations


class Record:
    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]
    #: field -> default value (immutable values only)
    _defaults: dict[str, object] = {}
    #: field -> callable making a fresh default (list, dict...)
    _factories: dict[str, object] = {}

    def __init__(self, *args, **kwargs) -> None:
        names = self.__slots__
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes {len(names)} positional arguments "
                            f"but {len(args)} were given")
        for name, value in zip(names, args, strict=False):  # args may be fewer
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}() got multiple values for argument {name!r}")
            setattr(self, name, value)
        for name in names[len(args):]:
            if name in kwargs:
                setattr(self, name, kwargs.pop(name))
            elif name in self._defaults:
                setattr(self, name, self._defaults[name])
            elif name in self._factories:
                setattr(self, name, self._factories[name]())
            else:
                raise TypeError(f"{type(self).__name__}() missing required argument: {name!r}")
        for name in kwargs:
            if name not in names:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()
        return NotImplemented

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({inner})"


class FrozenRecord:
    """A frozen record of ``_fields`` (what ``@dataclass(frozen=True)`` gives: keyword
    or positional construction with ``_defaults``, ==, hash, repr, ``replace``).

    Not a dataclass: ``dataclasses`` imports ``inspect`` (ast, dis, tokenize...) and
    builds every class with ``exec``, which was a third of ``pyqcow info``'s start-up.
    """

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _defaults: dict[str, object] = {}

    def __init__(self, *args, **kwargs) -> None:
        names = self._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes {len(names)} positional arguments "
                            f"but {len(args)} were given")
        values = dict(zip(names, args, strict=False))  # args may be fewer
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}")
            if key in values:
                raise TypeError(f"{type(self).__name__}() got multiple values for argument {key!r}")
            values[key] = value
        for name in names:
            if name in values:
                value = values[name]
            elif name in self._defaults:
                value = self._defaults[name]
            else:
                raise TypeError(f"{type(self).__name__}() missing required argument: {name!r}")
            object.__setattr__(self, name, value)

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __eq__(self, other) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({inner})"

    def __reduce__(self):
        return (type(self), self._values())

    def replace(self, **changes):
        """A copy with ``changes`` (``dataclasses.replace``)."""
        values = {name: getattr(self, name) for name in self._fields}
        return type(self)(**{**values, **changes})
