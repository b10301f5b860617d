"""The claim actor: one invocation = take work while there is work and a slot for it.

Dramatiq's retries are off: retries, backoff and dead-lettering live in the jobs table where operators
can see them. The time limit (`Settings.actor_time_limit_seconds`, AIBOT_ACTOR_TIME_LIMIT_SECONDS)
sits above the longest cold model load plus a generation. The actor's name and queue are the
doorbell's (`aibot.queue.doorbell`), which enqueues it by name without importing it.
"""

from __future__ import annotations

import dramatiq

from aibot.actors.lifecycle import runtime
from aibot.queue.doorbell import ACTOR, QUEUE
from aibot.settings import get_settings


@dramatiq.actor(
    actor_name=ACTOR,
    queue_name=QUEUE,
    max_retries=0,
    time_limit=int(get_settings().actor_time_limit_seconds * 1000),
)
def claim() -> None:
    runtime().run_invocation()
