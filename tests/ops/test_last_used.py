"""LAST USED moves when a slot of the model is used (issue 15, finding 5): `aibot models list`,
`slot_usage.last_used_at` and the LRU order eviction reads (cluster_instances) all see the claim and
the release, not only the load."""

from __future__ import annotations

import datetime as dt

from aibot.cluster import state
from aibot.ops import inspection
from aibot.queue import jobs
from tests.ops.test_inspection import GB, add_job, add_server, db_now

HOUR = dt.timedelta(hours=1)


def loaded_an_hour_ago(conn, sid: int, model: str, slots: int) -> dt.datetime:
    then = db_now(conn) - HOUR
    conn.execute("INSERT INTO aibot.model_instances (server_id, model, size_bytes, parallel, loaded_at, last_used_at)"
                 " VALUES (%s, %s, %s, %s, %s, %s)", (sid, model, 4 * GB, slots, then, then))
    for _ in range(slots):
        conn.execute("INSERT INTO aibot.slots (server_id, model) VALUES (%s, %s)", (sid, model))
    return then


def last_used(conn, model: str) -> tuple[dt.datetime, dt.datetime, dt.datetime]:
    [usage] = [r for r in inspection.slot_usage(conn) if r["model"] == model]
    [resident] = [r for r in inspection.resident_models(conn) if r["model"] == model]
    [inst] = [r for r in state.instances(conn) if r["model"] == model]
    return usage["last_used_at"], resident["last_used_at"], inst["last_used_at"]


def test_a_claim_and_its_release_move_last_used(conn):
    sid = add_server(conn, "alpha", memory_bytes=64 * GB, health="healthy")
    then = loaded_an_hour_ago(conn, sid, "m1", 2)
    idle = loaded_an_hour_ago(conn, sid, "idle", 1)
    assert last_used(conn, "m1") == (then, then, then)

    add_job(conn, model="m1")
    claim = jobs.claim(conn, "w1@host:1", lease_seconds=60)
    assert claim is not None and claim.server_id == sid
    claimed_at = db_now(conn)
    at_claim = last_used(conn, "m1")
    assert all(claimed_at - dt.timedelta(seconds=30) < t <= claimed_at for t in at_claim), at_claim

    assert jobs.complete(conn, claim.job_id, claim.token)
    after = last_used(conn, "m1")
    assert all(t >= at_claim[0] for t in after) and after[0] > at_claim[0], (at_claim, after)
    # A model nobody used keeps its load time, so eviction still picks it first.
    assert last_used(conn, "idle") == (idle, idle, idle)


def test_models_list_shows_the_use(conn, capsys):
    from aibot.cli import main

    sid = add_server(conn, "alpha", memory_bytes=64 * GB, health="healthy")
    then = loaded_an_hour_ago(conn, sid, "m1", 1)
    add_job(conn, model="m1")
    claim = jobs.claim(conn, "w1@host:1", lease_seconds=60)
    jobs.complete(conn, claim.job_id, claim.token)
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    [line] = [ln for ln in out.splitlines() if " m1 " in f" {ln} "]
    assert line.count(then.strftime("%H:%M")) == 1, line   # loaded an hour ago; used just now
