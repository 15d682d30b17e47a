"""A command line's meaning without argparse, when it is certain (start-up time).

argparse, with the ``re`` and ``gettext`` it imports and the parser it builds, is a
large part of a small command's start-up.  ``parse`` reads the arguments of one
subcommand without it, in the forms whose meaning is certain:

* the options the subcommand defines, by their exact names: ``--opt VALUE``,
  ``--opt=VALUE``, ``-x VALUE``, ``-xVALUE``, flags alone or combined (``-uq``,
  ``-qF qcow2``, ``-qFqcow2``); ``--debug`` before the subcommand;
* the positionals in one run (not split by options), ``--`` once before them;

and returns what argparse would return for them, or ``None``: for anything else
(``--help``, an unknown or abbreviated option, a missing, extra or split positional,
a value outside the choices or that its type refuses, a value that looks like an
option...).  main then parses the same arguments with argparse, which gives its
own help, errors and exit status, byte for byte.

The options are declared once, by the subcommand's ``register(subparsers)``: here
it runs against a :class:`Recorder`, which keeps what each ``add_argument`` call
means.  What the recorder does not model (another ``nargs``, a mutually exclusive
group...) makes the whole subcommand go through argparse; an option with its own
``argparse.Action`` class gets its default here, and argparse as soon as it is
given.  tests/property/test_fastargs.py checks ``parse`` against argparse.
"""

from __future__ import annotations

__all__ = ["SUPPRESS", "Namespace", "Recorder", "parse"]

#: argparse.SUPPRESS's value (compared by value here: argparse itself is not loaded)
SUPPRESS = "==SUPPRESS=="

_STORE, _FLAG, _APPEND, _OPAQUE = "store", "flag", "append", "opaque"
#: add_argument's action= -> what parse() does with the option (_OPAQUE: argparse's job)
_KINDS = {None: _STORE, "store": _STORE, "store_true": _FLAG, "store_false": _FLAG,
          "append": _APPEND, "help": _OPAQUE, "version": _OPAQUE}
#: add_argument's keywords that only describe help text
_HELP_KEYWORDS = frozenset({"help", "metavar"})
_KEYWORDS = frozenset({"action", "dest", "default", "type", "choices", "required", "nargs",
                       "const"}) | _HELP_KEYWORDS


class Namespace:
    """What argparse.Namespace is to a command: attributes, ``==`` and ``in``."""

    def __init__(self, **kwargs) -> None:
        self.__dict__.update(kwargs)

    def __eq__(self, other):
        if not isinstance(other, Namespace):
            return NotImplemented
        return vars(self) == vars(other)

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def __repr__(self) -> str:
        return f"Namespace({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class _Action:
    """One add_argument call, as far as ``parse`` needs it."""

    __slots__ = ("kind", "option_strings", "dest", "default", "const", "type", "choices",
                 "required", "optional_positional")

    def __init__(self, kind: str, option_strings: tuple[str, ...], dest: str) -> None:
        self.kind = kind
        self.option_strings = option_strings
        self.dest = dest
        self.default = None
        self.const = None
        self.type = None
        self.choices = None
        self.required = False
        self.optional_positional = False  # a positional with nargs="?"


class Recorder:
    """Stands in for argparse while a ``register(subparsers)`` runs: for the
    subparsers action (``add_parser``) and for the subcommand's parser."""

    prog = None

    def __init__(self) -> None:
        self._actions: list[_Action] = []
        self._defaults: dict = {}
        self.fast = True  # False: the subcommand uses something parse() does not model
        self.command_dest: str | None = None  # the root's: add_subparsers(dest=...)
        self.subcommands: Recorder | None = None

    # the subparsers action
    def add_parser(self, name: str, **kwargs) -> Recorder:
        if kwargs.get("aliases") or kwargs.get("prefix_chars", "-") != "-":
            self.fast = False
        return self

    # the parser
    def add_argument_group(self, *args, **kwargs) -> Recorder:
        return self  # (only the help text groups options)

    def add_mutually_exclusive_group(self, **kwargs) -> Recorder:
        self.fast = False
        return self

    def add_subparsers(self, **kwargs) -> Recorder:
        self.command_dest = kwargs.get("dest", SUPPRESS)
        self.subcommands = Recorder()
        return self.subcommands

    def set_defaults(self, **kwargs) -> None:
        for action in self._actions:
            if action.dest in kwargs:
                action.default = kwargs[action.dest]
        self._defaults.update(kwargs)

    def add_argument(self, *flags: str, **kwargs) -> _Action | None:
        action = self._action(flags, kwargs)
        if action is None:
            self.fast = False
        else:
            self._actions.append(action)
        return action

    def _action(self, flags: tuple[str, ...], kw: dict) -> _Action | None:
        kind = kw.get("action")
        kind = _KINDS.get(kind) if kind is None or isinstance(kind, str) else _OPAQUE
        if kind is None or not flags or not all(isinstance(f, str) and f for f in flags):
            return None
        if kind != _OPAQUE and not _KEYWORDS.issuperset(kw):
            return None
        if len(flags) == 1 and not flags[0].startswith("-"):  # a positional
            if kind != _STORE or "dest" in kw or kw.get("nargs") not in (None, "?"):
                return None
            action = _Action(kind, (), flags[0])
            action.optional_positional = kw.get("nargs") == "?"
            action.required = not action.optional_positional
        else:
            # (a single-dash option of more than one letter would make argparse's
            # reading of "-xVALUE" depend on the other options' names)
            if not all(f.startswith("--") or len(f) == 2 and f[1] != "-" for f in flags):
                return None
            if kind != _OPAQUE and (kw.get("nargs") is not None or "const" in kw):
                return None
            long = [f for f in flags if f.startswith("--")]
            dest = kw.get("dest") or (long or flags)[0].lstrip("-").replace("-", "_")
            action = _Action(kind, flags, dest)
            action.required = bool(kw.get("required", False))
        if kind == _FLAG:
            action.const = kw.get("action") == "store_true"
            action.default = not action.const
        if kw.get("action") in ("help", "version"):  # (they print and exit)
            action.dest = action.default = SUPPRESS
        elif "default" in kw:
            action.default = kw["default"]
        elif action.dest in self._defaults:
            action.default = self._defaults[action.dest]
        action.type = kw.get("type")
        action.choices = kw.get("choices")
        if action.type is not None and not callable(action.type):
            return None
        return action


class _Decline(Exception):
    """The arguments are not in a form parse() reads: argparse's turn."""


def _convert(action: _Action, text: str):
    """argparse's _get_value and _check_value: the value, or _Decline for its error."""
    if text == "--":
        raise _Decline  # (argparse drops a "--" from an option's values)
    value = text
    if action.type is not None:
        try:
            value = action.type(text)
        except Exception:  # noqa: BLE001 - argparse reports it (or raises it)
            raise _Decline from None
    if action.choices is not None and value not in action.choices:
        raise _Decline
    return value


class _Reader:
    """One subcommand's arguments, read as argparse reads them (or _Decline)."""

    def __init__(self, recorder: Recorder, tokens: list[str]) -> None:
        self.options = {s: a for a in recorder._actions for s in a.option_strings}
        self.positionals = [a for a in recorder._actions if not a.option_strings]
        self.tokens = tokens
        self.defaults = recorder._defaults
        self.values: dict = {}
        self.seen: set[str] = set()  # dests given on the command line

    def _take(self, action: _Action, text: str | None) -> None:
        if action.kind == _OPAQUE:
            raise _Decline  # its own argparse.Action: argparse runs it
        self.seen.add(action.dest)
        if action.kind == _FLAG:
            self.values[action.dest] = action.const
        elif action.kind == _APPEND:
            items = self.values.get(action.dest, action.default)
            # (argparse: a copy of the list so far, None as empty; its default is not changed)
            self.values[action.dest] = [*(items or ()), _convert(action, text)]
        else:
            self.values[action.dest] = _convert(action, text)

    def _value_after(self, i: int) -> str:
        """The next token as an option's value (argparse: it must not look like an option)."""
        if i + 1 >= len(self.tokens) or self.tokens[i + 1].startswith("-"):
            raise _Decline
        return self.tokens[i + 1]

    def _short(self, i: int) -> int:
        """``-x``, ``-xVALUE``, ``-xyz``... at tokens[i]; the index after what it used."""
        token = self.tokens[i]
        if "=" in token:
            raise _Decline  # ("-x=V": argparse versions differ)
        rest = token
        while True:
            action = self.options.get(rest[:2])
            if action is None:
                raise _Decline
            explicit = rest[2:]
            if action.kind != _FLAG:
                if explicit:
                    self._take(action, explicit)
                    return i + 1
                self._take(action, self._value_after(i))
                return i + 2
            self._take(action, None)
            if not explicit:
                return i + 1
            rest = "-" + explicit

    def _long(self, i: int) -> int:
        token = self.tokens[i]
        name, eq, explicit = token.partition("=")
        action = self.options.get(token if token in self.options else name)
        if action is None:
            raise _Decline  # unknown, or an abbreviation: argparse's own rules
        if token in self.options:
            if action.kind == _FLAG:
                self._take(action, None)
                return i + 1
            self._take(action, self._value_after(i))
            return i + 2
        if action.kind == _FLAG:
            raise _Decline  # ("ignored explicit argument")
        self._take(action, explicit)
        return i + 1

    def read(self) -> dict:
        tokens, i = self.tokens, 0
        given: list[str] = []  # the positionals' tokens
        run_ended = False  # an option came after the first positional
        while i < len(tokens):
            token = tokens[i]
            if token == "--":
                if given or "--" in tokens[i + 1:]:
                    raise _Decline
                given += tokens[i + 1:]
                break
            if token.startswith("-"):
                run_ended = bool(given)
                i = self._long(i) if token.startswith("--") else self._short(i)
                continue
            if run_ended:
                raise _Decline  # positionals split by options: argparse's own pairing
            given.append(token)
            i += 1
        self._positionals(given)
        return self._namespace()

    def _positionals(self, given: list[str]) -> None:
        needed = sum(a.required for a in self.positionals)
        if not needed <= len(given) <= len(self.positionals):
            raise _Decline
        if any(a.optional_positional for a in self.positionals[:len(self.positionals) - 1]):
            raise _Decline  # (an optional positional before another: argparse's matching)
        for action, text in zip(self.positionals, given, strict=False):
            self.values[action.dest] = _convert(action, text)
        for action in self.positionals[len(given):]:
            value = action.default
            if isinstance(value, str):
                value = _convert(action, value)
            self.values[action.dest] = value

    def _namespace(self) -> dict:
        out: dict = {}
        for action in dict.fromkeys(self.options.values()):  # (each action once)
            if action.dest in self.seen or action.dest in out:
                continue
            if action.required:
                raise _Decline
            if action.default != SUPPRESS:
                value = action.default
                if isinstance(value, str) and action.type is not None:
                    value = _convert(action, value)
                out[action.dest] = value
        for dest, value in self.defaults.items():  # set_defaults(), when no action set it
            out.setdefault(dest, value)
        out.update(self.values)
        return out


def parse(argv: list[str], command: str, recorder: Recorder,
          root: Recorder) -> Namespace | None:
    """``argv`` (the whole command line) read as argparse reads it, or None.

    ``recorder``: what the subcommand ``command`` registered; ``root``: the root
    parser's options (only flags are read before the subcommand)."""
    if not (recorder.fast and root.fast) or recorder.subcommands is not None:
        return None
    root_options = {s: a for a in root._actions for s in a.option_strings}
    values = {a.dest: a.default for a in root._actions if a.default != SUPPRESS}
    values.update(root._defaults)
    if command not in argv:
        return None
    at = argv.index(command)
    for token in argv[:at]:  # (argparse: the root's options, before the subcommand)
        action = root_options.get(token)
        if action is None or action.kind != _FLAG:
            return None
        values[action.dest] = action.const
    values[root.command_dest] = command
    try:
        values.update(_Reader(recorder, argv[at + 1:]).read())
    except _Decline:
        return None
    return Namespace(**values)
