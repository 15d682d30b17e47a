"""pyqcow.cli.fastargs reads a command line exactly as argparse does, or declines.

For generated command lines of the subcommands main reads without argparse
(main.FAST_COMMANDS), valid and invalid mixes of their own options (exact,
abbreviated, ``--opt=value``, ``-xVALUE``, combined flags), values (in and out of
the choices, empty, option-like, ``--``) and positionals: whenever the fast parser
returns a namespace, argparse accepts the same line and returns the same
attributes.  (It may decline anything; then main uses argparse itself.)  Also:
the usual forms are not declined, and a subcommand with something the recorder
does not model is never read by it.
"""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyqcow.cli import fastargs, main
from pyqcow.cli.parser import UsageError
from pyqcow.hostfile import set_cache_mode


def argparse_reading(argv: list[str], command: str) -> dict | None:
    """vars() of argparse's namespace for argv, None if argparse refuses it (or helps)."""
    parser = main.build_parser(command)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return vars(parser.parse_args(argv))
    except (UsageError, SystemExit):
        return None
    finally:
        set_cache_mode("writeback")  # (-t/-T set it while argparse parses)
        set_cache_mode("writeback", source=True)


def fast_reading(argv: list[str], command: str) -> dict | None:
    args = main._fast_parse(argv, command)
    return None if args is None else vars(args)


def _sub_parser(command: str):
    parser = main.build_parser(command)
    return parser._subparsers._group_actions[0].choices[command]


def _vocabulary(command: str) -> tuple[list[str], list[str], list[str]]:
    """(option strings, short flags, values) of the command's real argparse parser."""
    sub = _sub_parser(command)
    options = sorted(sub._option_string_actions)
    flags = sorted(s for s, a in sub._option_string_actions.items()
                   if len(s) == 2 and a.nargs == 0)
    values = {"", "-", "--", "-1", "a b", "=", "x.qcow2", "top.qcow2", "1G", "64k", "0x10",
              "-x", "--x", "qcow2", "raw", "json", "human", "leaks", "unsafe", "bogus"}
    for action in sub._actions:
        values.update(str(c) for c in action.choices or ())
    return options, flags, sorted(values)


def _tokens(command: str):
    options, flags, values = _vocabulary(command)
    longs = [o for o in options if o.startswith("--")]
    shorts = [o for o in options if not o.startswith("--")]
    value = st.sampled_from(values) | st.text(alphabet="-=aq1G.x ", max_size=5)
    return st.one_of(
        st.sampled_from(options),
        value,
        st.builds(lambda o, v: f"{o}={v}", st.sampled_from(longs), value),
        st.builds(lambda o, n: o[:n], st.sampled_from(longs), st.integers(3, 12)),
        st.builds(lambda o, v: o + v, st.sampled_from(shorts), value),
        st.builds(lambda fs, o: "-" + "".join(f[1] for f in fs) + o[1:],
                  st.lists(st.sampled_from(flags), min_size=1, max_size=3),
                  st.sampled_from(shorts)),
    )


@st.composite
def command_lines(draw, command: str) -> list[str]:
    root = draw(st.lists(st.sampled_from(["--debug", "--debug", "--version", "-h", "--deb"]),
                         max_size=2))
    rest = draw(st.lists(_tokens(command), max_size=8))
    if draw(st.booleans()):  # most lines name an image
        rest.insert(draw(st.integers(0, len(rest))), "img.qcow2")
    return [*root, command, *rest]


_PLAUSIBLE = ["x.qcow2", "", "1G", "64k", "0", "base.qcow2", "unsafe", "vda", "cluster_size=64k",
              "-1", "-x.qcow2", "--"]


@st.composite
def _option_items(draw, command: str) -> list[str]:
    """One option of the command, well formed, in one of the spellings argparse reads."""
    sub = _sub_parser(command)
    action = draw(st.sampled_from([a for a in sub._actions
                                   if a.option_strings and a.dest != "help"]))
    option = draw(st.sampled_from(action.option_strings))
    if action.nargs == 0:
        return [option]
    value = draw(st.sampled_from(sorted(map(str, action.choices or ())) or _PLAUSIBLE))
    if option.startswith("--"):
        return draw(st.sampled_from([[option, value], [f"{option}={value}"]]))
    return draw(st.sampled_from([[option, value], [option + value]]))


@st.composite
def well_formed_lines(draw, command: str) -> list[str]:
    """Mostly lines argparse accepts: options, the positionals in one run, sometimes a
    stray token among them."""
    items = draw(st.lists(_option_items(command), max_size=5))
    if command == "rebase" and draw(st.booleans()):
        items.append(["-b", draw(st.sampled_from(_PLAUSIBLE))])
    images = ["img.qcow2"] + (draw(st.sampled_from([[], ["1G"]])) if command == "create" else
                              ["out.qcow2"] if command in ("convert", "compare") else [])
    if draw(st.booleans()):
        images = ["--", *images]
    items.insert(draw(st.integers(0, len(items))), images)
    for _ in range(draw(st.integers(0, 1))):
        items.insert(draw(st.integers(0, len(items))), [draw(_tokens(command))])
    argv = [token for item in items for token in item]
    # combined short flags: "-u", "-q" -> "-uq"
    if draw(st.booleans()):
        for i in range(len(argv) - 1):
            a, b = argv[i], argv[i + 1]
            if len(a) == 2 and a[0] == "-" != a[1] and b[:1] == "-" and b[1:2] not in ("-", ""):
                argv[i:i + 2] = [a + b[1:]]
                break
    return [*draw(st.sampled_from([[], ["--debug"]])), command, *argv]


def _check(argv: list[str], command: str) -> None:
    fast = fast_reading(argv, command)
    if fast is not None:
        assert argparse_reading(argv, command) == fast, argv


@pytest.mark.parametrize("command", sorted(main.FAST_COMMANDS))
@given(data=st.data())
def test_fast_reading_is_argparses_or_nothing(command: str, data) -> None:
    argv = data.draw(command_lines(command))
    _check(argv, command)


@pytest.mark.parametrize("command", sorted(main.FAST_COMMANDS))
@given(data=st.data())
def test_fast_reading_of_well_formed_lines_is_argparses(command: str, data) -> None:
    argv = data.draw(well_formed_lines(command))
    _check(argv, command)


# the usual forms, and near misses argparse reads differently or refuses
USUAL = [
    ["info", "top.qcow2"],
    ["info", "--output=json", "top.qcow2"],
    ["info", "--output", "json", "--backing-chain", "-U", "top.qcow2"],
    ["info", "-fqcow2", "top.qcow2"],
    ["info", "-Ufraw", "top.qcow2"],
    ["info", "top.qcow2", "--output", "json"],
    ["info", "--", "-top.qcow2"],
    ["--debug", "info", "top.qcow2"],
    ["info", "--debug", "top.qcow2"],
    ["map", "--output=json", "--start-offset", "64k", "--max-length=1M", "top.qcow2"],
    ["map", "top.qcow2"],
    ["check", "-q", "-r", "leaks", "top.qcow2"],
    ["check", "--output=json", "-Uf", "qcow2", "top.qcow2"],
    ["check", "-rall", "top.qcow2"],
    ["create", "-q", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2"],
    ["create", "-o", "cluster_size=64k", "-o", "compat=1.1", "new.qcow2", "1G"],
    ["create", "-uqb", "base.qcow2", "new.qcow2", "1G"],
    ["create", "--dry-run", "--domain-xml=d.xml", "--disk", "vda", "-b", "b", "new.qcow2"],
    ["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2"],
    ["rebase", "-uq", "-b", "", "ov.qcow2"],
    ["rebase", "-pb", "base.qcow2", "ov.qcow2"],
    ["commit", "-q", "top.qcow2"],
    ["commit", "-pb", "base.qcow2", "top.qcow2"],
    ["stream", "-q", "top.qcow2"],
    ["merge", "--keep", "top", "top.qcow2"],
    ["convert", "-O", "qcow2", "top.qcow2", "out.qcow2"],
    ["convert", "-O", "raw", "-p", "top.qcow2", "out.raw"],
    ["compare", "-q", "a.qcow2", "b.qcow2"],
    ["measure", "--size", "1G", "-O", "qcow2"],
]
NOT_FAST = [
    ["info"], ["info", "-h"], ["info", "--help"], ["--version", "info"], ["info", "--out=json", "t"],
    ["info", "--output=xml", "t"], ["info", "a", "b"], ["info", "-x", "t"], ["info", "--", "--"],
    ["info", "--output", "--", "t"], ["info", "-f=raw", "t"], ["info", "-U=1", "t"],
    ["create", "a", "-q", "1G"], ["create", "-o"], ["map", "--start-offset", "1Q", "t"],
    ["map", "--start-offset=-1", "t"], ["create", "-b", "-1", "t"], ["create", "-b", "-x", "t"], ["rebase", "ov.qcow2"], ["rebase", "-t", "unsafe", "-u",
    "-b", "b", "ov.qcow2"], ["check", "-r", "--", "t"], ["--debug=1", "info", "t"],
]


@pytest.mark.parametrize("argv", USUAL, ids=" ".join)
def test_usual_forms_are_read_without_argparse(argv: list[str]) -> None:
    command = next(a for a in argv if a != "--debug")
    fast = fast_reading(argv, command)
    assert fast is not None
    assert fast == argparse_reading(argv, command)


@pytest.mark.parametrize("argv", NOT_FAST, ids=" ".join)
def test_other_forms_are_left_to_argparse(argv: list[str]) -> None:
    command = next(a for a in argv if not a.startswith("--"))
    assert fast_reading(argv, command) is None


def test_recorder_models_the_fast_commands_and_nothing_it_cannot() -> None:
    for command in main.FAST_COMMANDS:
        root = fastargs.Recorder()
        sub = main._add_subcommand(main._add_root(root), command, fastargs.SUPPRESS)
        assert sub.fast and root.fast, command
    # nested subcommands, mutually exclusive options, other nargs: never read
    for build in (lambda p: p.add_subparsers(dest="x"),
                  lambda p: p.add_mutually_exclusive_group().add_argument("-a"),
                  lambda p: p.add_argument("-a", nargs="+"),
                  lambda p: p.add_argument("-a", action="count"),
                  lambda p: p.add_argument("-abc")):
        root = fastargs.Recorder()
        sub = main._add_root(root).add_parser("x")
        build(sub)
        sub.add_argument("image")
        assert fastargs.parse(["x", "i"], "x", sub, root) is None


def test_namespace_compares_and_contains_as_argparses() -> None:
    ns = fastargs.Namespace(a=1, b="x")
    assert ns == fastargs.Namespace(b="x", a=1) and ns != fastargs.Namespace(a=1)
    assert "a" in ns and "c" not in ns
    assert repr(ns) == "Namespace(a=1, b='x')"


@example(["info", "--", "a"])
@given(st.lists(st.sampled_from(["--", "a", "b", "-q", "--output", "json", "-U"]), max_size=6))
def test_double_dash_and_positionals(tokens: list[str]) -> None:
    _check(["create" if "b" in tokens else "info", *tokens],
           "create" if "b" in tokens else "info")
