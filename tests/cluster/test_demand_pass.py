"""Demand passes against real Postgres and the simulator: the starvation bound with busy residents,
replicas added under demand and retired after, idle unloads, and the cluster-wide dispatch cap."""

from __future__ import annotations

import pytest

from aibot.cluster import loader, refresh, state
from aibot.cluster.demand import Policy
from aibot.cluster.sizing import GB
from aibot.queue import jobs
from aibot.sim import SimServer
from aibot.sim.catalog import ModelSpec
from aibot.sim.config import SimConfig
from tests.support.cluster_rows import job, register_sims

pytestmark = pytest.mark.timeout(120)

CATALOG = [ModelSpec("a", 15 * GB, parallel=2), ModelSpec("b", 15 * GB, parallel=2),
           ModelSpec("c", 15 * GB, parallel=2)]


def start_sim(**kw) -> SimServer:
    base = dict(api="lmstudio", models=CATALOG, preloaded=["a", "b"], speed=1.0, seconds_per_gb=0.0,
                load_overhead_seconds=0.05, ttft_seconds=0.005, per_token_seconds=0.001, reply_tokens=5)
    base.update(kw)
    return SimServer(SimConfig(**base)).start()


def resident(conn, server_id: int) -> dict[str, bool]:
    """model -> draining, of one server."""
    return {r["model"]: r["draining"] for r in state.instances(conn, server_id)}


def age_jobs(conn, model: str, seconds: float) -> None:
    conn.execute("UPDATE aibot.jobs SET created_at = created_at - make_interval(secs => %s), "
                 "available_at = available_at - make_interval(secs => %s) WHERE model = %s AND state = 'queued'",
                 (seconds, seconds, model))


def test_starving_model_drains_a_busy_victim_then_takes_its_place(conn, database):
    """Adversarial: both residents are busy and have queued work, recently loaded. A job for c (resident
    nowhere) waits; below its aging nothing moves; once due, the victim takes no new claims, and as soon
    as its request in flight finishes the next pass evicts it and loads c."""
    sim = start_sim()
    policy = Policy(aging_s=20.0, service_s=0.5, pass_s=1.0)
    try:
        rows = register_sims(conn, {"mac": sim}, memory_gb=56)   # two 15 GB models fit, not three
        sid = rows["mac"]["id"]
        conn.execute("UPDATE aibot.model_instances SET loaded_at = now(), last_used_at = now()")
        jobs.enqueue_many(conn, [job("a1", "a"), job("b1", "b"), job("a2", "a"), job("b2", "b"), job("c1", "c")])
        running = [jobs.claim(conn, "w", lease_seconds=60) for _ in range(2)]
        assert sorted(c.model for c in running) == ["a", "b"]
        loaded, _ = loader.load_for_demand(database, worker_id="t", policy=policy)
        assert loaded == [] and resident(conn, sid) == {"a": False, "b": False}
        [why] = conn.execute("SELECT waiting_reason FROM aibot.jobs WHERE source_message_id = 'c1'").fetchone().values()
        assert "wins one once its oldest job has waited 20 s" in why and "busy or recently loaded: a, b" in why

        age_jobs(conn, "c", 17.5)    # due: aging − (two passes + one request)
        loader.load_for_demand(database, worker_id="t", policy=policy)
        drained = [m for m, d in resident(conn, sid).items() if d]
        assert len(drained) == 1
        victim = drained[0]
        free = {r["model"]: r["free"] for r in state.slot_counts(conn, sid)}
        assert free.get(victim, 0) == 0, "a draining model takes no new claims"
        # Its queued job cannot be claimed now; the other model's can.
        other = jobs.claim(conn, "w", lease_seconds=60)
        assert other is not None and other.model != victim
        assert jobs.claim(conn, "w", lease_seconds=60) is None

        for c in running:
            if c.model == victim:
                assert jobs.complete(conn, c.job_id, c.token)
        loaded, _ = loader.load_for_demand(database, worker_id="t", policy=policy)
        assert loaded == ["c@mac"]
        assert set(resident(conn, sid)) == {"c", "a", "b"} - {victim}
        assert sim.model_stats("c")["loads"] == 1
        got = jobs.claim(conn, "w", lease_seconds=60)
        assert got is not None and got.model == "c"
    finally:
        sim.stop()


def test_replica_added_under_demand_and_retired_after(conn, database):
    one, two = start_sim(preloaded=["a"]), start_sim(preloaded=[])
    policy = Policy(aging_s=30.0, service_s=2.0, default_load_s=0.5, pass_s=1.0, residency_floor_s=0.0,
                    residency_per_load_s=0.0)
    try:
        rows = register_sims(conn, {"m1": one, "m2": two}, memory_gb=128)
        jobs.enqueue_many(conn, [job(f"a{i}", "a") for i in range(12)])
        loaded, _ = loader.load_for_demand(database, worker_id="t", policy=policy, replicas=True)
        assert loaded == ["a@m2"]
        assert "a" in resident(conn, rows["m2"]["id"]) and two.model_stats("a")["loads"] == 1
        # Nothing more to add at once: the decision is single-flight and sticks.
        assert loader.load_for_demand(database, worker_id="t", policy=policy, replicas=True)[0] == []

        # Demand falls: the replica unused the longest leaves after its residency, the other stays.
        conn.execute("UPDATE aibot.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued'")
        conn.execute("UPDATE aibot.model_instances SET last_used_at = now() - interval '1 hour', "
                     "loaded_at = now() - interval '1 hour' WHERE server_id = %s", (rows["m2"]["id"],))
        loaded, _ = loader.load_for_demand(database, worker_id="t", policy=policy, unloads=True)
        assert loaded == ["-a@m2"]
        assert "a" not in resident(conn, rows["m2"]["id"]) and "a" in resident(conn, rows["m1"]["id"])
    finally:
        one.stop()
        two.stop()


def test_idle_models_are_unloaded_past_their_ttl_never_with_work(conn, database):
    sim = start_sim()
    try:
        rows = register_sims(conn, {"mac": sim}, memory_gb=128)
        sid = rows["mac"]["id"]
        conn.execute("UPDATE aibot.model_instances SET last_used_at = now() - interval '10 minutes', "
                     "loaded_at = now() - interval '10 minutes'")
        jobs.enqueue_many(conn, [job("b1", "b")])
        kept = Policy(keep_loaded=True)
        assert loader.load_for_demand(database, worker_id="t", policy=kept, unloads=True)[0] == []
        drop = Policy(keep_loaded=False, idle_ttl_s=300)
        loaded, _ = loader.load_for_demand(database, worker_id="t", policy=drop, unloads=True)
        assert loaded == ["-a@mac"]                 # b has a queued job: it stays
        assert set(resident(conn, sid)) == {"b"} and sim.model_stats("a")["unloads"] == 1
    finally:
        sim.stop()


def test_dispatch_cap_of_one_runs_jobs_strictly_one_at_a_time(conn, database):
    sim = start_sim()
    try:
        register_sims(conn, {"mac": sim}, memory_gb=128)
        jobs.enqueue_many(conn, [job(f"j{i}", "ab"[i % 2]) for i in range(4)])
        assert refresh.set_dispatch_cap(database, 1)
        first = jobs.claim(conn, "w1", lease_seconds=60)
        assert first is not None
        assert jobs.claim(conn, "w2", lease_seconds=60) is None     # slots are free, the cap is not
        assert len(jobs.claim_batch(conn, "w3", 4, lease_seconds=60)) == 0
        assert jobs.complete(conn, first.job_id, first.token)
        assert jobs.claim(conn, "w2", lease_seconds=60) is not None
        # Raised at run time (a config edit): more at once; removed: only the slots limit.
        assert refresh.set_dispatch_cap(database, 2)
        assert jobs.claim(conn, "w3", lease_seconds=60) is not None
        assert jobs.claim(conn, "w3", lease_seconds=60) is None
        assert refresh.set_dispatch_cap(database, None)
        assert jobs.claim(conn, "w4", lease_seconds=60) is not None
        assert not refresh.set_dispatch_cap(database, None)          # unchanged: nothing written
        with pytest.raises(ValueError, match="maxConcurrentWorkers"):
            refresh.set_dispatch_cap(database, 0)
    finally:
        sim.stop()
