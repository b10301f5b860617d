"""The claim actor: one invocation = take work while there is work and a slot for it.

Dramatiq's retries are off: retries, backoff and dead-lettering live in the jobs table where operators
can see them. The time limit sits above the longest cold model load plus a generation.
"""

from __future__ import annotations

import os

import dramatiq

from aibot.actors.lifecycle import runtime
from aibot.doorbell import ACTOR, QUEUE


@dramatiq.actor(
    actor_name=ACTOR,
    queue_name=QUEUE,
    max_retries=0,
    time_limit=int(float(os.environ.get("AIBOT_ACTOR_TIME_LIMIT_SECONDS", "1200")) * 1000),
)
def claim() -> None:
    runtime().run_invocation()
