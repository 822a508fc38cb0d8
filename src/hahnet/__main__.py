"""``python -m hahnet`` (also what torchrun runs): the hahnet command."""

import sys

from hahnet.cli import main

sys.exit(main())
