"""Doorbells track claimable capacity, not queue length, and commit with the jobs they announce."""

import pytest

from aibot.queue import doorbell, jobs
from tests.support.cluster_rows import job, server, slots


def outstanding(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM dramatiq.queue WHERE queue_name = 'aibot' AND state = 'queued'").fetchone()["n"]


def test_burst_rings_no_more_than_free_slots(conn, monkeypatch):
    monkeypatch.setenv("AIBOT_BROKER_URL", "postgresql://unused")  # the default broker: dramatiq-postgres
    sid = server(conn, "s1")
    slots(conn, sid, "m1", 3)
    jobs.enqueue_many(conn, [job(f"m{i}") for i in range(10_000)])
    assert doorbell.ring(conn, 10_000) == 3
    assert outstanding(conn) == 3
    assert doorbell.ring(conn, 1) == 0, "doorbells already waiting cover the free slots"


def test_rings_only_for_models_with_free_slots_and_for_stored_replies(conn, monkeypatch):
    monkeypatch.setenv("AIBOT_BROKER_URL", "postgresql://unused")
    sid = server(conn, "s1")
    slots(conn, sid, "m1", 4)
    jobs.enqueue_many(conn, [job("a", model="m1"), job("b", model="unloaded")])
    assert doorbell.matchable(conn) == 1
    [jid] = jobs.enqueue_many(conn, [job("c", model="unloaded")])
    conn.execute("UPDATE aibot.jobs SET reply = '{\"text\": \"hi\"}' WHERE id = %s", (jid,))
    assert doorbell.matchable(conn) == 2, "a stored reply needs delivering, not a slot"
    assert doorbell.ring(conn) == 2


def test_doorbell_rolls_back_with_the_ingest_transaction(db_url, monkeypatch):
    from aibot import db

    monkeypatch.setenv("AIBOT_BROKER_URL", "postgresql://unused")
    with db.connect(db_url, autocommit=True) as conn:
        slots(conn, server(conn, "s1"), "m1", 2)
    with db.connect(db_url) as conn:
        with pytest.raises(RuntimeError):
            with conn.transaction():  # as the bot's ingest does
                jobs.enqueue_many(conn, [job("a")])
                assert doorbell.ring(conn, 1) == 1
                raise RuntimeError("crash before commit")
    with db.connect(db_url, autocommit=True) as conn:
        assert outstanding(conn) == 0
        assert conn.execute("SELECT count(*) AS n FROM aibot.jobs").fetchone()["n"] == 0


def test_message_is_what_dramatiq_postgres_consumes(conn, monkeypatch):
    from dramatiq import Message

    monkeypatch.setenv("AIBOT_BROKER_URL", "postgresql://unused")
    slots(conn, server(conn, "s1"), "m1", 1)
    jobs.enqueue_many(conn, [job("a")])
    doorbell.ring(conn)
    (raw,) = conn.execute("SELECT message::text AS m FROM dramatiq.queue").fetchone().values()
    msg = Message.decode(raw.encode())
    assert (msg.queue_name, msg.actor_name, msg.args) == ("aibot", "claim", ())


def test_work_for_a_model_loaded_nowhere_rings_once_to_start_a_loader(conn, monkeypatch):
    monkeypatch.setenv("AIBOT_BROKER_URL", "postgresql://unused")
    sid = server(conn, "s1")
    jobs.enqueue_many(conn, [job(f"c{i}", model="cold") for i in range(50)])
    assert doorbell.matchable(conn) == 0
    assert doorbell.ring(conn, 50) == 1, "one worker must come up empty and kick its demand loader"
    assert doorbell.ring(conn, 1) == 0, "one waiting wake-up is enough"
    slots(conn, sid, "other", 2)
    conn.execute("DELETE FROM dramatiq.queue")
    conn.execute("INSERT INTO aibot.model_instances (server_id, model, state) VALUES (%s, 'cold', 'loading')", (sid,))
    assert doorbell.ring(conn, 1) == 0, "a load in progress needs no wake-up"


def test_a_ring_notifies_idle_consumers_at_commit_only_when_it_rang(db_url, monkeypatch):
    """One statement inserts the wake-ups and NOTIFYs dramatiq-postgres' consumers; a ring that
    inserts nothing must not wake them (they would poll the queue for nothing)."""
    from aibot import db

    monkeypatch.setenv("AIBOT_BROKER_URL", "postgresql://unused")
    with db.connect(db_url, autocommit=True) as listener, db.connect(db_url, autocommit=True) as conn:
        listener.execute('LISTEN "dramatiq.aibot.enqueue"')
        slots(conn, server(conn, "s1"), "m1", 3)
        jobs.enqueue_many(conn, [job(f"j{i}") for i in range(5)])
        with conn.transaction():
            assert doorbell.ring(conn, 5) == 3
            assert list(listener.notifies(timeout=0.2)) == [], "NOTIFY is sent at commit, not before"
        got = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.channel for n in got] == ["dramatiq.aibot.enqueue"]
        ids = [r["id"] for r in conn.execute("SELECT message ->> 'message_id' AS id FROM dramatiq.queue")]
        assert len(set(ids)) == 3, f"every wake-up has its own message id: {ids}"
        assert doorbell.ring(conn, 1) == 0
        assert list(listener.notifies(timeout=0.5)) == [], "a ring that inserted nothing notified"
