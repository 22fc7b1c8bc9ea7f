"""`python -m feedrunner`: the `feedrunner` command (how a supervisor starts its workers)."""

import sys

from feedrunner.cli import main

sys.exit(main())
