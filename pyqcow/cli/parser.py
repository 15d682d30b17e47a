"""argparse for ``pyqcow``: the parser class main uses when the command line is not
one that pyqcow.cli.fastargs reads on its own (help, errors, other commands).

Loaded only then (start-up time): argparse, with re and gettext, is milliseconds.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["SUPPRESS", "ArgumentParser", "UsageError", "new_root_parser"]

SUPPRESS = argparse.SUPPRESS


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


def new_root_parser(**kwargs) -> ArgumentParser:
    """The root parser (``ArgumentParser(**kwargs)``), argparse's messages set up first."""
    _argparse_without_catalogue()
    return ArgumentParser(**kwargs)
