"""The capacity-aware claim: a job runs only with a free slot on a usable server holding its model."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from aibot import db
from aibot.queue import jobs
from tests.support.cluster_rows import job, server, slots

pytestmark = pytest.mark.timeout(180)


def claim(conn, worker: str = "w"):
    return jobs.claim(conn, worker, lease_seconds=60, use_slots=True)


def slot_row(conn, slot_id: int) -> dict | None:
    return conn.execute("SELECT * FROM aibot.slots WHERE id = %s", (slot_id,)).fetchone()


def held(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM aibot.slots WHERE job_id IS NOT NULL").fetchone()["n"]


def test_claimed_only_when_a_slot_is_free(conn):
    [jid] = jobs.enqueue_many(conn, [job("a")])
    assert claim(conn) is None, "no slot anywhere"
    sid = server(conn, "s1")
    [slot] = slots(conn, sid, "m1")
    c = claim(conn)
    assert (c.job_id, c.server_id, c.slot_id) == (jid, sid, slot)
    s = slot_row(conn, slot)
    assert (s["job_id"], s["claim_token"]) == (jid, c.token) and s["taken_at"] is not None
    assert jobs.get(conn, jid)["server_id"] == sid
    jobs.enqueue_many(conn, [job("b")])
    assert claim(conn) is None, "the only slot is taken"


@pytest.mark.parametrize("cols", [
    {"draining": True}, {"health": "down"}, {"enabled": False},
    {"backoff_until": "infinity"},
])
def test_unusable_servers_are_skipped(conn, cols):
    jobs.enqueue_many(conn, [job("a")])
    slots(conn, server(conn, "bad", **cols), "m1", 4)
    assert claim(conn) is None
    good = server(conn, "good", health="unknown")
    slots(conn, good, "m1")
    assert claim(conn).server_id == good


def test_backoff_in_the_past_is_over(conn):
    jobs.enqueue_many(conn, [job("a")])
    sid = server(conn, "s1", backoff_until="-infinity")
    slots(conn, sid, "m1")
    assert claim(conn).server_id == sid


def test_wrong_model_and_retired_slots_do_not_count(conn):
    jobs.enqueue_many(conn, [job("a")])
    sid = server(conn, "s1")
    slots(conn, sid, "other-model", 2)
    [retired] = slots(conn, sid, "m1")
    conn.execute("UPDATE aibot.slots SET retired = true WHERE id = %s", (retired,))
    assert claim(conn) is None


def test_prefers_the_server_with_most_free_slots(conn):
    jobs.enqueue_many(conn, [job(str(i)) for i in range(6)])
    a = server(conn, "a")
    b = server(conn, "b")
    slots(conn, a, "m1", 1)
    slots(conn, b, "m1", 3)
    picks = [claim(conn).server_id for _ in range(4)]
    # free (a, b): (1,3) -> b; (1,2) -> b; (1,1) tie -> lower id a; (0,1) -> b
    assert picks == [b, b, a, b]
    assert claim(conn) is None


def test_claims_spread_over_servers_beyond_the_slot_sample(conn):
    """The slot choice orders only the model's first 16 free slots by server (0011_claim_free_slots.sql):
    with 24 free it must still spread, a server leaving the sample as its slots fill."""
    jobs.enqueue_many(conn, [job(str(i)) for i in range(24)])
    ids = [server(conn, f"s{i}") for i in range(6)]
    for sid in ids:
        slots(conn, sid, "m1", 4)
    picks = [claim(conn).server_id for _ in range(24)]
    assert len(set(picks[:5])) == 5, picks          # the first five claims land on five servers
    for n in range(1, 25):                          # and no server is ever more than 2 jobs ahead of another
        held = Counter(picks[:n])
        assert max(held.values()) - min(held.get(sid, 0) for sid in ids) <= 2, (n, picks)
    assert claim(conn) is None


def test_a_blocked_pair_is_not_taken_though_its_server_is_usable(conn):
    jobs.enqueue_many(conn, [job("a")])
    bad, good = server(conn, "bad"), server(conn, "good")
    slots(conn, bad, "m1", 4)
    slots(conn, good, "m1", 1)
    conn.execute("""INSERT INTO aibot.model_health (server_id, model, backoff_until, last_error)
                    VALUES (%s, 'm1', 'infinity', 'test')""", (bad,))
    assert claim(conn).server_id == good


def test_job_for_an_unloaded_model_does_not_block_the_queue(conn):
    blocked = jobs.enqueue_many(conn, [job(f"x{i}", model="not-loaded", priority=0) for i in range(300)])
    [runnable] = jobs.enqueue_many(conn, [job("y", model="m1", priority=99)])
    slots(conn, server(conn, "s1"), "m1")
    c = jobs.claim(conn, "w", lease_seconds=60, use_slots=True, max_scan=5)
    assert c.job_id == runnable
    assert jobs.get(conn, blocked[0])["state"] == "queued"


def test_stored_reply_is_claimable_without_a_slot(conn):
    a, b = jobs.enqueue_many(conn, [job("a", priority=0), job("b", priority=1)])
    slots(conn, server(conn, "s1"), "m1")
    first = claim(conn)
    assert first.job_id == a
    jobs.store_reply(conn, a, first.token, {"text": "ready"})
    conn.execute("UPDATE aibot.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = %s", (a,))
    jobs.reclaim_expired(conn)
    second = claim(conn)  # slot is free again; b could take it but a (higher priority) needs none
    assert (second.job_id, second.slot_id, second.reply) == (a, None, {"text": "ready"})
    third = claim(conn)
    assert third.job_id == b and third.slot_id is not None


def test_plain_claim_ignores_slots(conn):
    [jid] = jobs.enqueue_many(conn, [job("a", model="not-loaded")])
    c = jobs.claim(conn, "w", lease_seconds=60, use_slots=False)
    assert (c.job_id, c.slot_id) == (jid, None)


def test_batch_claim_stops_at_capacity(conn):
    jobs.enqueue_many(conn, [job(str(i)) for i in range(10)] + [job(f"o{i}", model="m2") for i in range(3)])
    sid = server(conn, "s1")
    slots(conn, sid, "m1", 3)
    slots(conn, sid, "m2", 1)
    got = jobs.claim_batch(conn, "w", 10, lease_seconds=60, use_slots=True)
    assert Counter(c.model for c in got) == {"m1": 3, "m2": 1}
    assert len({c.slot_id for c in got}) == 4


@pytest.mark.parametrize("leave", ["complete", "skip", "fail", "server_fault", "release", "reject", "reclaim",
                                   "cancel", "delete"])
def test_every_way_out_of_running_frees_the_slot(conn, leave):
    [jid] = jobs.enqueue_many(conn, [job("a")])
    [slot] = slots(conn, server(conn, "s1"), "m1")
    c = claim(conn)
    assert held(conn) == 1
    if leave == "complete":
        assert jobs.complete(conn, jid, c.token)
    elif leave == "skip":
        assert jobs.complete(conn, jid, c.token, state="skipped", reason="[SKIP]")
    elif leave == "fail":
        assert jobs.fail(conn, jid, c.token, "boom") == "queued"
    elif leave == "server_fault":
        assert jobs.fail(conn, jid, c.token, "refused", server_fault=True) == "queued"
    elif leave == "release":
        assert jobs.release(conn, jid, c.token)
    elif leave == "reject":
        assert jobs.reject(conn, jid, c.token, "entity gone")
    elif leave == "reclaim":
        conn.execute("UPDATE aibot.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = %s", (jid,))
        assert jobs.reclaim_expired(conn) == 1
    elif leave == "cancel":
        assert jobs.cancel(conn, jid, force=True)
    elif leave == "delete":
        conn.execute("DELETE FROM aibot.jobs WHERE id = %s", (jid,))
    s = slot_row(conn, slot)
    assert (s["job_id"], s["claim_token"], s["taken_at"]) == (None, None, None)


def test_refused_call_keeps_the_slot(conn):
    jobs.enqueue_many(conn, [job("a")])
    [slot] = slots(conn, server(conn, "s1"), "m1")
    c = claim(conn)
    assert not jobs.complete(conn, c.job_id, uuid.uuid4())
    assert slot_row(conn, slot)["job_id"] == c.job_id


def test_retired_slot_is_deleted_on_release(conn):
    jobs.enqueue_many(conn, [job("a"), job("b")])
    sid = server(conn, "s1")
    [slot] = slots(conn, sid, "m1")
    c = claim(conn)
    conn.execute("UPDATE aibot.slots SET retired = true WHERE id = %s", (slot,))
    assert jobs.release(conn, c.job_id, c.token)
    assert slot_row(conn, slot) is None
    assert claim(conn) is None, "capacity shrank to zero"


def test_in_flight_never_exceeds_slots_with_16_threads(db_url, conn):
    n_jobs, capacity = 500, 3
    ids = jobs.enqueue_many(conn, [job(str(i), model="m1" if i % 2 else "m2") for i in range(n_jobs)])
    a, b = server(conn, "a"), server(conn, "b")
    slots(conn, a, "m1", 1)
    slots(conn, b, "m1", 1)
    slots(conn, b, "m2", 1)
    lock = threading.Lock()
    state = {"in_flight": 0, "max_py": 0, "max_sql": 0, "done": 0}
    claimed: list[int] = []

    def worker(i: int) -> None:
        with db.connect(db_url, autocommit=True) as c:
            while True:
                cl = jobs.claim(c, f"w{i}", lease_seconds=60, use_slots=True)
                if cl is None:
                    with lock:
                        if state["done"] >= n_jobs:
                            return
                    time.sleep(0.002)  # poll interval while all slots are busy, not synchronisation
                    continue
                with lock:
                    state["in_flight"] += 1
                    state["max_py"] = max(state["max_py"], state["in_flight"])
                    claimed.append(cl.job_id)
                running = c.execute("SELECT count(*) AS n FROM aibot.jobs WHERE state = 'running'").fetchone()["n"]
                with lock:
                    state["max_sql"] = max(state["max_sql"], running)
                    state["in_flight"] -= 1
                assert jobs.complete(c, cl.job_id, cl.token)
                with lock:
                    state["done"] += 1

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(worker, range(16)))
    assert sorted(claimed) == sorted(ids), "every job claimed exactly once"
    assert state["max_sql"] <= capacity and state["max_py"] <= capacity, state
    assert state["max_py"] >= 2, f"claims never overlapped, the test proved nothing: {state}"
    assert held(conn) == 0
    per_server = {r["server_id"]: r["n"] for r in conn.execute(
        "SELECT server_id, count(*) AS n FROM aibot.jobs GROUP BY server_id")}
    assert set(per_server) == {a, b}
