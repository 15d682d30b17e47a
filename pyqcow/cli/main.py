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
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from .._version import __version__
from ..errors import QcowError

__all__ = ["SUBCOMMANDS", "ArgumentParser", "build_parser", "entry", "main"]

#: Subcommand modules under pyqcow.cli, in the order ``--help`` lists them.
SUBCOMMANDS: list[str] = ["info", "map", "check", "convert", "compare", "dump", "orphans", "hash"]
#: Chain operations and libvirt XML.
SUBCOMMANDS += ["create", "commit", "stream", "rebase", "merge", "recover", "xml", "domain"]
SUBCOMMANDS += ["snapshot"]  # internal snapshots
SUBCOMMANDS += ["mount"]  # read-only FUSE mount (pyqcow[fuse])
SUBCOMMANDS += ["resize", "measure", "amend", "bitmap"]  # offline maintenance (issue 15)

EXIT_INTERRUPTED = 130


class UsageError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` picks the status."""

    error_status = 1

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self, message)

    def _get_formatter(self):
        # argparse builds a formatter for every add_argument (to check metavars), and
        # its width comes from shutil.get_terminal_size: shutil (with bz2, lzma,
        # fnmatch) is a few ms of start-up.  Same width, same rules, without it.
        return self.formatter_class(prog=self.prog, width=_terminal_columns() - 2)


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns`` (COLUMNS, then stdout's terminal, then 80)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        columns = columns or 80
    return columns


def _message_languages() -> list[str]:
    """The languages gettext looks up messages in, read as ``gettext.find`` reads them."""
    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(var)
        if value:
            return value.split(":")
    return []


def _argparse_without_catalogue() -> None:
    """argparse passes each of its messages through gettext, which searches the file
    system for a catalogue at every call (a dozen stats per parser, and ``locale``'s
    import): milliseconds of a command's start-up.  When no catalogue exists for
    argparse's domain, as almost always, those calls return their argument: make
    them do only that.  Same messages, byte for byte; with a catalogue, untouched."""
    import gettext

    if argparse._ is not gettext.gettext or argparse.ngettext is not gettext.ngettext:
        return  # done already (or someone else's choice)
    languages = _message_languages()
    if languages and languages[0] != "C":  # gettext stops at "C": no lookup at all
        domain = gettext.textdomain()
        if gettext.find(domain, gettext.bindtextdomain(domain)):
            return
    argparse._ = _untranslated
    argparse.ngettext = _untranslated_n


def _untranslated(message: str) -> str:
    return message


def _untranslated_n(singular: str, plural: str, n: int) -> str:
    return singular if n == 1 else plural


def build_parser(only: str | None = None) -> ArgumentParser:
    """The full parser, or (``only``) one that imports and knows just that subcommand."""
    _argparse_without_catalogue()
    parser = ArgumentParser(
        prog="pyqcow",
        description="Inspect, convert and manage qcow2 images and backing chains.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show a Python traceback when something fails"
    )
    parser.add_argument("--version", action="version", version=f"pyqcow {__version__}")
    # prog given: argparse would otherwise build a help formatter (and import shutil)
    # just to compute it; "pyqcow" is what it computes (the root has no positionals)
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, prog=parser.prog
    )
    for name in SUBCOMMANDS if only is None else [only]:
        # (__import__, not importlib.import_module: importlib is one import less)
        __import__(f"{__package__}.{name}")
        module = sys.modules[f"{__package__}.{name}"]
        sub = module.register(subparsers)
        sub.error_status = getattr(module, "ERROR_STATUS", 1)
        sub.set_defaults(_run=module.run, _error_status=sub.error_status)
        if not any("--debug" in a.option_strings for a in sub._actions):
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS)
    return parser


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
        parser = build_parser(only)
        try:
            args = parser.parse_args(argv)
        except UsageError as e:
            sys.stderr.write(e.parser.format_usage())
            sys.stderr.write(f"{e.parser.prog}: error: {e.message}\n")
            return e.parser.error_status
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
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
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def entry() -> None:
    """Console-script entry point (``pyqcow = "pyqcow.cli.main:entry"``).

    Ctrl-C at any moment from here on ends the process with ``pyqcow:
    interrupted`` and exit status 130, never a traceback.  A launcher may start
    the process with SIGINT blocked (e.g. ``env --block-signal=INT``), which
    covers the interpreter's own start-up: a Ctrl-C that came meanwhile stays
    pending and is delivered here, once the handler is in place.
    """
    import signal

    status = EXIT_INTERRUPTED
    try:
        signal.signal(signal.SIGINT, _on_sigint)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        status = main()
    except KeyboardInterrupt:  # outside main's own try (its first or last lines)
        _error("interrupted")
        status = EXIT_INTERRUPTED
    finally:
        # the work is done (or abandoned): a Ctrl-C now must not change the outcome
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    entry()
