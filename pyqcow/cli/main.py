"""``pyqcow`` entry point: argparse root, subcommand dispatch, errors -> exit status.

Adding a subcommand: write ``pyqcow/cli/<name>.py`` with

    def register(subparsers) -> argparse.ArgumentParser:
        p = subparsers.add_parser("<name>", help="...")
        p.add_argument(...)
        return p

    def run(args: argparse.Namespace) -> int:
        ...                     # data on stdout, messages on stderr
        return 0

(optionally ``ERROR_STATUS = 2`` if errors must exit with something other than 1,
as ``compare`` does) and append ``"<name>"`` to ``SUBCOMMANDS`` below.  ``run``
raises ``QcowError`` (or lets ``OSError`` through) for failures; ``main`` turns
them into one ``pyqcow: <file>: <what is wrong>`` line on stderr.

The command line of the small commands (``FAST_COMMANDS``) is read without argparse
when its meaning is certain (pyqcow.cli.fastargs: the subcommand's ``register`` runs
against a recorder, so the options are still declared once); anything else, help and
errors included, goes through argparse (pyqcow.cli.parser), loaded only then.
"""

from __future__ import annotations

import os
import sys
import warnings

from .._version import __version__
from ..errors import QcowError

TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["FAST_COMMANDS", "SUBCOMMANDS", "build_parser", "entry", "main"]

#: Subcommand modules under pyqcow.cli, in the order ``--help`` lists them.
SUBCOMMANDS: list[str] = ["info", "map", "check", "convert", "compare", "dump", "orphans", "hash"]
#: Chain operations and libvirt XML.
SUBCOMMANDS += ["create", "commit", "stream", "rebase", "merge", "recover", "xml", "domain"]
SUBCOMMANDS += ["snapshot"]  # internal snapshots
SUBCOMMANDS += ["mount"]  # read-only FUSE mount (pyqcow[fuse])
SUBCOMMANDS += ["resize", "measure", "amend", "bitmap"]  # offline maintenance (issue 15)

#: The subcommands whose command line pyqcow.cli.fastargs reads without argparse when
#: it can (the small commands scripts run in loops, and the chain and copy commands:
#: building argparse's parser is ~10 ms of start-up, issue 14)
FAST_COMMANDS = frozenset({"info", "map", "check", "create", "rebase", "commit", "stream",
                           "merge", "convert", "compare", "measure", "amend"})

EXIT_INTERRUPTED = 130


def _add_root(parser):
    """The root's options and its subcommands' action, on an argparse parser or on a
    fastargs.Recorder (one declaration for both)."""
    parser.add_argument(
        "--debug", action="store_true", help="show a Python traceback when something fails"
    )
    parser.add_argument("--version", action="version", version=f"pyqcow {__version__}")
    # prog given: argparse would otherwise build a help formatter (and import shutil)
    # just to compute it; "pyqcow" is what it computes (the root has no positionals)
    return parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, prog=parser.prog
    )


def _add_subcommand(subparsers, name: str, suppress: str):
    """Import pyqcow.cli.NAME and register its parser (argparse's, or a Recorder's;
    ``suppress``: argparse.SUPPRESS, or fastargs' for a recorder)."""
    # (__import__, not importlib.import_module: importlib is one import less)
    __import__(f"{__package__}.{name}")
    module = sys.modules[f"{__package__}.{name}"]
    sub = module.register(subparsers)
    sub.error_status = getattr(module, "ERROR_STATUS", 1)
    sub.set_defaults(_run=module.run, _error_status=sub.error_status)
    if not any("--debug" in a.option_strings for a in sub._actions):
        sub.add_argument("--debug", action="store_true", default=suppress, help=suppress)
    return sub


def build_parser(only: str | None = None):
    """The full argparse parser, or (``only``) one that imports and knows just that
    subcommand."""
    from .parser import SUPPRESS, new_root_parser  # argparse: only now (start-up time)

    parser = new_root_parser(
        prog="pyqcow",
        description="Inspect, convert and manage qcow2 images and backing chains.",
    )
    subparsers = _add_root(parser)
    for name in SUBCOMMANDS if only is None else [only]:
        _add_subcommand(subparsers, name, SUPPRESS)
    return parser


def _fast_parse(argv: list[str], name: str):
    """argv read without argparse (pyqcow.cli.fastargs), or None: argparse's turn."""
    from . import fastargs

    try:
        root = fastargs.Recorder()
        sub = _add_subcommand(_add_root(root), name, fastargs.SUPPRESS)
        return fastargs.parse(argv, name, sub, root)
    except Exception:  # noqa: BLE001 - whatever it is, argparse decides
        return None


def _parse(argv: list[str], only: str | None):
    """(namespace, None), or (None, exit status) when argparse printed help or an error."""
    if only in FAST_COMMANDS:
        args = _fast_parse(argv, only)
        if args is not None:
            return args, None
    from .parser import UsageError

    parser = build_parser(only)
    try:
        return parser.parse_args(argv), None
    except UsageError as e:
        sys.stderr.write(e.parser.format_usage())
        sys.stderr.write(f"{e.parser.prog}: error: {e.message}\n")
        return None, e.parser.error_status
    except SystemExit as e:  # --help, --version
        return None, e.code if isinstance(e.code, int) else 0


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n")).strip()


def _error(message: str) -> None:
    sys.stderr.write(f"pyqcow: {_one_line(message)}\n")
    sys.stderr.flush()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _error(f"warning: {message}")


def _print_traceback() -> None:
    import traceback  # only for --debug (start-up time)

    traceback.print_exc()


def _describe_oserror(e: OSError) -> str:
    what = e.strerror or str(e)
    if e.filename is not None:
        names = os.fsdecode(e.filename)
        if getattr(e, "filename2", None) is not None:
            names += f" -> {os.fsdecode(e.filename2)}"
        return f"{names}: {what}"
    return what


def main(argv: Sequence[str] | None = None) -> int:
    """Run one pyqcow command; returns the exit status (never raises for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cut = argv.index("--")
    except ValueError:
        cut = len(argv)
    debug = "--debug" in argv[:cut]
    error_status = 1
    # import only the chosen subcommand's module (start-up time), unless asking for help
    first = next((a for a in argv[:cut] if a != "--debug"), None)
    only = first if first in SUBCOMMANDS else None
    try:
        # every command starts with qemu-img's default cache mode (-t/-T set it while
        # parsing): an earlier in-process call's `-t unsafe` must not carry over
        from ..hostfile import set_cache_mode

        set_cache_mode("writeback")
        set_cache_mode("writeback", source=True)
        args, status = _parse(argv, only)
        if args is None:
            return status
        error_status = args._error_status
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if getattr(args, "quiet", False):
                warnings.simplefilter("ignore")  # -q silences everything, warnings too
            status = args._run(args)
        return int(status or 0)
    except KeyboardInterrupt:
        if debug:
            _print_traceback()
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout went away (e.g. `pyqcow map big.qcow2 | head`): stop quietly.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return error_status
    except QcowError as e:
        if debug:
            _print_traceback()
        _error(str(e))
        return error_status
    except OSError as e:
        if debug:
            _print_traceback()
        _error(_describe_oserror(e))
        return error_status
    except MemoryError:
        if debug:
            _print_traceback()
        _error("out of memory")
        return error_status
    except Exception as e:  # noqa: BLE001 - a bug must still not show a traceback
        if debug:
            _print_traceback()
            _error(f"internal error: {type(e).__name__}: {e}")
        else:
            _error(
                f"internal error: {type(e).__name__}: {e} (run with --debug for a traceback)"
            )
        return error_status


def _on_sigint(signum, frame) -> None:
    """The first Ctrl-C raises KeyboardInterrupt (wherever the program is: main
    turns it into one line and status 130); later ones are ignored while the
    operation stops, so that no second KeyboardInterrupt can interrupt the
    clean-up or the message and show a traceback."""
    import _signal

    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    raise KeyboardInterrupt


def entry() -> None:
    """Console-script entry point (``pyqcow = "pyqcow.cli.main:entry"``).

    Ctrl-C at any moment from here on ends the process with ``pyqcow:
    interrupted`` and exit status 130, never a traceback.  A launcher may start
    the process with SIGINT blocked (e.g. ``env --block-signal=INT``), which
    covers the interpreter's own start-up: a Ctrl-C that came meanwhile stays
    pending and is delivered here, once the handler is in place.
    """
    # _signal, not signal: the signal module turns its constants into enums at import
    # (enum, functools, collections: milliseconds of start-up); same functions
    import _signal

    status = EXIT_INTERRUPTED
    try:
        _signal.signal(_signal.SIGINT, _on_sigint)
        if hasattr(_signal, "pthread_sigmask"):
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {_signal.SIGINT})
        status = main()
    except KeyboardInterrupt:  # outside main's own try (its first or last lines)
        _error("interrupted")
        status = EXIT_INTERRUPTED
    finally:
        # the work is done (or abandoned): a Ctrl-C now must not change the outcome
        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    entry()
