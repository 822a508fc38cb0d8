"""``python -m hahnet`` (also what torchrun runs): the hahnet command."""

from hahnet.cli.commands import entry

entry()
