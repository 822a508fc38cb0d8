"""Layer 7, cli: the ``hahnet`` command. Parses and checks flags (one line and exit
status 2 for a bad one, before any work), shows progress on stderr and prints results;
the work is done by the layers below.

* :mod:`hahnet.cli.commands`: ``main`` and one ``cmd_*`` per subcommand;
* :mod:`hahnet.cli.parsers`: every subcommand's flags;
* :mod:`hahnet.cli.console`: progress bars, per-epoch lines, ETAs, warnings;
* :mod:`hahnet.cli.evaluate`: ``hahnet eval`` once its flags are checked;
* :mod:`hahnet.cli.corruptions`: ``eval --corruptions``' flags and progress.

May import every layer. ``main`` is also importable from here (``hahnet.cli:main``, the
entry point of installed ``hahnet`` scripts).
"""

from hahnet.cli.commands import entry, main

__all__ = ["entry", "main"]
