"""Dramatiq entry point: `dramatiq aibot.actors` on any host starts workers.

Importing this module builds the broker from the environment (AIBOT_DATABASE_URL, or AIBOT_BROKER_URL
for Redis/RabbitMQ) and declares the actors. Nothing connects until a worker boots.
"""

from __future__ import annotations

import dramatiq

from aibot import log
from aibot.actors.broker import make_broker
from aibot.actors.lifecycle import Lifecycle

log.adopt_handlers()
broker = make_broker()
broker.add_middleware(Lifecycle())
dramatiq.set_broker(broker)

from aibot.actors.claim import claim  # noqa: E402  (actors bind to the broker set above)

__all__ = ["broker", "claim"]
