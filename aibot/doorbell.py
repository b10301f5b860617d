"""Wake-ups ("doorbells") for the claim actor.

A doorbell is a Dramatiq message with no arguments: it means "there may be work you can claim". The
jobs table is the queue; doorbells only decide how many claim-actor invocations run. We ring at most
as many as there are claims that could succeed right now (free usable slots matched with runnable
jobs), minus doorbells already waiting, so a burst of 10,000 jobs creates a handful of messages, not
10,000. Busy invocations keep claiming directly after each job, so they need no doorbell.

With the default dramatiq-postgres broker the messages are inserted in the caller's transaction: a job
and its wake-up commit together, and a rolled-back ingest leaves no stray wake-up. Other brokers get
the messages enqueued right away (not transactional); the scheduler's doorbell tick covers any gap.
"""

from __future__ import annotations

import json
import logging
import os
import psycopg
from dramatiq import Message

from aibot import db

log = logging.getLogger("aibot.doorbell")

QUEUE = "aibot"
ACTOR = "claim"


def matchable(conn: psycopg.Connection) -> int:
    return db.one(conn, "doorbell_matchable")["matchable"]


def ring(conn: psycopg.Connection, n: int | None = None) -> int:
    """Rings up to the number of claims that could succeed now; returns how many were rung.

    `n` is how much new work the caller just added: 0 skips the (cheap) capacity query entirely.
    """
    if n == 0:
        return 0
    want = matchable(conn)
    if want <= 0:
        # Nothing claimable, but work may wait for a model no server holds: one wake-up makes a
        # worker come up empty and start its demand loader now rather than at the next rebalance tick.
        if not db.one(conn, "doorbell_unplaced_demand")["waiting"]:
            return 0
        want = 1
    if _broker_is_postgres():
        outstanding = db.one(conn, "doorbell_outstanding", {"queue": QUEUE})["n"]
        count = want - outstanding
        if count <= 0:
            return 0
        messages = [_message() for _ in range(count)]
        db.run(conn, "doorbell_insert", {"queue": QUEUE, "messages": json.dumps(messages)})
        db.run(conn, "doorbell_notify", {"queue": QUEUE})
        return count
    from aibot.actors import claim  # a non-Postgres broker: enqueue through Dramatiq itself

    for _ in range(want):
        claim.send()
    return want


def _message() -> dict:
    """The JSON dramatiq-postgres stores for `claim.send()`: Dramatiq's own encoding of the message."""
    return json.loads(Message(queue_name=QUEUE, actor_name=ACTOR, args=(), kwargs={}, options={}).encode())


def _broker_is_postgres() -> bool:
    """The default broker is dramatiq-postgres on the jobs' own database (the caller's connection);
    only an explicit AIBOT_BROKER_URL selects another."""
    from aibot.actors.broker import broker_kind

    url = os.environ.get("AIBOT_BROKER_URL")
    return not url or broker_kind(url) == "postgres"
