"""Per-entity posting limits with sliding windows, shared by every worker on every host.

The original counted posts in memory with fixed windows and checked at enqueue time, so a burst could
queue past the limit and a restart forgot everything. Here a worker reserves a post right after
claiming a job: under a per-entity advisory lock it counts the entity's events in the last 60 s and
3600 s (`aibot.rate_events`), and either records an event for the job or learns when the entity may
post again, then releases the job until then: a limited message is deferred, never dropped. A job
that ends without posting gives its reservation back with `cancel`.

Owns the `rate_events` rows. The worker enforces it at claim time (`aibot.worker.runtime`); the bot
never checks limits at enqueue time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aibot import db

queries = db.Queries(__name__)

MINUTE = timedelta(seconds=60)
HOUR = timedelta(seconds=3600)


@dataclass(frozen=True)
class Limits:
    min_seconds_between_posts: float | None = None
    max_posts_per_minute: int | None = None
    max_posts_per_hour: int | None = None

    @classmethod
    def of(cls, entity: Any) -> Limits:
        rl = getattr(entity, "rate_limits", None)
        if rl is None:
            return cls()
        return cls(getattr(rl, "min_seconds_between_posts", None), getattr(rl, "max_posts_per_minute", None),
                   getattr(rl, "max_posts_per_hour", None))

    @property
    def lookback(self) -> timedelta:
        """How far back events matter."""
        return max(HOUR, timedelta(seconds=float(self.min_seconds_between_posts or 0)))

    @property
    def unlimited(self) -> bool:
        return not (self.min_seconds_between_posts or self.max_posts_per_minute or self.max_posts_per_hour)


def _window_free_at(events: Sequence[datetime], limit: int | None, window: timedelta, now: datetime) -> datetime | None:
    """When fewer than `limit` events fall in (t - window, t]; None if no limit (None or 0)."""
    if not limit or limit <= 0:
        return None
    inside = [t for t in events if t > now - window]
    if len(inside) < limit:
        return None
    # The event that must leave the window is the (len - limit + 1)-th oldest inside it.
    return inside[len(inside) - limit] + window


def next_allowed(events: Sequence[datetime], limits: Limits, now: datetime) -> datetime | None:
    """Pure: None if a post at `now` is within every limit, else the earliest time it would be.

    `events` are the entity's earlier post times (any order). Each constraint is satisfied from its
    own candidate time onwards (events only age out), so the answer is the latest candidate.
    """
    events = sorted(events)  # events after `now` (another host's clock) still count
    candidates = []
    if events and limits.min_seconds_between_posts:
        candidates.append(events[-1] + timedelta(seconds=float(limits.min_seconds_between_posts)))
    for limit, window in ((limits.max_posts_per_minute, MINUTE), (limits.max_posts_per_hour, HOUR)):
        at = _window_free_at(events, limit, window, now)
        if at is not None:
            candidates.append(at)
    latest = max(candidates, default=None)
    return latest if latest is not None and latest > now else None


def reserve(conn, entity: Any, job_id: int, now: datetime | None = None) -> datetime | None:
    """Records a post for `job_id` if `entity` may post now (returns None), else returns when it may.

    Serialised per entity with a transaction-scoped advisory lock, so N workers racing for one entity
    admit exactly as many posts as the limits allow. Idempotent per job: a job that already holds a
    reservation keeps it. `now` defaults to the database clock (one clock for all hosts).
    """
    entity_id = entity.id
    limits = Limits.of(entity)
    with conn.transaction():
        queries.run(conn, "rate_lock", {"entity_id": entity_id})
        if queries.one(conn, "rate_event_for_job", {"job_id": job_id}) is not None:
            return None
        if now is None:
            now = queries.one(conn, "rate_now")["now"]
        if not limits.unlimited:
            rows = queries.all(conn, "rate_events_since", {"entity_id": entity_id, "since": now - limits.lookback})
            blocked_until = next_allowed([r["at"] for r in rows], limits, now)
            if blocked_until is not None:
                return blocked_until
        queries.run(conn, "rate_event_add", {"entity_id": entity_id, "at": now, "job_id": job_id})
    return None


def cancel(conn, job_id: int) -> bool:
    """Gives back the job's reservation (it ended without posting). True if there was one."""
    with conn.transaction():
        return queries.run(conn, "rate_event_cancel", {"job_id": job_id}).rowcount > 0


def prune(conn, older_than_seconds: float = 7200) -> int:
    """Deletes events older than every window; returns how many."""
    with conn.transaction():
        return queries.run(conn, "rate_events_prune", {"older_than_seconds": older_than_seconds}).rowcount
