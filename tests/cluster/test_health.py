"""Shared per-server backoff: atomic fault counting, threshold, exponential backoff with jitter, probes."""

from __future__ import annotations

import random
import threading
from datetime import timedelta

import pytest

from aibot import db
from aibot.backends import ChatRequest, ServerFault, make_backend
from aibot.backends.factory import backend_for_server
from aibot.cluster import health, refresh, state
from aibot.cluster.sizing import GB
from aibot.config import ServerConfig
from aibot.queue import jobs
from aibot.scheduler import jobs as scheduled
from aibot.sim import SimServer
from aibot.sim.catalog import ModelSpec
from aibot.sim.config import SimConfig
from tests.support.cluster_rows import register_sims
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)


# --- pure delay --------------------------------------------------------------------------------------

def test_backoff_delay_doubles_to_the_cap():
    assert [health.backoff_delay(lv, base=5, cap=300, jitter=0.5) for lv in range(8)] == \
        [2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 150.0, 150.0]
    assert health.backoff_delay(10_000, base=5, cap=300, jitter=0.9) == pytest.approx(270.0)


def test_backoff_delay_rejects_bad_input():
    with pytest.raises(ValueError, match="level"):
        health.backoff_delay(-1)
    with pytest.raises(ValueError, match="rand"):
        health.backoff_delay(0, jitter=1.5)


def test_jitter_stays_in_range_and_below_one():
    rng = random.Random(7)
    draws = [health.jitter_factor(rng) for _ in range(2000)]
    assert all(0.5 <= d < 1.0 for d in draws)
    assert max(draws) - min(draws) > 0.4     # it does spread


def test_sql_backoff_matches_python(conn):
    for level in range(0, 12):
        for jitter in (0.5, 0.73, 0.99):
            sql = conn.execute("SELECT aibot.backoff_seconds(%s, 5, 300, %s) AS s", (level, jitter)).fetchone()["s"]
            assert sql == pytest.approx(health.backoff_delay(level, base=5, cap=300, jitter=jitter))


# --- shared state in Postgres ------------------------------------------------------------------------

def make_server(conn, name="s1", url="http://10.0.0.1:1234") -> dict:
    refresh.sync_servers(conn, [ServerConfig.model_validate({"name": name, "url": url,
                                                             "capabilities": {"maxMemory": 128}})])
    return state.server_by_name(conn, name)


def usable_ids(conn) -> set[int]:
    return {r["id"] for r in conn.execute("SELECT id FROM aibot.usable_servers")}


def test_threshold_backs_off_for_everyone_and_ok_resets(conn):
    s = make_server(conn)
    rng = random.Random(1)
    first = health.record_fault(conn, s["id"], "Unreachable: refused", rng=rng)
    second = health.record_fault(conn, s["id"], "Unreachable: refused", rng=rng)
    assert (first.failure_count, second.failure_count) == (1, 2)
    assert not second.tripped and second.health == "unknown" and s["id"] in usable_ids(conn)

    third = health.record_fault(conn, s["id"], "Timeout: read", rng=rng)
    now = state.now(conn)
    assert third.tripped and third.health == "down" and third.backoff_level == 1
    # Level 0's delay: 5 s × jitter in [0.5, 1).
    assert timedelta(seconds=2.5) <= third.backoff_until - now < timedelta(seconds=5)
    assert s["id"] not in usable_ids(conn)

    # Requests that were in flight keep failing: counted, but no second escalation.
    fourth = health.record_fault(conn, s["id"], "Unreachable", rng=rng)
    assert (fourth.failure_count, fourth.backoff_level, fourth.tripped) == (4, 1, False)
    assert fourth.backoff_until == third.backoff_until

    ok = health.record_ok(conn, s["id"])
    # Serving again at once; the level is remembered so a trip within the flap window escalates.
    assert (ok.failure_count, ok.backoff_level, ok.backoff_until, ok.health) == (0, 1, None, "healthy")
    assert s["id"] in usable_ids(conn)
    assert state.server_by_id(conn, s["id"])["last_error"] == "Unreachable"


def test_concurrent_faults_from_many_workers_count_exactly_once_each(conn, db_url):
    s = make_server(conn)
    n = 24
    barrier = threading.Barrier(n)
    tripped = []

    def worker():
        with db.connect(db_url, autocommit=True) as c:
            barrier.wait()
            st = health.record_fault(c, s["id"], "boom")
            tripped.append(st.tripped)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row = state.server_by_id(conn, s["id"])
    assert row["failure_count"] == n
    assert row["backoff_level"] == 1 and tripped.count(True) == 1


def test_record_fault_on_missing_server_returns_none(conn):
    assert health.record_fault(conn, 999, "x") is None
    assert health.record_ok(conn, 999) is None


# --- with the simulator --------------------------------------------------------------------------------

MODEL = "m"


@pytest.fixture
def two_sims():
    cfg = dict(api="lmstudio", models=[ModelSpec(MODEL, 8 * GB, parallel=2)], preloaded=[MODEL], speed=0.001)
    sims = [SimServer(SimConfig(name=f"sim{i}", **cfg)).start() for i in (1, 2)]
    yield sims
    for s in sims:
        s.stop()


def test_outage_backs_off_one_server_claims_go_to_the_other_then_probe_recovers(conn, database, two_sims):
    sim1, sim2 = two_sims
    rows = register_sims(conn, {"one": sim1, "two": sim2}, memory_gb=64)
    one, two = rows["one"]["id"], rows["two"]["id"]

    sim1.begin_outage(mode="refuse")
    b1 = make_backend("lmstudio", sim1.url)
    try:
        # Three workers each see one fault talking to server one; the third backs it off for all.
        states = []
        for _ in range(health.FAULT_THRESHOLD):
            with pytest.raises(ServerFault) as err:
                b1.chat(ChatRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}]))
            states.append(health.record_fault(conn, one, f"{type(err.value).__name__}: {err.value}", base=0.2))
        assert [s.tripped for s in states] == [False, False, True]
        assert states[-1].health == "down"

        # Every claim now goes to server two, though server one still has free slots for the model.
        jobs.enqueue_many(conn, [jobs.NewJob("chat", str(i), "e", MODEL, 50) for i in range(4)])
        got = [jobs.claim(conn, "w", lease_seconds=60) for _ in range(4)]
        assert [c.server_id for c in got if c] == [two, two]       # two has 2 slots (parallel 2)
        for c in got:
            if c:
                jobs.complete(conn, c.job_id, c.token)

        # While it is still out, the probe (every PROBE_EVERY_SECONDS, whatever the backoff) fails and
        # it stays down at the same level: a long outage does not push its recovery further out.
        wait_for(lambda: any(r["id"] == one for r in health.due_probes(conn)), timeout=5, message="probe due")
        [failed] = [s for s in health.probe_due(database, backend_for_server) if s.server_id == one]
        assert (failed.health, failed.backoff_level) == ("down", 1)

        # Recovery: the next probe finds it healthy and claims may use it again.
        sim1.end_outage()
        wait_for(lambda: any(r["id"] == one for r in health.due_probes(conn)),
                 timeout=health.PROBE_EVERY_SECONDS + 2, message="next probe due")
        assert "one: healthy" in scheduled.probe(database)
        row = state.server_by_id(conn, one)
        assert (row["health"], row["failure_count"], row["backoff_until"]) == ("healthy", 0, None)
        claimed = {jobs.claim(conn, "w", lease_seconds=60).server_id for _ in range(2)}
        assert one in claimed
    finally:
        b1.close()
