"""``-t CACHE`` / ``-T SRC_CACHE`` for the commands that write (as qemu-img).

``add_cache_options(parser)`` adds the options; the mode takes effect when the
option is parsed (``pyqcow.hostfile.set_cache_mode``), before the command opens
any file.  Registering resets both modes to writeback, so in-process callers of
``main()`` never inherit a previous call's mode.
"""

from __future__ import annotations

from ..hostfile import CACHE_MODES, set_cache_mode

_HELP = {
    False: "cache mode of the image written: writeback (default), unsafe (no fsync: fast, "
           "not crash-safe), none (O_DIRECT data writes where supported), writethrough, "
           "directsync",
    True: "cache mode of the source read: writeback (default), none or directsync (its "
          "pages are dropped from the page cache after the copy), unsafe, writethrough",
}


TYPE_CHECKING = False  # typing loads for type checkers only (start-up time)
if TYPE_CHECKING:
    import argparse

_ACTION_CLASS: list = []  # _CacheAction, made on first use (argparse loads only then)


def _cache_action(**kwargs):
    """add_argument's ``action``: a _CacheAction (its class needs argparse, which the
    commands load only when pyqcow.cli.fastargs cannot read the line)."""
    if not _ACTION_CLASS:
        import argparse

        class _CacheAction(argparse.Action):
            def __init__(self, *args, source: bool = False, **kw) -> None:
                self.source = source
                super().__init__(*args, **kw)

            def __call__(self, parser, namespace, value, option_string=None) -> None:
                if value not in CACHE_MODES:
                    parser.error(f"invalid cache option {value!r} for {option_string} "
                                 f"(use {', '.join(CACHE_MODES)})")
                set_cache_mode(value, source=self.source)
                setattr(namespace, self.dest, value)

        _ACTION_CLASS.append(_CacheAction)
    return _ACTION_CLASS[0](**kwargs)


def add_cache_options(p: argparse.ArgumentParser, *, source: bool = False) -> None:
    """Add ``-t CACHE`` (and ``-T SRC_CACHE`` with ``source=True``)."""
    set_cache_mode("writeback")
    set_cache_mode("writeback", source=True)
    p.add_argument("-t", dest="cache", metavar="CACHE", action=_cache_action,
                   default="writeback", help=_HELP[False])
    if source:
        p.add_argument("-T", dest="src_cache", metavar="SRC_CACHE", action=_cache_action,
                       source=True, default="writeback", help=_HELP[True])
