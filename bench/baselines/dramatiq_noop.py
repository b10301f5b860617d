"""The transport's ceiling: Dramatiq no-op messages on dramatiq-postgres, configured as aibot's broker.

`dramatiq bench.baselines.dramatiq_noop --processes P --threads T` (with BENCH_DATABASE_URL set) runs the
workers; `enqueue(conn, n)` bulk-inserts n messages in the caller's transaction with the same named
functions aibot's doorbell uses, so enqueueing is not what is measured. Every message is a full broker
round trip (claim, run, ack) — exactly the per-job path aibot avoids by claiming jobs in a loop.
"""

from __future__ import annotations

import json
import os

import dramatiq
from dramatiq import Message

QUEUE = "noop"
ACTOR = "noop"

if os.environ.get("BENCH_DATABASE_URL"):  # only the worker processes build a broker
    from dramatiq_postgres import PostgresBroker

    # The same options as aibot.queue.broker.make_broker, so the comparison is like for like.
    broker = PostgresBroker(url=os.environ["BENCH_DATABASE_URL"], results=False, poll_interval=1.0)
    dramatiq.set_broker(broker)

    @dramatiq.actor(actor_name=ACTOR, queue_name=QUEUE, max_retries=0)
    def noop() -> None:
        """Does nothing: what is left is the broker's own cost per message."""


def enqueue(conn, n: int) -> None:
    """n messages for the no-op actor, each batch with its wake-up NOTIFY, in the caller's transaction."""
    from aibot.queue import doorbell

    messages = [json.loads(Message(queue_name=QUEUE, actor_name=ACTOR, args=(), kwargs={}, options={}).encode())
                for _ in range(n)]
    for start in range(0, n, 5000):
        doorbell.insert_messages(conn, QUEUE, messages[start:start + 5000])
