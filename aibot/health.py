"""Shared per-server health and backoff, kept in Postgres so every worker on every host sees it at once.

One worker seeing a server fail says little; three consecutive faults from anyone mean the server is
in trouble, and then *all* workers must stop sending it work together (the seed's "error backoff
coordination"), otherwise each process discovers the outage on its own and hammers the server.
The count is bumped atomically (one UPDATE ... RETURNING); the claim SQL skips servers that are
'down' or whose `backoff_until` lies ahead, and a probe brings them back.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg

from aibot import db, retry
from aibot.backends.base import Backend, BackendError

logger = logging.getLogger("aibot.health")

FAULT_THRESHOLD = 3          # consecutive server faults before the server is backed off
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_CAP_SECONDS = 300.0
JITTER_RANGE = (0.5, 1.0)    # factor in [0.5, 1): spreads returns, never exceeds the cap
_MAX_ERROR_CHARS = 500


def backoff_delay(level: int, *, base: float = BACKOFF_BASE_SECONDS, cap: float = BACKOFF_CAP_SECONDS,
                  jitter: float = 0.5) -> float:
    """Seconds to back a server off at `level` (0 for the first backoff): min(cap, base·2^level) × jitter.

    The same exponential as the job retries (`aibot.retry.backoff_delay`, reused here with
    failures = level + 1 and its random factor = our jitter), but the jitter is drawn from
    JITTER_RANGE rather than [0, 1): a server must stay backed off for a real while, never ~0 s.
    `aibot.backoff_seconds()` in SQL computes the same inside the atomic UPDATE; a test checks they agree.
    """
    if not isinstance(level, int) or level < 0:
        raise ValueError(f"backoff level must be an int >= 0, got {level!r}")
    return retry.backoff_delay(level + 1, jitter, base=base, cap=cap)


def jitter_factor(rng: random.Random | None = None) -> float:
    """A random factor in [0.5, 1), so hosts that saw the same outage do not return in lockstep."""
    lo, hi = JITTER_RANGE
    return lo + (hi - lo) * (rng or random).random()


@dataclass(frozen=True)
class HealthState:
    server_id: int
    name: str
    failure_count: int
    backoff_level: int
    backoff_until: datetime | None
    health: str
    tripped: bool = False     # this fault started a new backoff


def _state(row: dict, tripped: bool = False) -> HealthState:
    return HealthState(row["id"], row["name"], row["failure_count"], row["backoff_level"], row["backoff_until"],
                       row["health"], tripped)


def _clip(error: str) -> str:
    return error if len(error) <= _MAX_ERROR_CHARS else error[: _MAX_ERROR_CHARS - 1] + "…"


def record_fault(conn: psycopg.Connection, server_id: int, error: str, *, threshold: int = FAULT_THRESHOLD,
                 base: float = BACKOFF_BASE_SECONDS, cap: float = BACKOFF_CAP_SECONDS,
                 rng: random.Random | None = None) -> HealthState | None:
    """Counts a server fault for everyone; the `threshold`-th consecutive one backs the server off.

    Faults that arrive while the server is already backed off (requests that were in flight when it
    went down) only count; they do not escalate the level, or one outage would jump several levels.
    Returns None if the server row does not exist.
    """
    if threshold < 1:
        raise ValueError(f"fault threshold must be >= 1, got {threshold}")
    row = db.one(conn, "health_record_fault", {
        "server_id": server_id, "error": _clip(error), "threshold": threshold,
        "base": float(base), "cap": float(cap), "jitter": jitter_factor(rng)})
    if row is None:
        return None
    state = _state(row, bool(row["tripped"]))
    if state.tripped:
        logger.warning("server %s backed off (level %d, until %s) after %d consecutive faults; last: %s",
                       state.name, state.backoff_level, state.backoff_until, state.failure_count, _clip(error))
    return state


def record_ok(conn: psycopg.Connection, server_id: int) -> HealthState | None:
    """The server answered: its shared failure count and backoff start over."""
    row = db.one(conn, "health_record_ok", {"server_id": server_id})
    return None if row is None else _state(row)


def probe(conn: psycopg.Connection, server_row: dict, backend: Backend, *, base: float = BACKOFF_BASE_SECONDS,
          cap: float = BACKOFF_CAP_SECONDS, rng: random.Random | None = None) -> HealthState | None:
    """Health-checks one server whose backoff has expired: healthy again, or backed off one level further.

    The HTTP call happens before any statement on `conn`, so no transaction is held open across it.
    """
    try:
        info = backend.health()
        error = None if info.healthy else f"health check: unhealthy ({info.detail or 'no detail'})"
    except BackendError as exc:
        error = f"health check: {type(exc).__name__}: {exc}"
    if error is None:
        state = record_ok(conn, server_row["id"])
        if server_row.get("health") == "down":
            logger.info("server %s is healthy again", server_row["name"])
        return state
    row = db.one(conn, "health_probe_failed", {
        "server_id": server_row["id"], "error": _clip(error), "base": float(base), "cap": float(cap),
        "jitter": jitter_factor(rng)})
    if row is None:
        return None
    state = _state(row, True)
    logger.warning("server %s still failing (%s); backed off to level %d until %s",
                   state.name, error, state.backoff_level, state.backoff_until)
    return state


def due_probes(conn: psycopg.Connection) -> list[dict]:
    """Servers to probe now: down with an expired backoff, or never checked."""
    return db.all_rows(conn, "health_due_probes")


def probe_due(database: db.Database, backend_for: Callable[[dict], Backend], *, base: float = BACKOFF_BASE_SECONDS,
              cap: float = BACKOFF_CAP_SECONDS) -> list[HealthState]:
    """Probes every due server, each in its own short transaction (no transaction spans HTTP)."""
    with database.transaction() as conn:
        rows = due_probes(conn)
    results = []
    for row in rows:
        try:
            backend = backend_for(row)
        except ValueError as exc:   # e.g. its token variable is not set: a config problem, not an outage
            logger.error("cannot probe server %s: %s", row["name"], exc)
            continue
        try:
            with database.transaction() as conn:
                state = probe(conn, row, backend, base=base, cap=cap)
        finally:
            backend.close()
        if state is not None:
            results.append(state)
    return results
