"""A local deployment of real aibot processes (bot, scheduler, Dramatiq workers) for the demo, the
tests and the benchmarks: `Stack` runs the processes, `write_config`/`entity` describe the personas.
Production code never imports this package.
"""

from aibot.harness.configs import entity, write_config
from aibot.harness.stack import AIBOT_ROOT, FAST_SCHEDULES, Proc, Stack

__all__ = ["AIBOT_ROOT", "FAST_SCHEDULES", "Proc", "Stack", "entity", "write_config"]
