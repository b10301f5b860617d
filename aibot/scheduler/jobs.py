"""The scheduled jobs, each declared once: name, default schedule, the harness's fast schedule, help,
and the body (which takes the Database and returns a one-line summary, or None when nothing changed).

`aibot.scheduler.runner` schedules every job declared here, `aibot scheduler --list/--run-once`
lists and runs them, and the harness derives its fast schedules from them; adding a job is adding a
decorated function below. The bodies compose the packages' own functions (which return data) and
word the summary; they hold no rule of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from aibot import db
from aibot.backends.factory import backend_for_server
from aibot.cluster import health, loader, refresh
from aibot.queue import doorbell, jobs, ratelimit
from aibot.settings import get_settings, schedule_variable
from aibot.worker import registry

logger = logging.getLogger(__name__)
queries = db.Queries(__name__)

Body = Callable[[db.Database], "str | None"]

TICK_RETENTION_SECONDS = 24 * 3600      # tick rows are only a guard; a day of history is plenty
RATE_EVENT_RETENTION_SECONDS = 2 * 3600  # longer than every rate-limit window
WORKER_RETENTION_SECONDS = 3600          # processes that stopped heartbeating long ago (crashed, killed -9)


@dataclass(frozen=True)
class Schedule:
    """One scheduled job. `default` applies unless `AIBOT_SCHEDULE_<NAME>` says otherwise; `fast` is
    what the harness (tests, demo, benchmarks) runs it at, None for the default."""

    name: str
    default: str
    body: Body
    help: str
    fast: str | None = None

    @property
    def variable(self) -> str:
        return schedule_variable(self.name)


_REGISTRY: dict[str, Schedule] = {}


def scheduled(name: str, *, every: str, help: str, fast: str | None = None) -> Callable[[Body], Body]:
    """Declares the decorated function as the scheduled job `name`."""
    def register(body: Body) -> Body:
        if name in _REGISTRY:
            raise ValueError(f"scheduled job {name!r} is declared twice")
        _REGISTRY[name] = Schedule(name, every, body, help, fast)
        return body
    return register


def schedules() -> list[Schedule]:
    """Every scheduled job, in declaration order."""
    return list(_REGISTRY.values())


def get(name: str) -> Schedule:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown job {name!r}; choose from {', '.join(_REGISTRY)}") from None


def fast_schedules() -> dict[str, str]:
    """The environment the harness gives its processes: every job with a fast schedule at it."""
    return {s.variable: s.fast for s in schedules() if s.fast}


# Every 5 s: with the 20 s lease a killed worker's jobs are queued again within 25 s (docs/reliability.md).
@scheduled("reclaim", every="5s", fast="1s", help="expired leases back to queued (or dead past max attempts)")
def reclaim(database: db.Database) -> str | None:
    with database.transaction() as conn:
        n = jobs.reclaim_expired(conn)
        if n:
            doorbell.ring(conn)
    return f"{n} expired lease(s) reclaimed" if n else None


@scheduled("refresh", every="15s", fast="1s", help="servers' loaded models and memory into Postgres")
def refresh_servers(database: db.Database) -> str | None:
    return describe_refresh(refresh.refresh_all(database))


def describe_refresh(done: refresh.RefreshPass) -> str | None:
    """One line for a refresh pass (also what `aibot plan` prints after refreshing), None if nothing changed."""
    if not done:
        return None
    parts = [f"{len(done.results)} server(s) refreshed"]
    if done.changed:
        parts.append("changed: " + ", ".join(f"{r.server} +{len(r.added)} -{len(r.removed)}" for r in done.changed))
    if done.failed:
        parts.append("failed: " + ", ".join(r.server for r in done.failed))
    if done.deltas:
        parts.append(f"{len(done.deltas)} slot pair(s) resized")
    return "; ".join(parts)


@scheduled("rebalance", every="30s", fast="1s",
           help="slots per (server, model); load/unload models for the queued demand")
def rebalance(database: db.Database) -> str | None:
    summary = describe_demand(loader.rebalance_and_load(database))
    with database.transaction() as conn:
        rung = doorbell.ring(conn)
    return f"{summary}; {rung} doorbell(s)" if rung else summary


def describe_demand(done: loader.DemandPass) -> str | None:
    """One line for a rebalance-and-load pass, None if nothing changed."""
    if not done:
        return None
    parts = [f"{len(done.deltas)} slot pair(s) resized"]
    if done.loaded:
        parts.append("loaded " + ", ".join(done.loaded))
    if done.failed:
        parts.append("not loaded: " + "; ".join(done.failed))
    return "; ".join(parts)


@scheduled("probe", every="2s", fast="1s", help="health probes of servers whose backoff has expired")
def probe(database: db.Database) -> str | None:
    states = health.probe_due(database, backend_for_server)
    if any(s.health == "healthy" for s in states):
        # A server is back: wake idle workers now, not at the next doorbell tick (recovery in seconds).
        with database.transaction() as conn:
            doorbell.ring(conn)
    return ", ".join(f"{s.name}: {s.health}" for s in states) if states else None


@scheduled("prune", every="1h", help="finished jobs past retention, old ticks, rate events, dead workers")
def prune(database: db.Database) -> str | None:
    retention = get_settings().retention_seconds
    with database.transaction() as conn:
        n = jobs.prune(conn, retention)
        queries.run(conn, "ticks_prune", {"older_than_seconds": TICK_RETENTION_SECONDS})
        ratelimit.prune(conn, RATE_EVENT_RETENTION_SECONDS)
        registry.prune(conn, WORKER_RETENTION_SECONDS)
    return f"{n} finished job(s) pruned" if n else None


@scheduled("doorbell", every="5s", fast="1s", help="wake claim actors when runnable work waits beside free slots")
def ring_doorbells(database: db.Database) -> str | None:
    with database.transaction() as conn:
        n = doorbell.ring(conn)
    return f"{n} doorbell(s) rung" if n else None
