"""The Postgres sink in the worker's own database: the `replies` row is written by the fenced
statement that completes the job, so reply and completion commit together (or not at all).

Real Postgres, the simulated llama.cpp router of `test_runtime` (it counts generations). What could
break: a reply row without its job done (or the reverse), a reply inserted by a worker whose claim
was taken over, a completion lost with its session leaving the job to the lease, a regenerated
reply after a delivery that did happen, and the happy path paying for a store it no longer needs.
"""

from __future__ import annotations

import logging

import pytest

from aibot.delivery.sinks import PostgresSink
from aibot.queue import jobs
from aibot.worker.runtime import Runtime
from tests.worker.test_reliability import expire_and_reclaim, terminate_others
from tests.worker.test_runtime import enqueue, held_slots, world  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(120)


def replies(conn, job_id: int) -> list[dict]:
    return conn.execute("SELECT reply_id, reply_to, entity_id, message FROM aibot.replies WHERE job_id = %s",
                        (job_id,)).fetchall()


def postgres_runtime(settings) -> Runtime:
    rt = Runtime(settings)
    rt.sink = PostgresSink(rt.database)
    assert rt._completes_into_replies()
    return rt


def after_each_completion(monkeypatch, action) -> None:
    """Runs `action(result)` right after each completion that takes the next claim along returns."""
    real = jobs.finish_delivered_and_claim

    def wrapped(*args, **kw):
        got = real(*args, **kw)
        action(got)
        return got

    monkeypatch.setattr(jobs, "finish_delivered_and_claim", wrapped)


class CountingStores:
    """Counts the worker's store-before-post writes (jobs.store_reply) while installed."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = jobs.store_reply

        def counted(*args, **kw):
            self.calls += 1
            return real(*args, **kw)

        monkeypatch.setattr(jobs, "store_reply", counted)


def test_the_completion_writes_the_reply_row_and_the_job_together(conn, world, monkeypatch):  # noqa: F811
    sim, _, settings = world
    stores = CountingStores(monkeypatch)
    job_id = enqueue(conn, "m1", "plain")
    rt = postgres_runtime(settings)
    try:
        assert rt.run_invocation() == 1
    finally:
        rt.close()
    job = jobs.get(conn, job_id)
    assert job["state"] == "done" and job["delivered_at"] is not None and job["lease_expires_at"] is None, job
    assert job["reply"]["id"] == f"aibot-{job_id}" and job["started_at"] and job["generated_at"], job
    [row] = replies(conn, job_id)
    assert row["reply_id"] == f"aibot-{job_id}" and row["reply_to"] == "m1"
    assert row["message"]["text"] == job["reply"]["text"] and row["message"]["timestamp"] == job["reply"]["timestamp"]
    assert stores.calls == 0, "no store before the post: the completion carries the reply"
    assert held_slots(conn) == 0 and sim.model_stats("tiny")["served"] == 1
    # The stream's usage chunk (asked for, as llama-server honours it): the simulator's 5-token reply,
    # kept for adaptive concurrency, and never sent to the chat (the row has no such field).
    assert job["reply"]["tokens"] == 5 and "tokens" not in row["message"], job["reply"]


def test_a_lost_claim_writes_no_reply_row(conn, world):  # noqa: F811
    _, _, settings = world
    job_id = enqueue(conn, "m1", "plain")
    rt = postgres_runtime(settings)
    claim = rt._claim()
    assert claim is not None and claim.job_id == job_id
    expire_and_reclaim(conn, job_id)                       # the lease ran out while generating
    reply = {"id": f"aibot-{job_id}", "text": "late", "timestamp": 1}
    try:
        rt._deliver(claim, reply, stored=False, note="test", started_at=None, generated_at=None)
    finally:
        rt.close()
    assert replies(conn, job_id) == [], "a fenced-out worker delivers nothing"
    job = jobs.get(conn, job_id)
    assert job["state"] == "queued" and job["reply"] is None, job


def test_a_completion_lost_with_its_session_is_retried_and_delivers_once(conn, world, caplog, monkeypatch):  # noqa: F811
    sim, _, settings = world
    job_id = enqueue(conn, "m1", "plain")
    rt = postgres_runtime(settings)
    killed = []

    def killing_first(real):
        def call(c, *args, **kw):
            if not killed:
                killed.append(terminate_others(conn))   # this session too: the statement never reaches the server
            return real(c, *args, **kw)
        return call

    # The loop's first attempt completes and claims the next job together; the retry completes alone.
    for name in ("finish_delivered_and_claim", "finish_delivered_into_replies"):
        monkeypatch.setattr(jobs, name, killing_first(getattr(jobs, name)))
    try:
        with caplog.at_level(logging.WARNING, logger="aibot.db"):
            rt.run_invocation()
    finally:
        rt.close()
    assert killed and killed[0] >= 1
    job = jobs.get(conn, job_id)
    assert job["state"] == "done", f"completed in the same invocation, not after a lease: {job}"
    assert len(replies(conn, job_id)) == 1 and sim.model_stats("tiny")["served"] == 1
    assert any("complete the job with its reply: database session lost" in r.getMessage() for r in caplog.records)


def test_a_stored_reply_from_an_earlier_attempt_is_re_sent_not_regenerated(conn, world):  # noqa: F811
    sim, _, settings = world
    job_id = enqueue(conn, "m1", "plain")
    rt = postgres_runtime(settings)
    try:
        claim = rt._claim()
        stored = {"id": f"aibot-{job_id}", "text": "from before", "timestamp": 1234, "username": "x"}
        assert jobs.store_reply(conn, job_id, claim.token, stored)   # an HTTP-sink era attempt stored it
        expire_and_reclaim(conn, job_id)
        assert rt.run_invocation() == 1
    finally:
        rt.close()
    [row] = replies(conn, job_id)
    assert row["message"]["text"] == "from before" and row["message"]["timestamp"] == 1234
    assert jobs.get(conn, job_id)["state"] == "done" and sim.model_stats("tiny")["served"] == 0


def test_a_sink_in_another_database_keeps_the_store_before_the_post(conn, world, db_url):  # noqa: F811
    _, _, settings = world

    class Elsewhere:
        url = db_url + "-elsewhere"

    rt = Runtime(settings)
    try:
        rt.sink = PostgresSink(Elsewhere())
        assert not rt._completes_into_replies()
        rt.sink = PostgresSink(rt.database)
        assert rt._completes_into_replies()
    finally:
        rt.close()


def test_a_busy_loop_claims_each_next_job_with_the_completion_of_the_last(conn, world, monkeypatch):  # noqa: F811
    sim, _, settings = world
    ids = [enqueue(conn, f"m{i}", "plain") for i in range(4)]
    rt = postgres_runtime(settings)
    standalone = []
    real_claim = jobs.claim
    monkeypatch.setattr(jobs, "claim", lambda *a, **kw: standalone.append(1) or real_claim(*a, **kw))
    try:
        assert rt.run_invocation() == 4
    finally:
        rt.close()
    assert [jobs.get(conn, i)["state"] for i in ids] == ["done"] * 4
    assert all(len(replies(conn, i)) == 1 for i in ids) and held_slots(conn) == 0
    # Only the first claim stands alone: the next three came with the completions, and the last
    # completion's came back empty, so the doorbell's count (nothing claimable) ended the loop
    # instead of the same claim again.
    assert len(standalone) == 1, standalone
    assert sim.model_stats("tiny")["served"] == 4


def test_work_that_arrives_after_an_empty_claim_along_is_still_claimed(conn, world, monkeypatch):  # noqa: F811
    """The shortcut after an empty claim must not strand a job that became claimable in between:
    the doorbell's count sees it and the loop claims it."""
    sim, _, settings = world
    first = enqueue(conn, "m0", "plain")
    rt = postgres_runtime(settings)
    late: list[int] = []

    def enqueue_once(got) -> None:
        if not late:
            assert got[1] is None, "the queue held one job: the claim along comes back empty"
            late.append(enqueue(conn, "m1", "plain"))

    after_each_completion(monkeypatch, enqueue_once)
    try:
        assert rt.run_invocation() == 2
    finally:
        rt.close()
    assert [jobs.get(conn, i)["state"] for i in (first, *late)] == ["done", "done"]
    assert sim.model_stats("tiny")["served"] == 2


def test_a_next_claim_taken_as_the_worker_stops_is_handed_back(conn, world, monkeypatch):  # noqa: F811
    sim, _, settings = world
    ids = [enqueue(conn, f"m{i}", "plain") for i in range(2)]
    rt = postgres_runtime(settings)
    # Shutdown begins right after the completion claimed the next job.
    after_each_completion(monkeypatch, lambda got: rt.stopping.set())
    try:
        assert rt.run_invocation() == 1
    finally:
        rt.close()
    first, second = (jobs.get(conn, i) for i in ids)
    assert first["state"] == "done" and len(replies(conn, ids[0])) == 1
    assert second["state"] == "queued" and second["attempts"] == 0, f"handed back, attempt refunded: {second}"
    assert held_slots(conn) == 0 and sim.model_stats("tiny")["served"] == 1
