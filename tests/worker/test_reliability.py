"""A reply is generated once, and a lost database session is an expected event in the claim path.

Real Postgres, a real simulated LLM server (it counts generations) and a sink that does NOT
deduplicate (like the original's KV Worker API): every post it receives is kept, so a regenerated
reply would show as a second, different message with the same id, and a re-sent one as an identical
copy. Sessions are killed with `pg_terminate_backend`, as a PostgreSQL restart or an operator would.
"""

from __future__ import annotations

import logging

import pytest

from aibot.delivery.sinks import reply_message
from aibot.queue import jobs
from aibot.worker.runtime import Runtime
from tests.worker.test_runtime import enqueue, held_slots, world  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(120)


class Killed(BaseException):
    """Stands for kill -9 of the worker at that point: nothing after it runs, no handler sees it."""


class NonDedupSink:
    """Keeps every post, repeats included; `after_post` runs once the post is kept (a crash, a lost session)."""

    def __init__(self, after_post=None):
        self.posts: list[dict] = []
        self.after_post = after_post

    def deliver(self, job_id, payload, reply):
        message = reply_message(job_id, payload, reply)
        self.posts.append(message)
        if self.after_post is not None:
            hook, self.after_post = self.after_post, None
            hook()
        return message["id"]


def terminate_others(conn) -> int:
    """Every other session of the test database (the workers' pooled connections) is terminated."""
    return conn.execute("SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()["n"]


def runtime_with(settings, sink) -> Runtime:
    rt = Runtime(settings)
    rt.sink = sink
    return rt


def expire_and_reclaim(conn, job_id: int) -> None:
    conn.execute("UPDATE aibot.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (job_id,))
    assert jobs.reclaim_expired(conn) == 1


def test_a_worker_killed_after_its_post_is_not_regenerated_the_same_reply_is_re_sent(conn, world):  # noqa: F811
    sim, _, settings = world

    def crash():
        raise Killed()

    sink = NonDedupSink(after_post=crash)
    job_id = enqueue(conn, "m1", "plain")
    first = runtime_with(settings, sink)
    try:
        with pytest.raises(Killed):
            first.run_invocation()
    finally:
        first.close()
    stored = jobs.get(conn, job_id)
    assert stored["state"] == "running" and stored["reply"]["id"] == f"aibot-{job_id}", "durable before the post"
    assert stored["generated_at"] is not None and stored["started_at"] is not None
    expire_and_reclaim(conn, job_id)          # the killed worker's lease ran out

    second = runtime_with(settings, sink)
    try:
        second.run_invocation()
    finally:
        second.close()
    job = jobs.get(conn, job_id)
    assert job["state"] == "done" and job["generated_at"] == stored["generated_at"], job
    assert sim.model_stats("tiny")["served"] == 1, "the re-claim re-sent the stored reply, it did not generate"
    assert len(sink.posts) == 2 and sink.posts[0] == sink.posts[1], "the repeat is the same message, id and timestamp"
    assert sink.posts[0]["id"] == f"aibot-{job_id}" and held_slots(conn) == 0


def test_a_completion_lost_with_its_session_is_retried_at_once_not_left_to_the_lease(conn, world, caplog):  # noqa: F811
    sim, _, settings = world
    killed = []
    sink = NonDedupSink(after_post=lambda: killed.append(terminate_others(conn)))
    job_id = enqueue(conn, "m1", "plain")
    rt = runtime_with(settings, sink)
    try:
        with caplog.at_level(logging.WARNING, logger="aibot.db"):
            rt.run_invocation()
    finally:
        rt.close()
    assert killed and killed[0] >= 1, "the worker's sessions were terminated between the post and the completion"
    job = jobs.get(conn, job_id)
    assert job["state"] == "done", f"completed in the same invocation, not after a lease: {job}"
    assert len(sink.posts) == 1 and sim.model_stats("tiny")["served"] == 1
    assert any("complete the delivered job: database session lost" in r.getMessage() for r in caplog.records)


def test_claims_and_renewals_survive_every_session_being_terminated(conn, world, caplog):  # noqa: F811
    sim, _, settings = world
    sink = NonDedupSink()
    rt = runtime_with(settings, sink)
    try:
        ids = [enqueue(conn, "m1", "plain")]
        rt.run_invocation()                    # the pool now holds connections used a moment ago
        assert terminate_others(conn) >= 1
        ids += [enqueue(conn, f"m{i}", "plain") for i in range(2, 5)]
        with caplog.at_level(logging.ERROR):
            rt.run_invocation()                # claims on dead pooled connections: retried, not raised
        assert [jobs.get(conn, i)["state"] for i in ids] == ["done"] * 4
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
        assert terminate_others(conn) >= 1
        rt.inflight.add(ids[0], jobs.get(conn, ids[0])["claim_token"])
        rt.renew_leases()                      # the heartbeat's step: no exception after a lost session
    finally:
        rt.close()
    assert len(sink.posts) == 4 and sim.model_stats("tiny")["served"] == 4


def test_a_claim_loop_that_cannot_reach_the_database_returns_instead_of_raising(conn, world, caplog):  # noqa: F811
    _, _, settings = world
    rt = runtime_with(settings, NonDedupSink())
    try:
        enqueue(conn, "m1", "plain")
        rt.database.pool.close()               # every later checkout fails (PoolClosed, an OperationalError)
        with caplog.at_level(logging.WARNING):
            assert rt.run_invocation() == 0
    finally:
        rt.database._pool = None
        rt.backends.close_all()
    messages = [r.getMessage() for r in caplog.records]
    assert any("claim loop stopped" in m for m in messages), messages
    assert any("could not ring the doorbell" in m for m in messages), messages
