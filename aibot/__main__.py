"""`python -m aibot`: the same command line as `aibot` (the harness starts processes this way)."""

import sys

from aibot.cli import main

sys.exit(main())
