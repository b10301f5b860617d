"""`python -m aibot.sim ...` is `aibot sim ...`."""

import sys

from aibot.cli import main

sys.exit(main(["sim", *sys.argv[1:]]))
