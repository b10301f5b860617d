"""Shared health and backoff, kept in Postgres so every worker on every host sees it at once, at two
scopes: a server (connection-level faults: nothing there can be reached) and a (server, model) pair
(a failed load, a model's cut streams: the server's other models are fine).

One worker seeing a server fail says little; three consecutive faults from anyone mean the server is
in trouble, and then *all* workers must stop sending it work together (the seed's "error backoff
coordination"), otherwise each process discovers the outage on its own and hammers the server.
The count is bumped atomically (one UPDATE ... RETURNING); the claim SQL skips servers that are
'down' or whose `backoff_until` lies ahead, and pairs in `blocked_pairs`.

Recovery: a down server is probed every PROBE_EVERY_SECONDS whatever its backoff, and serves again as
soon as a probe answers, so an outage costs seconds after it ends, not a backoff period. The backoff
still protects against a flapping server: one that fails again within FLAP_SECONDS of recovering goes
a level up (`aibot.next_backoff_level`) and stays down until that backoff ends, answering or not.

Owns the health and backoff columns of `servers` and the `model_health` rows; decides nothing about
slots or placement (`aibot.cluster.state` reads the blocked pairs).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg

from aibot import db
from aibot.backends.base import Backend, BackendError
from aibot.queue import policy

logger = logging.getLogger(__name__)
queries = db.Queries(__name__)

FAULT_THRESHOLD = 3          # consecutive server faults before the server is backed off
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_CAP_SECONDS = 300.0
PROBE_EVERY_SECONDS = 2.0    # probe cadence of a down server (the probe tick runs every 2 s too)
FLAP_SECONDS = 120.0         # a trip this soon after a recovery escalates the backoff level
JITTER_RANGE = (0.5, 1.0)    # factor in [0.5, 1): spreads returns, never exceeds the cap
_MAX_ERROR_CHARS = 500


def backoff_delay(level: int, *, base: float = BACKOFF_BASE_SECONDS, cap: float = BACKOFF_CAP_SECONDS,
                  jitter: float = 0.5) -> float:
    """Seconds to back a server off at `level` (0 for the first backoff): min(cap, base·2^level) × jitter.

    The same exponential as the job retries (`aibot.queue.policy.backoff_delay`, reused here with
    failures = level + 1 and its random factor = our jitter), but the jitter is drawn from
    JITTER_RANGE rather than [0, 1): a server must stay backed off for a real while, never ~0 s.
    `aibot.backoff_seconds()` in SQL computes the same inside the atomic UPDATE; a test checks they agree.
    """
    if not isinstance(level, int) or level < 0:
        raise ValueError(f"backoff level must be an int >= 0, got {level!r}")
    return policy.backoff_delay(level + 1, jitter, base=base, cap=cap)


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
    row = queries.one(conn, "health_record_fault", {
        "server_id": server_id, "error": _clip(error), "threshold": threshold, "flap_seconds": FLAP_SECONDS,
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
    row = queries.one(conn, "health_record_ok", {"server_id": server_id})
    return None if row is None else _state(row)


def probe(conn: psycopg.Connection, server_row: dict, backend: Backend) -> HealthState | None:
    """Health-checks one server that is down (or never checked): healthy again as soon as it answers,
    unless it is flapping (then it stays down until its backoff ends).

    The HTTP call happens before any statement on `conn`, so no transaction is held open across it.
    """
    try:
        info = backend.health()
        error = None if info.healthy else f"health check: unhealthy ({info.detail or 'no detail'})"
    except BackendError as exc:
        error = f"health check: {type(exc).__name__}: {exc}"
    if error is None:
        if server_row.get("flapping"):
            row = queries.one(conn, "health_probe_held", {"server_id": server_row["id"]})
            return None if row is None else _state(row)
        state = record_ok(conn, server_row["id"])
        if server_row.get("health") == "down":
            logger.info("server %s is healthy again", server_row["name"])
        return state
    row = queries.one(conn, "health_probe_failed", {"server_id": server_row["id"], "error": _clip(error)})
    if row is None:
        return None
    if server_row.get("health") != "down":
        logger.warning("server %s is down: %s", row["name"], error)
    return _state(row)


def due_probes(conn: psycopg.Connection) -> list[dict]:
    """Servers to probe now: never checked, or down and not probed for PROBE_EVERY_SECONDS."""
    return queries.all(conn, "health_due_probes", {"every_seconds": PROBE_EVERY_SECONDS})


def probe_due(database: db.Database, backend_for: Callable[[dict], Backend]) -> list[HealthState]:
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
                state = probe(conn, row, backend)
        finally:
            backend.close()
        if state is not None:
            results.append(state)
    return results


# --------------------------------------------------------------------------------------- model scope

def record_model_fault(conn: psycopg.Connection, server_id: int, model: str, error: str, *,
                       threshold: int = FAULT_THRESHOLD, base: float = BACKOFF_BASE_SECONDS,
                       cap: float = BACKOFF_CAP_SECONDS, rng: random.Random | None = None) -> dict | None:
    """Counts a fault of one (server, model) pair for everyone; the threshold-th consecutive one backs
    that pair off (claims and loads skip it), leaving the server's other models serving."""
    if threshold < 1:
        raise ValueError(f"fault threshold must be >= 1, got {threshold}")
    queries.run(conn, "health_model_row", {"server_id": server_id, "model": model})
    row = queries.one(conn, "health_record_model_fault", {
        "server_id": server_id, "model": model, "error": _clip(error), "threshold": threshold,
        "flap_seconds": FLAP_SECONDS, "base": float(base), "cap": float(cap), "jitter": jitter_factor(rng)})
    if row is not None and row["tripped"]:
        logger.warning("model %s backed off on server id %d (level %d, until %s) after %d consecutive faults; "
                       "last: %s", model, server_id, row["backoff_level"], row["backoff_until"],
                       row["failure_count"], _clip(error))
    return row


def record_model_ok(conn: psycopg.Connection, server_id: int, model: str) -> bool:
    """The pair served: its shared failure count and backoff start over. True if there was one."""
    return queries.one(conn, "health_record_model_ok", {"server_id": server_id, "model": model}) is not None


def mark_unavailable(conn: psycopg.Connection, server_id: int, model: str, reason: str,
                     config_fingerprint: str | None = None) -> bool:
    """Remembers that this server will not serve this model as configured (a permanent refusal).

    It is retried only when the server's catalogue or the configuration changes. Returns True when the
    reason is new (so callers log it once, not at every tick).
    """
    row = queries.one(conn, "health_mark_unavailable", {"server_id": server_id, "model": model,
                                                   "reason": _clip(reason), "config": config_fingerprint})
    return row is not None


def clear_stale_refusals(conn: psycopg.Connection, server_id: int, fingerprint: str) -> list[str]:
    """Refusals this server made under another model list are tried again; returns their models."""
    return [r["model"] for r in queries.all(conn, "health_clear_stale_refusals",
                                            {"server_id": server_id, "fingerprint": fingerprint})]


def clear_config_refusals(conn: psycopg.Connection, config_fingerprint: str | None) -> list[tuple[int, str]]:
    """Refusals made under another configuration are tried again; returns their (server id, model)."""
    return [(r["server_id"], r["model"]) for r in queries.all(conn, "health_clear_config_refusals",
                                                              {"config": config_fingerprint})]


def blocked_pairs(conn: psycopg.Connection, server_id: int | None = None) -> dict[tuple[int, str], dict]:
    """{(server id, model): row} for pairs refused for good or backed off now."""
    return {(r["server_id"], r["model"]): r for r in queries.all(conn, "health_pairs", {"server_id": server_id})
            if r["unavailable_reason"] is not None or r["backed_off"]}
