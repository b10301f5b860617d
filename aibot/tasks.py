"""The bodies of the scheduled jobs: each takes the Database and returns a short summary or None.

Kept apart from the scheduler so they can be run by hand (`aibot scheduler --run-once NAME`) and
tested without APScheduler.
"""

from __future__ import annotations

import logging
import os

from aibot import db, doorbell as doorbells

logger = logging.getLogger("aibot.tasks")


def reclaim(database) -> str | None:
    from aibot import jobs

    with database.transaction() as conn:
        n = jobs.reclaim_expired(conn)
        if n:
            doorbells.ring(conn)
    return f"{n} expired lease(s) reclaimed" if n else None


def refresh(database) -> str | None:
    from aibot import cluster

    return cluster.refresh_all(database)


def rebalance(database) -> str | None:
    from aibot import cluster

    summary = cluster.rebalance_and_load(database)
    with database.transaction() as conn:
        rung = doorbells.ring(conn)
    return f"{summary}; {rung} doorbell(s)" if rung else summary


def probe(database) -> str | None:
    from aibot import cluster

    return cluster.probe_due(database)


def prune(database) -> str | None:
    from aibot import jobs

    retention = float(os.environ.get("AIBOT_RETENTION_SECONDS", str(7 * 24 * 3600)))
    with database.transaction() as conn:
        n = jobs.prune(conn, retention)
        db.run(conn, "ticks_prune", {"older_than_seconds": 24 * 3600})
        db.run(conn, "rate_events_prune", {"older_than_seconds": 2 * 3600})
        db.run(conn, "workers_prune", {"older_than_seconds": 3600})
    return f"{n} finished job(s) pruned" if n else None


def doorbell(database) -> str | None:
    with database.transaction() as conn:
        n = doorbells.ring(conn)
    return f"{n} doorbell(s) rung" if n else None


BY_NAME = {"reclaim": reclaim, "refresh": refresh, "rebalance": rebalance, "probe": probe,
           "prune": prune, "doorbell": doorbell}
