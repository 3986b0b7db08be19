"""``python -m pipo``: the ``pipo`` command."""

import sys

from pipo.cli import main

sys.exit(main())
