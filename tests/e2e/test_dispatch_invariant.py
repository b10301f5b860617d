"""The dispatch invariant, measured at the servers: in-flight requests per (server, model) never exceed
that pair's slots, with 16 threads in each of 4 processes racing on the capacity-aware claim."""

from __future__ import annotations

import multiprocessing
from collections import Counter

import pytest

from aibot.queue import jobs
from aibot.sim import GB, ModelSpec, SimConfig, SimServer
from tests.support import dispatch_worker
from tests.support.cluster_rows import register_sims

pytestmark = pytest.mark.timeout(240)

PROCESSES, THREADS, JOBS = 4, 16, 500


def test_in_flight_never_exceeds_slots_with_64_racing_claimers(conn, db_url):
    # A generation lasts ~60 ms: long enough that on a loaded CI machine all of a pair's slots are
    # busy at once (with 10 ms ones a claimer came too late for b/m1's third slot: peak 2 of 3).
    catalog = [ModelSpec("m1", 1 * GB, parallel=2), ModelSpec("m2", 1 * GB, parallel=1)]
    sims = {
        "a": SimServer(SimConfig(name="a", models=catalog, preloaded="all", speed=1.0, ttft_seconds=0.02,
                                 per_token_seconds=0.005, reply_tokens=8)).start(),
        "b": SimServer(SimConfig(name="b", models=[ModelSpec("m1", 1 * GB, parallel=3)], preloaded="all",
                                 speed=1.0, ttft_seconds=0.02, per_token_seconds=0.005, reply_tokens=8)).start(),
    }
    try:
        register_sims(conn, sims, memory_gb=64)
        slots = Counter((r["name"], r["model"]) for r in conn.execute(
            "SELECT s.name, sl.model FROM aibot.slots sl JOIN aibot.servers s ON s.id = sl.server_id"))
        assert slots == {("a", "m1"): 2, ("a", "m2"): 1, ("b", "m1"): 3}

        jobs.enqueue_many(conn, [jobs.NewJob(source="t", source_message_id=str(i), entity_id="e",
                                             model="m1" if i % 3 else "m2", priority=i % 100)
                                 for i in range(JOBS)])
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(PROCESSES) as pool:
            results = pool.starmap(dispatch_worker.run_process,
                                   [(db_url, f"p{i}", THREADS, JOBS, 180.0) for i in range(PROCESSES)])
        done = [j for r in results for j in r]
        assert len(done) == JOBS and len(set(done)) == JOBS, "every job exactly once"

        for name, sim in sims.items():
            for model, st in sim.stats()["models"].items():
                assert st["peak_in_flight"] <= slots[(name, model)], (name, model, st)
        # The claimers really raced: every slot was used at the same time at some point.
        assert sims["b"].model_stats("m1")["peak_in_flight"] == 3
        assert sum(sim.stats()["server"]["peak_in_flight"] for sim in sims.values()) == 6
    finally:
        for s in sims.values():
            s.stop()
