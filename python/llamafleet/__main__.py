"""``python -m llamafleet``: the same CLI as ``llamafleet``."""

import sys

from .cli import main

sys.exit(main())
