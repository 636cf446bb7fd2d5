"""``python -m cluo_coord``: cluo-coord without its console script (the container image's
entry point, which has no shell and no scripts directory)."""

import sys

from cluo_coord.main import main

sys.exit(main())
