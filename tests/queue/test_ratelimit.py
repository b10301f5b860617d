"""Per-entity rate limits: the pure window math, and reserve/cancel against real Postgres."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from aibot import db
from aibot.config import RateLimits
from aibot.queue import ratelimit
from aibot.queue.ratelimit import Limits, next_allowed

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def entity(id="alice", min_s=None, per_min=None, per_hour=None):
    limits = RateLimits(minSecondsBetweenPosts=min_s, maxPostsPerMinute=per_min, maxPostsPerHour=per_hour)
    return SimpleNamespace(id=id, rate_limits=limits)


# --- pure -----------------------------------------------------------------------------------------

def test_no_limits_always_allow():
    assert next_allowed([at(i) for i in range(100)], Limits(), at(100)) is None
    assert next_allowed([at(0)], Limits(0, 0, 0), at(0)) is None   # 0 means "no limit"


def test_min_seconds_between_posts():
    limits = Limits(min_seconds_between_posts=5)
    assert next_allowed([], limits, at(0)) is None
    assert next_allowed([at(0)], limits, at(3)) == at(5)
    assert next_allowed([at(0)], limits, at(5)) is None
    assert next_allowed([at(0), at(10)], limits, at(12)) == at(15)   # the latest post counts


def test_per_minute_sliding_window():
    limits = Limits(max_posts_per_minute=3)
    events = [at(0), at(10), at(20)]
    assert next_allowed(events[:2], limits, at(30)) is None
    # full: allowed once the oldest leaves the window, 60 s after it
    assert next_allowed(events, limits, at(30)) == at(60)
    assert next_allowed(events, limits, at(60)) is None   # the event at 0 is no longer "in the last 60 s"
    # sliding, not fixed: at 65 the events at 10, 20 and a new one at 61 are inside
    assert next_allowed([at(10), at(20), at(61)], limits, at(65)) == at(70)


def test_window_with_more_events_than_the_limit():
    # e.g. the limit was lowered by a config edit: wait until only limit-1 remain
    limits = Limits(max_posts_per_minute=2)
    events = [at(0), at(1), at(2), at(3)]
    assert next_allowed(events, limits, at(4)) == at(62)


def test_per_hour_and_latest_constraint_wins():
    limits = Limits(min_seconds_between_posts=30, max_posts_per_minute=10, max_posts_per_hour=2)
    events = [at(0), at(100)]
    assert next_allowed(events, limits, at(110)) == at(3600)
    limits = Limits(min_seconds_between_posts=300, max_posts_per_minute=1)
    assert next_allowed([at(0)], limits, at(10)) == at(300)


def test_events_in_the_future_still_count():
    # another host's clock may be ahead: its event must not be ignored
    assert next_allowed([at(5)], Limits(max_posts_per_minute=1), at(0)) == at(65)


def test_unsorted_events():
    assert next_allowed([at(20), at(0), at(10)], Limits(max_posts_per_minute=3), at(30)) == at(60)


# --- Postgres ---------------------------------------------------------------------------------------

def count_events(conn, entity_id="alice"):
    return conn.execute("SELECT count(*) AS n FROM aibot.rate_events WHERE entity_id = %s", [entity_id]).fetchone()["n"]


def test_reserve_records_until_the_limit_then_defers(conn):
    e = entity(per_min=2)
    assert ratelimit.reserve(conn, e, 1, now=at(0)) is None
    assert ratelimit.reserve(conn, e, 2, now=at(1)) is None
    assert ratelimit.reserve(conn, e, 3, now=at(2)) == at(60)
    assert count_events(conn) == 2
    assert ratelimit.reserve(conn, e, 3, now=at(60)) is None
    assert count_events(conn) == 3


def test_reserve_is_idempotent_per_job(conn):
    e = entity(per_min=1)
    assert ratelimit.reserve(conn, e, 7, now=at(0)) is None
    assert ratelimit.reserve(conn, e, 7, now=at(1)) is None   # a retried reserve keeps its reservation
    assert count_events(conn) == 1


def test_limits_are_per_entity(conn):
    assert ratelimit.reserve(conn, entity("alice", per_min=1), 1, now=at(0)) is None
    assert ratelimit.reserve(conn, entity("bob", per_min=1), 2, now=at(0)) is None
    assert ratelimit.reserve(conn, entity("alice", per_min=1), 3, now=at(1)) == at(60)


def test_cancel_gives_the_reservation_back(conn):
    e = entity(min_s=10)
    assert ratelimit.reserve(conn, e, 1, now=at(0)) is None
    assert ratelimit.reserve(conn, e, 2, now=at(1)) == at(10)
    assert ratelimit.cancel(conn, 1) is True
    assert ratelimit.cancel(conn, 1) is False
    assert ratelimit.reserve(conn, e, 2, now=at(1)) is None


def test_reserve_defaults_to_the_database_clock(conn):
    e = entity(min_s=3600)
    assert ratelimit.reserve(conn, e, 1) is None
    until = ratelimit.reserve(conn, e, 2)
    db_now = conn.execute("SELECT now() AS n").fetchone()["n"]
    assert until is not None and timedelta(seconds=3590) < until - db_now <= timedelta(seconds=3600)


def test_entity_without_limits_is_allowed_and_recorded(conn):
    e = SimpleNamespace(id="free", rate_limits=None)
    for job in range(5):
        assert ratelimit.reserve(conn, e, job, now=at(0)) is None
    assert count_events(conn, "free") == 5


def test_prune_drops_old_events(conn):
    old = datetime.now(timezone.utc) - timedelta(hours=3)
    e = entity(per_hour=100)
    ratelimit.reserve(conn, e, 1, now=old)
    ratelimit.reserve(conn, e, 2)
    assert ratelimit.prune(conn, older_than_seconds=7200) == 1
    assert count_events(conn) == 1


def test_reserve_inside_the_callers_transaction_rolls_back_with_it(db_url):
    e = entity(per_min=1)
    with db.connect(db_url) as c:
        with pytest.raises(RuntimeError):
            with c.transaction():
                assert ratelimit.reserve(c, e, 1, now=at(0)) is None
                raise RuntimeError("worker crashed before commit")
        assert ratelimit.reserve(c, e, 2, now=at(1)) is None
        c.commit()


def test_concurrent_reservations_admit_exactly_the_limit(db_url):
    """8 workers race for one entity limited to 5 posts a minute: exactly 5 win."""
    e = entity("racer", per_min=5)
    barrier = threading.Barrier(8)
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def worker(job_id: int) -> None:
        try:
            with db.connect(db_url, autocommit=True) as c:
                barrier.wait(timeout=10)
                results[job_id] = ratelimit.reserve(c, e, job_id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    allowed = [j for j, r in results.items() if r is None]
    deferred = [r for r in results.values() if r is not None]
    assert len(allowed) == 5 and len(deferred) == 3
    with db.connect(db_url, autocommit=True) as c:
        assert count_events(c, "racer") == 5
        first = c.execute("SELECT min(at) AS t FROM aibot.rate_events WHERE entity_id = 'racer'").fetchone()["t"]
    # every deferred job is told to come back when the first post leaves the window
    assert all(r == first + timedelta(seconds=60) for r in deferred)
