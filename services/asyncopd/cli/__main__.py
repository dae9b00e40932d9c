"""`python -m asyncopd.cli ...`: the same as the `asyncopd` console script (the launcher starts services this way)."""

import sys

from asyncopd.cli import main

sys.exit(main())
