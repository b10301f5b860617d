"""Dramatiq entry point: `dramatiq aibot.actors` on any host starts workers.

Importing this package builds the broker from the settings (`aibot.queue.broker`: the database URL,
or AIBOT_BROKER_URL for Redis/RabbitMQ), adds the worker lifecycle middleware and declares the claim
actor. Nothing connects until a worker boots. Only Dramatiq imports this package: the work itself is
`aibot.worker.runtime`, which tests and benchmarks drive without a broker, and the doorbells enqueue
the actor by name (`aibot.queue.doorbell`).
"""

from __future__ import annotations

from aibot import log
from aibot.actors.lifecycle import Lifecycle
from aibot.queue import broker as brokers
from aibot.settings import get_settings

log.adopt_handlers(get_settings().log_level)
# Lines logged before the worker boots (the broker's consumer requeueing a dead worker's messages)
# name the process too; `Lifecycle.after_worker_boot` binds the same id again in the booted process.
log.bind_process(worker=get_settings().worker_id())
broker = brokers.process_broker()
broker.add_middleware(Lifecycle())

from aibot.actors.claim import claim  # noqa: E402  (actors bind to the broker set above)

__all__ = ["broker", "claim"]
