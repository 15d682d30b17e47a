"""The ``pyqcow`` command line: ``main.py`` dispatches to one module per subcommand."""
