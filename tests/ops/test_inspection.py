"""The operator views, requeue/discard and the NOTIFY triggers of 0005_inspection.sql, on real Postgres."""

from __future__ import annotations

import datetime as dt
import json

import psycopg
import pytest
from psycopg import sql

from aibot.cluster.sizing import Budget
from aibot.ops import inspection
from aibot.ops.inspection import JobActionError, JobNotFound, ServerNotFound
from tests.support.waiting import wait_for

GB = 1_000_000_000


# --- fixtures shared with test_cli_ops.py and test_web.py ------------------------------------------

def db_now(conn) -> dt.datetime:
    return conn.execute("SELECT now() AS now").fetchone()["now"]


def add_job(conn, **fields) -> int:
    """Inserts one job row as the queue would have left it (tests only; no queue functions needed)."""
    now = fields.pop("now", None) or db_now(conn)
    created = fields.setdefault("created_at", now)
    fields.setdefault("source", "test")
    fields.setdefault("source_message_id", f"m{add_job.counter}")
    add_job.counter += 1
    fields.setdefault("entity_id", "eve")
    fields.setdefault("model", "m1")
    fields.setdefault("priority", 50)
    fields.setdefault("rank", created.timestamp() + fields["priority"] * 30)
    if "payload" in fields:
        fields["payload"] = json.dumps(fields["payload"])
    cols = list(fields)
    q = sql.SQL("INSERT INTO aibot.jobs ({}) VALUES ({}) RETURNING id").format(
        sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(map(sql.Placeholder, cols)))
    return conn.execute(q, fields).fetchone()["id"]


add_job.counter = 0


def add_server(conn, name: str, **fields) -> int:
    """A server row as the refresh writes it: with the sizing's safety margin for its memory."""
    fields = {"name": name, "url": f"http://{name}:1234", **fields}
    fields.setdefault("safety_bytes", Budget.from_row(fields).safety_bytes)
    cols = list(fields)
    q = sql.SQL("INSERT INTO aibot.servers ({}) VALUES ({}) RETURNING id").format(
        sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(map(sql.Placeholder, cols)))
    return conn.execute(q, fields).fetchone()["id"]


def add_instance(conn, server_id: int, model: str, size: int, slots: int = 0, used_by: list[int] = ()) -> None:
    conn.execute("INSERT INTO aibot.model_instances (server_id, model, size_bytes, parallel) VALUES (%s, %s, %s, %s)",
                 (server_id, model, size, max(slots, 1)))
    for i in range(slots):
        job = used_by[i] if i < len(used_by) else None
        conn.execute("INSERT INTO aibot.slots (server_id, model, job_id, taken_at) VALUES (%s, %s, %s, "
                     "CASE WHEN %s::bigint IS NULL THEN NULL ELSE now() END)", (server_id, model, job, job))


def seed(conn) -> dict:
    """A small cluster and a queue with jobs in every state; returns the ids the tests assert on."""
    now = db_now(conn)
    s = dt.timedelta(seconds=1)
    ids: dict = {}
    ids["s1"] = add_server(conn, "alpha", memory_bytes=64 * GB, health="healthy")
    ids["s2"] = add_server(conn, "beta", memory_bytes=32 * GB, health="down", failure_count=4, backoff_level=3,
                           backoff_until=now + 120 * s, last_error="connect refused")
    ids["q_crit_old"] = add_job(conn, priority=5, created_at=now - 100 * s, payload={"text": "hello there"})
    ids["q_crit_later"] = add_job(conn, priority=3, created_at=now - 10 * s, available_at=now + 600 * s)
    ids["q_high"] = add_job(conn, priority=20, created_at=now - 50 * s, entity_id="zed")
    ids["q_bg"] = add_job(conn, priority=95, created_at=now - 20 * s)
    ids["running"] = add_job(conn, priority=50, state="running", worker_id="w1@host:1", server_id=ids["s1"],
                             created_at=now - 30 * s, claimed_at=now - 5 * s, started_at=now - 4 * s,
                             lease_expires_at=now + 60 * s, attempts=1, claim_token="00000000-0000-0000-0000-000000000001")
    # Three replies in the last 5 minutes with waits 2, 4, 6 s and latencies 10, 20, 30 s.
    for i, (wait, lat) in enumerate([(2, 10), (4, 20), (6, 30)]):
        fin = now - (60 + i) * s
        ids[f"done{i}"] = add_job(conn, state="done", created_at=fin - lat * s, message_at=fin - lat * s,
                                  claimed_at=fin - lat * s + wait * s, finished_at=fin, server_id=ids["s1"])
    ids["done_old"] = add_job(conn, state="done", created_at=now - 31 * 60 * s, claimed_at=now - 30 * 60 * s,
                              finished_at=now - 30 * 60 * s)
    ids["skipped"] = add_job(conn, state="skipped", created_at=now - 40 * s, claimed_at=now - 39 * s,
                             finished_at=now - 35 * s, reason="[SKIP]")
    ids["dead"] = add_job(conn, state="dead", priority=70, attempts=3, created_at=now - 200 * s,
                          finished_at=now - 100 * s, reason="attempts exhausted", last_error="HTTP 500",
                          entity_id="zed", server_id=ids["s2"])
    ids["rejected"] = add_job(conn, state="rejected", model=None, reason="entity 'nobody' is unknown",
                              entity_id="nobody", finished_at=now)
    ids["cancelled"] = add_job(conn, state="cancelled", reason="operator", finished_at=now)
    add_instance(conn, ids["s1"], "m1", 10 * GB, slots=3, used_by=[ids["running"]])
    add_instance(conn, ids["s1"], "m2", 5 * GB, slots=0)
    add_instance(conn, ids["s2"], "m1", 10 * GB, slots=1)
    return ids


def by(rows, *keys):
    return {tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]: r for r in rows}


# --- views -------------------------------------------------------------------------------------------

def test_queue_depth_by_state_and_band(conn):
    seed(conn)
    depth = by(inspection.queue_depth(conn), "state", "band")
    assert depth[("queued", "critical")]["jobs"] == 2
    assert depth[("queued", "critical")]["runnable"] == 1  # one is deferred (available_at in the future)
    assert depth[("queued", "high")]["jobs"] == 1
    assert depth[("queued", "background")]["jobs"] == 1
    assert ("queued", "medium") not in depth
    assert depth[("running", "medium")]["jobs"] == 1
    assert depth[("done", "medium")]["jobs"] == 4
    assert depth[("dead", "low")]["jobs"] == 1
    # critical is listed before high within a state
    queued = [r["band"] for r in inspection.queue_depth(conn) if r["state"] == "queued"]
    assert queued == ["critical", "high", "background"]


def test_oldest_waiting_age(conn):
    seed(conn)
    oldest = inspection.queue_oldest(conn)
    assert oldest["queued"] == 4 and oldest["runnable"] == 3
    assert 99 <= oldest["oldest_wait_seconds"] < 110


def test_empty_queue_has_null_oldest(conn):
    oldest = inspection.queue_oldest(conn)
    assert oldest["queued"] == 0 and oldest["oldest_wait_seconds"] is None


def test_in_flight_shows_worker_server_and_lease(conn):
    ids = seed(conn)
    (row,) = inspection.in_flight(conn)
    assert row["id"] == ids["running"]
    assert row["worker_id"] == "w1@host:1" and row["server"] == "alpha" and row["model"] == "m1"
    assert 50 < row["lease_left_seconds"] <= 60
    assert 4 <= row["running_seconds"] < 15


def test_failed_jobs_lists_dead_and_rejected_with_reasons(conn):
    ids = seed(conn)
    rows = by(inspection.failed_jobs(conn), "id")
    assert set(rows) == {ids["dead"], ids["rejected"]}
    assert rows[ids["dead"]]["reason"] == "attempts exhausted" and rows[ids["dead"]]["last_error"] == "HTTP 500"
    assert rows[ids["dead"]]["server"] == "beta"
    assert rows[ids["rejected"]]["reason"] == "entity 'nobody' is unknown"


def test_server_health_memory_and_backoff(conn):
    seed(conn)
    servers = by(inspection.server_health(conn), "name")
    a, b = servers["alpha"], servers["beta"]
    assert a["status"] == "healthy" and a["slots_total"] == 3 and a["slots_used"] == 1
    assert a["models_loaded"] == 2 and a["models_bytes"] == 15 * GB
    # models 15 GB + 1 in-flight × 3 GB + 8 GB reserve + 10 % of (64 − 8) GB, as the sizing takes it
    assert a["accounted_bytes"] == 15 * GB + 3 * GB + 8 * GB + int(5.6 * GB)
    assert a["budget_left_bytes"] == 64 * GB - a["accounted_bytes"]
    assert b["status"] == "down" and b["failure_count"] == 4 and b["backoff_level"] == 3
    assert 100 < b["backoff_left_seconds"] <= 120
    conn.execute("UPDATE aibot.servers SET health = 'healthy' WHERE name = 'beta'")
    assert by(inspection.server_health(conn), "name")["beta"]["status"] == "backoff"
    inspection.drain_server(conn, "beta")
    assert by(inspection.server_health(conn), "name")["beta"]["status"] == "draining"


def test_slot_usage_per_server_and_model(conn):
    seed(conn)
    slots = by(inspection.slot_usage(conn), "server", "model")
    assert (slots[("alpha", "m1")]["slots_used"], slots[("alpha", "m1")]["slots_total"]) == (1, 3)
    assert slots[("alpha", "m1")]["slots_free"] == 2
    assert slots[("alpha", "m2")]["slots_total"] == 0 and slots[("alpha", "m2")]["instance_state"] == "loaded"
    assert (slots[("beta", "m1")]["slots_used"], slots[("beta", "m1")]["slots_total"]) == (0, 1)


def test_throughput_windows_and_percentiles(conn):
    seed(conn)
    w = by(inspection.throughput(conn), "window_minutes")
    assert w[5]["replies"] == 3 and w[5]["skipped"] == 1 and w[5]["finished"] == 4
    assert w[5]["replies_per_minute"] == pytest.approx(3 / 5)
    assert w[60]["replies"] == 4 and w[60]["dead"] == 1
    assert w[60]["replies_per_minute"] == pytest.approx(4 / 60)
    # waits in the 5-min window: 2, 4, 6 and the skipped job's 1 → p50 = 3
    assert w[5]["p50_wait_seconds"] == pytest.approx(3.0, abs=0.01)
    # latencies 10, 20, 30 and the skipped job's 5 → p50 = 15, p95 = 28.5
    assert w[5]["p50_latency_seconds"] == pytest.approx(15.0, abs=0.01)
    assert w[5]["p95_latency_seconds"] == pytest.approx(28.5, abs=0.01)


def test_entity_counts(conn):
    seed(conn)
    e = by(inspection.entity_counts(conn), "entity_id")
    assert (e["zed"]["queued"], e["zed"]["dead"], e["zed"]["total"]) == (1, 1, 2)
    assert e["nobody"]["rejected"] == 1
    assert e["eve"]["done"] == 4 and e["eve"]["running"] == 1 and e["eve"]["cancelled"] == 1


def test_monitor_stats_in_original_shape(conn):
    seed(conn)
    st = inspection.monitor_stats(conn)
    assert st["totalItems"] == 5 and st["unclaimedItems"] == 4 and st["claimedItems"] == 1
    assert st["priorityBands"] == {"critical": 2, "high": 1, "medium": 1, "low": 0, "background": 1}
    assert st["staleClaims"] == 0
    assert 24_500 <= st["averageWaitTime"] <= 25_500  # the running job waited 30 s - 5 s before its claim
    assert st["oldestItemAge"] >= 100_000
    assert st["throughputHour"] == pytest.approx(4 / 60, abs=0.001)
    assert st["lastSuccess"] is not None


def test_priority_band_python_matches_sql(conn):
    rows = conn.execute("SELECT p, aibot.priority_band(p) AS band FROM generate_series(0, 99) p").fetchall()
    assert all(inspection.priority_band(r["p"]) == r["band"] for r in rows)
    assert [inspection.priority_band(p) for p in (10, 11, 30, 31, 60, 61, 90, 91)] == [
        "critical", "high", "high", "medium", "medium", "low", "low", "background"]


def test_list_jobs_filters_and_validates(conn):
    ids = seed(conn)
    dead = inspection.list_jobs(conn, state="dead")
    assert [r["id"] for r in dead] == [ids["dead"]]
    zed = inspection.list_jobs(conn, entity="zed")
    assert {r["id"] for r in zed} == {ids["q_high"], ids["dead"]}
    assert len(inspection.list_jobs(conn, limit=2)) == 2
    with pytest.raises(ValueError, match="state: 'nope' is not one of queued"):
        inspection.list_jobs(conn, state="nope")
    with pytest.raises(ValueError, match="limit: 0 is outside"):
        inspection.list_jobs(conn, limit=0)


# --- requeue / discard ---------------------------------------------------------------------------------

def state_of(conn, job_id):
    return conn.execute("SELECT state::text AS s FROM aibot.jobs WHERE id = %s", (job_id,)).fetchone()["s"]


def test_requeue_dead_job_resets_attempts(conn):
    ids = seed(conn)
    row = inspection.requeue_job(conn, ids["dead"])
    assert row["state"] == "queued"
    job = inspection.get_job(conn, ids["dead"])
    assert job["attempts"] == 0 and job["finished_at"] is None and job["reason"] is None
    assert job["available_at"] <= db_now(conn)
    assert job["last_error"] == "HTTP 500"  # history kept for the operator


def test_requeue_cancelled_job(conn):
    ids = seed(conn)
    inspection.requeue_job(conn, ids["cancelled"])
    assert state_of(conn, ids["cancelled"]) == "queued"


def test_requeue_and_discard_refuse_running_job(conn):
    ids = seed(conn)
    with pytest.raises(JobActionError, match=f"job {ids['running']} is running \\(worker w1@host:1"):
        inspection.requeue_job(conn, ids["running"])
    with pytest.raises(JobActionError, match="is running"):
        inspection.discard_job(conn, ids["running"], "nope")
    assert state_of(conn, ids["running"]) == "running"


def test_requeue_refuses_done_and_modelless_jobs(conn):
    ids = seed(conn)
    with pytest.raises(JobActionError, match="is done"):
        inspection.requeue_job(conn, ids["done0"])
    with pytest.raises(JobActionError, match="has no model"):
        inspection.requeue_job(conn, ids["rejected"])
    assert state_of(conn, ids["done0"]) == "done"


def test_unknown_job_is_reported(conn):
    with pytest.raises(JobNotFound, match="job 999999 does not exist"):
        inspection.requeue_job(conn, 999999)
    with pytest.raises(JobNotFound, match="job 999999 does not exist"):
        inspection.discard_job(conn, 999999)


def test_discard_marks_cancelled_with_reason(conn):
    ids = seed(conn)
    inspection.discard_job(conn, ids["q_high"], "spam")
    job = inspection.get_job(conn, ids["q_high"])
    assert job["state"] == "cancelled" and job["reason"] == "spam" and job["finished_at"] is not None
    with pytest.raises(JobActionError, match="already finished"):
        inspection.discard_job(conn, ids["skipped"])


def test_sql_functions_raise_clear_messages_in_psql_too(conn):
    ids = seed(conn)
    with pytest.raises(psycopg.errors.ObjectInUse, match="cannot be requeued"):
        conn.execute("SELECT aibot.requeue_job(%s)", (ids["running"],))


def test_clear_queue_cancels_only_queued(conn):
    ids = seed(conn)
    assert inspection.clear_queue(conn) == 4
    assert state_of(conn, ids["q_crit_old"]) == "cancelled"
    assert state_of(conn, ids["running"]) == "running"


def test_drain_and_enable_server(conn):
    seed(conn)
    conn.execute("UPDATE aibot.servers SET enabled = false WHERE name = 'alpha'")
    assert inspection.drain_server(conn, "alpha")["draining"] is True
    row = inspection.enable_server(conn, "alpha")
    assert row["draining"] is False and row["enabled"] is True
    with pytest.raises(ServerNotFound, match="server 'gamma' is not known \\(servers: alpha, beta\\)"):
        inspection.drain_server(conn, "gamma")


# --- NOTIFY triggers ---------------------------------------------------------------------------------

def drain_notifies(listener) -> list[dict]:
    return [json.loads(n.payload) for n in listener.notifies(timeout=0.3)]


@pytest.fixture
def listener(db_url):
    """A session LISTENing on the job events, with a registered listener (0014: none are sent otherwise)."""
    with psycopg.connect(db_url, autocommit=True) as c:
        inspection.listen(c)
        c.execute("SET search_path = aibot")
        inspection.register_listener(c, "test-listener", 300)
        yield c


def test_triggers_notify_each_state_change_once(conn, listener):
    sid = add_server(conn, "alpha")
    jid = add_job(conn)
    conn.execute("UPDATE aibot.jobs SET state = 'running', server_id = %s, worker_id = 'w9' WHERE id = %s", (sid, jid))
    conn.execute("UPDATE aibot.jobs SET lease_expires_at = now() WHERE id = %s", (jid,))  # no state change
    conn.execute("UPDATE aibot.jobs SET state = 'done' WHERE id = %s", (jid,))
    dead = add_job(conn)
    conn.execute("UPDATE aibot.jobs SET state = 'dead' WHERE id = %s", (dead,))
    gone = add_job(conn)
    inspection.discard_job(conn, gone, "x")
    deleted = add_job(conn)
    conn.execute("DELETE FROM aibot.jobs WHERE id = %s", (deleted,))
    conn.execute("DELETE FROM aibot.jobs WHERE id = %s", (jid,))  # finished: pruning stays silent
    add_job(conn, state="rejected", model=None)  # never queued: nothing to show
    events: list[dict] = []
    wait_for(lambda: events.extend(drain_notifies(listener)) or len(events) >= 9, timeout=5)
    events.extend(drain_notifies(listener))
    got = [(e["type"], e["id"]) for e in events]
    assert got == [("queued", jid), ("claimed", jid), ("completed", jid), ("queued", dead), ("completed", dead),
                   ("queued", gone), ("deleted", gone), ("queued", deleted), ("deleted", deleted)]
    claimed = events[1]
    assert claimed["server_id"] == sid and claimed["worker"] == "w9" and claimed["state"] == "running"
    assert events[2]["success"] is True and events[4]["success"] is False
    assert all(len(json.dumps(e)) < 200 for e in events)


def test_drained_server_takes_no_new_claims(conn):
    """Cross-check with the queue (aibot.jobs.claim): drain stops new claims there; enable restores them."""
    jobs = pytest.importorskip("aibot.jobs")
    sid = add_server(conn, "alpha", health="healthy")
    add_instance(conn, sid, "m1", GB, slots=2)
    running = add_job(conn, state="running", server_id=sid, worker_id="w0",
                      claim_token="00000000-0000-0000-0000-000000000002", lease_expires_at=db_now(conn) + dt.timedelta(minutes=5))
    conn.execute("UPDATE aibot.slots SET job_id = %s WHERE id = (SELECT min(id) FROM aibot.slots)", (running,))
    queued = add_job(conn)
    inspection.drain_server(conn, "alpha")
    assert jobs.claim(conn, "w1", lease_seconds=60, use_slots=True) is None
    assert state_of(conn, running) == "running"  # in-flight work is left alone
    inspection.enable_server(conn, "alpha")
    got = jobs.claim(conn, "w1", lease_seconds=60, use_slots=True)
    assert got is not None and got.job_id == queued and got.server_id == sid
