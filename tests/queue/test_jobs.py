from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from aibot import db
from aibot.queue import jobs
from aibot.queue.policy import RetryPolicy


def job(mid: str, *, priority: int = 50, entity: str = "e1", model: str = "m1", **kw) -> jobs.NewJob:
    return jobs.NewJob(source="chat", source_message_id=mid, entity_id=entity, model=model, priority=priority, **kw)


def row(conn, job_id: int) -> dict:
    return jobs.get(conn, job_id)


def claim(conn, worker: str = "w1", lease: float = 60.0):
    return jobs.claim(conn, worker, lease_seconds=lease, use_slots=False)


def expire_lease(conn, job_id: int) -> None:
    conn.execute("UPDATE aibot.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (job_id,))


# --- enqueue ---------------------------------------------------------------------------------------

def test_enqueue_returns_ids_in_input_order_and_none_for_duplicates(conn):
    first = jobs.enqueue_many(conn, [job("a"), job("b"), job("a"), job("c", entity="e2")])
    assert first[2] is None
    assert first[0] < first[1] < first[3]
    again = jobs.enqueue_many(conn, [job("b"), job("d"), job("c", entity="e2"), job("c", entity="e3")])
    assert again[0] is None and again[2] is None
    assert again[1] is not None and again[3] is not None
    assert conn.execute("SELECT count(*) AS n FROM aibot.jobs").fetchone()["n"] == 5
    assert jobs.enqueue_many(conn, []) == []


def test_enqueue_stores_fields_and_rank_formula(conn):
    msg_at = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    [jid] = jobs.enqueue_many(conn, [job("x", priority=7, payload={"text": "hi"}, message_at=msg_at,
                                          max_attempts=5)], aging_seconds=12.5)
    r = row(conn, jid)
    assert r["state"] == "queued" and r["attempts"] == 0 and r["max_attempts"] == 5
    assert r["payload"] == {"text": "hi"} and r["message_at"] == msg_at and r["model"] == "m1"
    assert r["rank"] == pytest.approx(r["created_at"].timestamp() + 7 * 12.5, abs=1e-5)
    assert r["available_at"] == r["created_at"]
    assert r["finished_at"] is None


def test_rejected_rows_are_recorded_finished_and_never_claimed(conn):
    [jid] = jobs.enqueue_many(conn, [jobs.NewJob("chat", "bad", "ghost", None, 50, state="rejected",
                                                 reason="unknown entity 'ghost'")])
    r = row(conn, jid)
    assert r["state"] == "rejected" and r["reason"] == "unknown entity 'ghost'" and r["finished_at"] is not None
    assert claim(conn) is None


def test_deferred_job_waits_for_available_at(conn):
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    [jid] = jobs.enqueue_many(conn, [job("later", available_at=later)])
    assert claim(conn) is None
    assert jobs.next_available_at(conn) == later
    conn.execute("UPDATE aibot.jobs SET available_at = now() - interval '1 second' WHERE id = %s", (jid,))
    assert claim(conn).job_id == jid


@pytest.mark.parametrize("kwargs, field", [
    (dict(source=""), "source"),
    (dict(source_message_id=None), "source_message_id"),
    (dict(entity_id=3), "entity_id"),
    (dict(priority=100), "priority"),
    (dict(priority=-1), "priority"),
    (dict(priority=True), "priority"),
    (dict(model=None), "model"),
    (dict(state="done"), "state"),
    (dict(state="rejected"), "reason"),
    (dict(max_attempts=0), "max_attempts"),
    (dict(payload=[1]), "payload"),
    (dict(message_at=datetime(2024, 1, 1)), "message_at"),
    (dict(available_at="soon"), "available_at"),
])
def test_new_job_validation_names_the_field(kwargs, field):
    base = dict(source="chat", source_message_id="1", entity_id="e", model="m", priority=1)
    with pytest.raises(ValueError, match=field):
        jobs.NewJob(**{**base, **kwargs})


@pytest.mark.parametrize("aging", [0, -1, float("nan")])
def test_enqueue_rejects_bad_aging(conn, aging):
    with pytest.raises(ValueError, match="aging_seconds"):
        jobs.enqueue_many(conn, [job("a")], aging_seconds=aging)


def test_enqueue_rejects_non_newjob(conn):
    with pytest.raises(TypeError, match=r"jobs\[1\]"):
        jobs.enqueue_many(conn, [job("a"), {"source": "chat"}])


# --- claim and the token-taking calls --------------------------------------------------------------

def test_claim_marks_running_with_lease_and_token(conn):
    [jid] = jobs.enqueue_many(conn, [job("a", payload={"k": 1})])
    c = jobs.claim(conn, "worker-7", lease_seconds=90, use_slots=False)
    r = row(conn, jid)
    assert (c.job_id, c.attempts, c.payload, c.slot_id) == (jid, 1, {"k": 1}, None)
    assert r["state"] == "running" and r["attempts"] == 1 and r["worker_id"] == "worker-7"
    assert r["claim_token"] == c.token and isinstance(c.token, uuid.UUID)
    assert r["lease_expires_at"] == c.lease_expires_at
    assert (r["lease_expires_at"] - r["claimed_at"]).total_seconds() == pytest.approx(90)
    assert c.source == "chat" and c.source_message_id == "a" and c.entity_id == "e1"
    assert claim(conn) is None


@pytest.mark.parametrize("kwargs, field", [
    (dict(worker_id=""), "worker_id"), (dict(lease_seconds=0), "lease_seconds"),
    (dict(limit=0), "limit"), (dict(limit=5, max_scan=2), "max_scan"),
])
def test_claim_batch_argument_errors(conn, kwargs, field):
    args = {"worker_id": "w", "limit": 1, "lease_seconds": 10, **kwargs}
    with pytest.raises(ValueError, match=field):
        jobs.claim_batch(conn, args.pop("worker_id"), args.pop("limit"), **args)


def test_token_calls_need_the_current_token(conn):
    jobs.enqueue_many(conn, [job("a")])
    c = claim(conn)
    wrong = uuid.uuid4()
    assert not jobs.renew(conn, c.job_id, wrong, 60)
    assert not jobs.finish_delivered(conn, c.job_id, wrong, {"text": "x"}, started_at=None, generated_at=None)
    assert not jobs.store_reply(conn, c.job_id, wrong, {"text": "x"})
    assert not jobs.complete(conn, c.job_id, wrong)
    assert jobs.fail(conn, c.job_id, wrong, "x") is None
    assert not jobs.release(conn, c.job_id, wrong)
    assert not jobs.reject(conn, c.job_id, wrong, "x")
    assert row(conn, c.job_id)["state"] == "running"


def test_renew_extends_the_lease(conn):
    jobs.enqueue_many(conn, [job("a")])
    c = claim(conn, lease=5)
    assert jobs.renew(conn, c.job_id, c.token, 3600)
    assert (row(conn, c.job_id)["lease_expires_at"] - c.lease_expires_at).total_seconds() > 3000
    with pytest.raises(ValueError, match="lease_seconds"):
        jobs.renew(conn, c.job_id, c.token, -1)


def test_store_reply_and_complete(conn):
    jobs.enqueue_many(conn, [job("a")])
    c = claim(conn)
    conn.execute("UPDATE aibot.jobs SET started_at = now() WHERE id = %s", (c.job_id,))
    assert jobs.store_reply(conn, c.job_id, c.token, {"text": "hello"})
    assert jobs.complete(conn, c.job_id, c.token)
    r = row(conn, c.job_id)
    assert r["state"] == "done" and r["reply"] == {"text": "hello"}
    assert r["started_at"] and r["generated_at"] and r["delivered_at"] and r["finished_at"]
    assert r["lease_expires_at"] is None
    assert not jobs.complete(conn, c.job_id, c.token), "a finished job cannot be completed twice"


def test_complete_as_skipped_with_reason(conn):
    jobs.enqueue_many(conn, [job("a")])
    c = claim(conn)
    assert jobs.complete(conn, c.job_id, c.token, state="skipped", reason="model said [SKIP]")
    r = row(conn, c.job_id)
    assert (r["state"], r["reason"], r["delivered_at"]) == ("skipped", "model said [SKIP]", None)
    with pytest.raises(ValueError, match="state"):
        jobs.complete(conn, c.job_id, c.token, state="dead")


def test_stored_reply_survives_a_lost_lease(conn):
    jobs.enqueue_many(conn, [job("a")])
    c = claim(conn)
    jobs.store_reply(conn, c.job_id, c.token, {"text": "kept"})
    expire_lease(conn, c.job_id)
    assert jobs.reclaim_expired(conn) == 1
    again = claim(conn, "w2")
    assert again.reply == {"text": "kept"} and again.attempts == 2


def test_complete_many_only_completes_held_claims(conn):
    jobs.enqueue_many(conn, [job(str(i)) for i in range(5)])
    claims = jobs.claim_batch(conn, "w", 5, lease_seconds=60)
    assert len(claims) == 5
    stale = jobs.Claim(**{**claims[0].__dict__, "token": uuid.uuid4()})
    done = jobs.complete_many(conn, [stale, *claims[1:]])
    assert sorted(done) == sorted(c.job_id for c in claims[1:])
    assert row(conn, claims[0].job_id)["state"] == "running"


# --- failure, release, reject, cancel ----------------------------------------------------------------

def test_fail_requeues_with_backoff_then_dies_after_max_attempts(conn):
    [jid] = jobs.enqueue_many(conn, [job("a", max_attempts=2)])
    policy = RetryPolicy(base_seconds=100, cap_seconds=1000)
    c = claim(conn)
    assert jobs.fail(conn, jid, c.token, "bad gateway", policy=policy, rand=0.5) == "queued"
    r = row(conn, jid)
    assert r["state"] == "queued" and r["last_error"] == "bad gateway" and r["attempts"] == 1
    delay = (r["available_at"] - datetime.now(timezone.utc)).total_seconds()
    assert 40 < delay <= 50, "first failure waits rand * base"
    assert claim(conn) is None, "not runnable before the backoff has passed"
    conn.execute("UPDATE aibot.jobs SET available_at = now() WHERE id = %s", (jid,))
    c2 = claim(conn)
    assert c2.attempts == 2
    assert jobs.fail(conn, jid, c2.token, "still bad", rand=0.5) == "dead"
    r = row(conn, jid)
    assert r["state"] == "dead" and r["last_error"] == "still bad"
    assert "attempts exhausted (2/2)" in r["reason"] and r["finished_at"] is not None


def test_server_fault_refunds_attempt_and_dies_past_budget(conn):
    [jid] = jobs.enqueue_many(conn, [job("a", max_attempts=1)])
    conn.execute("UPDATE aibot.jobs SET max_server_faults = 2 WHERE id = %s", (jid,))
    c = claim(conn)
    assert jobs.fail(conn, jid, c.token, "connection refused", server_fault=True, rand=0.0) == "queued"
    r = row(conn, jid)
    assert (r["attempts"], r["server_faults"], r["state"]) == (0, 1, "queued")
    c = claim(conn)
    assert c.attempts == 1, "the refunded attempt is available again"
    assert jobs.fail(conn, jid, c.token, "connection refused", server_fault=True, rand=0.0) == "dead"
    r = row(conn, jid)
    assert (r["state"], r["server_faults"]) == ("dead", 2)
    assert "server faults exhausted" in r["reason"]


def test_fail_truncates_huge_errors(conn):
    [jid] = jobs.enqueue_many(conn, [job("a")])
    c = claim(conn)
    jobs.fail(conn, jid, c.token, "x" * 100_000, rand=0.0)
    assert len(row(conn, jid)["last_error"]) == jobs.MAX_ERROR_CHARS


def test_release_refunds_the_attempt_and_can_defer(conn):
    [jid] = jobs.enqueue_many(conn, [job("a")])
    c = claim(conn)
    later = datetime.now(timezone.utc) + timedelta(minutes=5)
    assert jobs.release(conn, jid, c.token, available_at=later)
    r = row(conn, jid)
    assert (r["state"], r["attempts"], r["available_at"]) == ("queued", 0, later)
    assert claim(conn) is None
    with pytest.raises(ValueError, match="available_at"):
        jobs.release(conn, jid, c.token, available_at=datetime(2030, 1, 1))


def test_reject_a_claimed_job(conn):
    [jid] = jobs.enqueue_many(conn, [job("a")])
    c = claim(conn)
    assert jobs.reject(conn, jid, c.token, "entity disabled")
    r = row(conn, jid)
    assert (r["state"], r["reason"]) == ("rejected", "entity disabled")
    with pytest.raises(ValueError, match="reason"):
        jobs.reject(conn, jid, c.token, "")


def test_cancel_queued_but_running_only_with_force(conn):
    a, b = jobs.enqueue_many(conn, [job("a", priority=0), job("b", priority=1)])
    c = claim(conn)
    assert c.job_id == a
    assert not jobs.cancel(conn, a), "a running job needs force"
    assert jobs.cancel(conn, b)
    assert row(conn, b)["state"] == "cancelled"
    assert not jobs.cancel(conn, b), "already cancelled"
    assert jobs.cancel(conn, a, force=True, reason="operator: wrong entity")
    r = row(conn, a)
    assert (r["state"], r["reason"]) == ("cancelled", "operator: wrong entity")
    assert not jobs.complete(conn, a, c.token), "the fenced-out worker cannot finish it"
    assert not jobs.renew(conn, a, c.token, 60)


# --- reclaim and prune ----------------------------------------------------------------------------

def test_reclaim_expired_requeues_or_kills(conn):
    a, b, c_ = jobs.enqueue_many(conn, [job("a", max_attempts=1), job("b", max_attempts=3), job("c")])
    ca, cb, cc = claim(conn), claim(conn), claim(conn)
    expire_lease(conn, ca.job_id)
    expire_lease(conn, cb.job_id)
    assert jobs.reclaim_expired(conn) == 2
    ra, rb, rc = row(conn, a), row(conn, b), row(conn, c_)
    assert (ra["state"], ra["reason"], ra["last_error"]) == ("dead", "lease expired", "lease expired")
    assert ra["finished_at"] is not None
    assert (rb["state"], rb["last_error"], rb["lease_expires_at"]) == ("queued", "lease expired", None)
    assert rc["state"] == "running"
    assert jobs.reclaim_expired(conn) == 0


def test_prune_deletes_only_old_finished_rows(conn):
    ids = jobs.enqueue_many(conn, [job(str(i)) for i in range(7)])
    for _ in range(5):
        c = claim(conn)
        jobs.complete(conn, c.job_id, c.token)
    conn.execute("UPDATE aibot.jobs SET finished_at = now() - interval '2 days' WHERE id = ANY(%s)", (ids[:4],))
    assert jobs.prune(conn, 86400, batch=2) == 4
    left = {r["id"]: r["state"] for r in conn.execute("SELECT id, state::text FROM aibot.jobs")}
    assert left == {ids[4]: "done", ids[5]: "queued", ids[6]: "queued"}
    with pytest.raises(ValueError, match="older_than_seconds"):
        jobs.prune(conn, -1)


def test_counts(conn):
    jobs.enqueue_many(conn, [job("a"), job("b"), jobs.NewJob("chat", "c", "e", None, 1, state="rejected", reason="r")])
    claim(conn)
    assert jobs.counts(conn) == {"queued": 1, "running": 1, "rejected": 1}


# --- transactions ---------------------------------------------------------------------------------

def test_calls_commit_on_a_non_autocommit_connection(db_url, conn):
    jobs.enqueue_many(conn, [job("a")])
    with db.connect(db_url) as tx_conn:
        c = jobs.claim(tx_conn, "w", lease_seconds=60, use_slots=False)
        assert row(conn, c.job_id)["state"] == "running", "visible to others: the claim committed"


def test_calls_join_the_callers_transaction(db_url, conn):
    with db.connect(db_url) as tx_conn:
        with tx_conn.transaction():
            jobs.enqueue_many(tx_conn, [job("a")])
            assert jobs.counts(conn) == {}, "not visible before the caller commits"
        assert jobs.counts(conn) == {"queued": 1}
        with pytest.raises(RuntimeError):
            with tx_conn.transaction():
                jobs.enqueue_many(tx_conn, [job("b")])
                raise RuntimeError("caller rolls back")
    assert jobs.counts(conn) == {"queued": 1}


def test_finish_delivered_stores_reply_and_timings_in_one_update(conn):
    from datetime import datetime, timezone

    jobs.enqueue_many(conn, [job("a")])
    c = claim(conn)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert jobs.finish_delivered(conn, c.job_id, c.token, {"text": "hi"}, started_at=t0, generated_at=t0)
    r = row(conn, c.job_id)
    assert (r["state"], r["reply"], r["started_at"]) == ("done", {"text": "hi"}, t0)
    assert r["delivered_at"] and r["finished_at"] and r["lease_expires_at"] is None
    assert not jobs.finish_delivered(conn, c.job_id, c.token, {"text": "again"}, started_at=t0, generated_at=t0)
