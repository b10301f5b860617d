"""Wake-ups ("doorbells") for the claim actor.

A doorbell is a Dramatiq message with no arguments: it means "there may be work you can claim". The
jobs table is the queue; doorbells only decide how many claim-actor invocations run. We ring at most
as many as there are claims that could succeed right now (free usable slots matched with runnable
jobs), minus doorbells already waiting, so a burst of 10,000 jobs creates a handful of messages, not
10,000. Busy invocations keep claiming directly after each job, so they need no doorbell.

With the default dramatiq-postgres broker the messages are inserted in the caller's transaction: a job
and its wake-up commit together, and a rolled-back ingest leaves no stray wake-up. Other brokers get
the messages enqueued right away (not transactional); the scheduler's doorbell tick covers any gap.
Either way the message names the claim actor (`ACTOR` on `QUEUE`) instead of importing it: the actor
lives in the Dramatiq entry point (`aibot.actors`), which depends on this module, never the reverse.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import psycopg
from dramatiq import Message

from aibot import db
from aibot.queue import broker

log = logging.getLogger(__name__)
queries = db.Queries(__name__)

QUEUE = "aibot"
ACTOR = "claim"


def matchable(conn: psycopg.Connection) -> int:
    return queries.one(conn, "doorbell_matchable")["matchable"]


def ring(conn: psycopg.Connection, n: int | None = None) -> int:
    """Rings up to the number of claims that could succeed now; returns how many were rung.

    `n` is how much new work the caller just added: 0 skips the query entirely.
    """
    return send_ring(conn, n)()


def send_ring(conn: psycopg.Connection, n: int | None = None) -> Callable[[], int]:
    """`ring`, its count read later: the returned function gives it. With the default broker the
    decision and its messages are one statement (`doorbell_ring`), which in pipeline mode leaves
    with the caller's other statements: the bot's ingest pays for it on the path from a chat
    message to its request at a server."""
    if n == 0:
        return int
    if _broker_is_postgres():
        cur = queries.run(conn, "doorbell_ring", {"queue": QUEUE, "message": json.dumps(_message())})
        return lambda: cur.fetchone()["rung"]
    # Another broker: enqueue through Dramatiq itself, by actor name (not transactional, so at once).
    want = queries.one(conn, "doorbell_wanted")["wanted"]
    process_broker = broker.process_broker()
    process_broker.declare_queue(QUEUE)
    for _ in range(want):
        process_broker.enqueue(_claim_message())
    return lambda: want


def insert_messages(conn: psycopg.Connection, queue: str, messages: list[dict]) -> int:
    """Enqueues Dramatiq messages (their JSON encoding) in dramatiq-postgres' queue table in the
    caller's transaction, with the NOTIFY that wakes its consumers at commit; returns how many."""
    return queries.one(conn, "doorbell_insert", {"queue": queue, "messages": json.dumps(messages)})["n"]


def _claim_message() -> Message:
    """What `claim.send()` would enqueue: a message for the claim actor, with no arguments."""
    return Message(queue_name=QUEUE, actor_name=ACTOR, args=(), kwargs={}, options={})


def _message() -> dict:
    """The JSON dramatiq-postgres stores for a claim message: Dramatiq's own encoding of it."""
    return json.loads(_claim_message().encode())


def _broker_is_postgres() -> bool:
    """The default broker is dramatiq-postgres on the jobs' own database (the caller's connection);
    only a broker URL of another kind (AIBOT_BROKER_URL) selects another."""
    from aibot.settings import get_settings

    url = get_settings().broker_url
    return not url or broker.broker_kind(url) == "postgres"
