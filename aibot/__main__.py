import sys

from aibot.cli import main

sys.exit(main())
