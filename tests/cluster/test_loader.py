"""The single-flight loader against the simulator: one load for many callers, eviction, budget, failures."""

from __future__ import annotations

import threading

import pytest

from aibot import db
from aibot.backends import ChatRequest, make_backend
from aibot.cluster import loader, refresh, state
from aibot.cluster.sizing import GB, Budget, Instance, fits
from aibot.queue import jobs
from aibot.scheduler import jobs as scheduled
from aibot.settings import reset_settings
from aibot.sim import SimServer
from aibot.sim.catalog import ModelSpec
from aibot.sim.config import SimConfig
from tests.support.cluster_rows import register_sims
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

CATALOG = [ModelSpec("a", 15 * GB, parallel=2), ModelSpec("b", 15 * GB, parallel=2),
           ModelSpec("c", 15 * GB, parallel=4), ModelSpec("big", 25 * GB, parallel=1)]


def start_sim(**kw) -> SimServer:
    base = dict(api="lmstudio", models=CATALOG, preloaded=["a", "b"], speed=1.0, seconds_per_gb=0.0,
                load_overhead_seconds=0.05, ttft_seconds=0.005, per_token_seconds=0.001, reply_tokens=5,
                load_duplicates=True)
    base.update(kw)
    return SimServer(SimConfig(**base)).start()


setup_cluster = register_sims


def start_callers(db_url: str, model: str, n: int):
    """`n` threads calling ensure_loaded(model) at the same instant; join the threads, then read the lists."""
    barrier = threading.Barrier(n)
    results, errors = [], []

    def caller(i):
        barrier.wait()
        try:
            results.append(loader.ensure_loaded(db_url, model, worker_id=f"w{i}"))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results, errors


def states(conn, server_id: int) -> dict[str, str]:
    return {r["model"]: r["state"] for r in state.instances(conn, server_id)}


def loads(conn) -> list[dict]:
    return conn.execute("SELECT * FROM model_loads ORDER BY id").fetchall()


def test_twenty_concurrent_callers_cause_one_load_and_others_keep_serving(conn, db_url):
    sim = start_sim(load_overhead_seconds=1.5)
    try:
        rows = setup_cluster(conn, {"mac": sim})
        n = 20
        threads, results, errors = start_callers(db_url, "c", n)

        # While "c" loads (1.5 s), model "a" keeps answering.
        wait_for(lambda: sim.model_stats("c")["loading_instances"] == 1, timeout=10, message="load started")
        backend = make_backend("lmstudio", sim.url)
        try:
            served = 0
            while sim.model_stats("c")["loading_instances"] == 1 and served < 3:
                reply = backend.chat(ChatRequest(model="a", messages=[{"role": "user", "content": "hi"}]))
                assert reply.text
                served += 1
            assert served >= 1 and sim.model_stats("c")["loading_instances"] == 1, \
                "chat requests to a loaded model completed while the other model was loading"
        finally:
            backend.close()

        for t in threads:
            t.join(30)
        assert errors == []
        assert len(results) == n
        assert sim.model_stats("c")["load_requests"] == 1 and sim.model_stats("c")["loads"] == 1
        assert sum(r.loaded_now for r in results) == 1
        assert {r.server for r in results} == {"mac"}
        sid = rows["mac"]["id"]
        assert states(conn, sid)["c"] == "loaded"
        [load] = [x for x in loads(conn) if x["model"] == "c"]
        assert (load["action"], load["ok"], load["finished_at"] is not None) == ("load", True, True)
        # It got slots: 128 − 8 − 45 − 12 = 63 GB → 21 buffers; Σ parallel 8 → a 2, b 2, c 4.
        counts = {r["model"]: r["free"] for r in state.slot_counts(conn, sid)}
        assert counts == {"a": 2, "b": 2, "c": 4}
    finally:
        sim.stop()


def test_already_loaded_is_a_no_op(conn, db_url):
    sim = start_sim()
    try:
        setup_cluster(conn, {"mac": sim})
        res = loader.ensure_loaded(db_url, "a")
        assert (res.loaded_now, res.server) == (False, "mac")
        assert sim.model_stats("a")["load_requests"] == 0
    finally:
        sim.stop()


def test_prefers_the_server_with_most_free_memory(conn, db_url):
    small, large = start_sim(), start_sim(preloaded=["a"])
    try:
        rows = setup_cluster(conn, {"small": small, "large": large})
        res = loader.ensure_loaded(db_url, "c")
        assert res.server == "large" and res.loaded_now
        assert states(conn, rows["large"]["id"]) == {"a": "loaded", "c": "loaded"}
        assert small.model_stats("c")["load_requests"] == 0
    finally:
        small.stop()
        large.stop()


def test_evicts_idle_lru_never_busy_and_respects_residency(conn, db_url):
    # 64 GB: 64 − 8 − 30 − 5.6 = 20.4 GB left; "big" (25 GB) needs an eviction.
    sim = start_sim(memory_bytes=64 * GB)
    try:
        rows = setup_cluster(conn, {"mac": sim}, memory_gb=64)
        sid = rows["mac"]["id"]
        # "b" is busy: a claimed job holds one of its slots.
        [jid] = jobs.enqueue_many(conn, [jobs.NewJob("chat", "1", "e", "b", 50)])
        claim = jobs.claim(conn, "w", lease_seconds=60)
        assert claim.job_id == jid and claim.server_id == sid

        # Both were loaded just now: minimum residency protects them.
        with pytest.raises(loader.NoRoom, match="not enough memory"):
            loader.ensure_loaded(db_url, "big", size_bytes=25 * GB)
        assert sim.model_stats("big")["load_requests"] == 0

        conn.execute("UPDATE model_instances SET loaded_at = now() - interval '1 hour'")
        res = loader.ensure_loaded(db_url, "big", size_bytes=25 * GB)
        assert res.loaded_now and res.evicted == ("a",)        # the idle one, not busy "b"
        assert states(conn, sid) == {"b": "loaded", "big": "loaded"}
        assert not sim.engine.is_loaded("a") and sim.engine.is_loaded("big")
        actions = [(x["model"], x["action"], x["ok"]) for x in loads(conn)]
        assert actions == [("a", "unload", True), ("big", "load", True)]

        # Accounted memory with the resulting slot rows stays within the budget.
        inst = [Instance(r["model"], r["size_bytes"], r["parallel"], r["state"])
                for r in state.instances(conn, sid)]
        rows_now = sum(r["free"] + r["held"] + r["retired_held"]
                       for r in state.slot_counts(conn, sid))
        budget = Budget.from_row(state.server_by_id(conn, sid))
        assert rows_now >= 1 and fits(budget, inst, rows_now)
        assert sim.stats()["memory"]["refusals"] == 0
        jobs.complete(conn, claim.job_id, claim.token)
    finally:
        sim.stop()


def test_failed_load_leaves_no_instance_and_is_recorded(conn, db_url):
    sim = start_sim()
    try:
        rows = setup_cluster(conn, {"mac": sim})
        # A name the server does not offer is refused for that server before any load is sent, and the
        # refusal is remembered (not retried at every pass).
        with pytest.raises(loader.LoadError, match="offers no model named 'not-in-catalog'"):
            loader.ensure_loaded(db_url, "not-in-catalog", size_bytes=GB)
        assert "not-in-catalog" not in states(conn, rows["mac"]["id"])
        assert loads(conn) == [] and sim.stats()["models"].get("not-in-catalog") is None
        [refusal] = conn.execute("SELECT * FROM aibot.model_health").fetchall()
        assert refusal["model"] == "not-in-catalog" and "it offers: a, a@f16" in refusal["unavailable_reason"]
        with pytest.raises(loader.LoadError, match="refused: server mac: the server offers no model"):
            loader.ensure_loaded(db_url, "not-in-catalog", size_bytes=GB)
    finally:
        sim.stop()


def test_stale_loading_row_of_a_dead_loader_is_taken_over(conn, db_url, monkeypatch):
    # The dead loader's load never reaches the server; after the (shortened) grace the row is taken over.
    monkeypatch.setenv("AIBOT_ORPHAN_LOAD_GRACE_SECONDS", "0.3")
    reset_settings()
    sim = start_sim()
    try:
        rows = setup_cluster(conn, {"mac": sim})
        sid = rows["mac"]["id"]
        conn.execute("INSERT INTO model_instances (server_id, model, state, size_bytes) VALUES (%s, 'c', 'loading', %s)",
                     (sid, 15 * GB))
        conn.execute("INSERT INTO model_loads (server_id, model, action) VALUES (%s, 'c', 'load')", (sid,))
        res = loader.ensure_loaded(db_url, "c", wait_s=5)
        assert res.loaded_now and states(conn, sid)["c"] == "loaded"
        assert [(x["ok"], x["error"]) for x in loads(conn)][0] == (False, "abandoned: the loader went away")
    finally:
        sim.stop()


def test_the_reaper_settles_an_orphan_nobody_asks_for_again(conn, db_url, monkeypatch):
    """A 'loading' row whose loader died counts as the model on its way, so the demand pass sends its
    work nowhere else: the rebalance tick's reaper must clean it up past the grace (and not before),
    without any loader asking for that pair again."""
    monkeypatch.setenv("AIBOT_ORPHAN_LOAD_GRACE_SECONDS", "0.5")
    reset_settings()
    sim = start_sim()
    try:
        rows = setup_cluster(conn, {"mac": sim})
        sid = rows["mac"]["id"]
        conn.execute("INSERT INTO model_instances (server_id, model, state, size_bytes, loaded_at) "
                     "VALUES (%s, 'c', 'loading', %s, now())", (sid, 15 * GB))
        conn.execute("INSERT INTO model_loads (server_id, model, action) VALUES (%s, 'c', 'load')", (sid,))
        database = db.Database(db_url)
        try:
            assert loader.reap_orphan_loads(database) == 0, "younger than the grace: its load may still run"
            assert states(conn, sid)["c"] == "loading"
            conn.execute("UPDATE model_instances SET loaded_at = now() - interval '1 second' WHERE model = 'c'")
            assert loader.reap_orphan_loads(database) == 1
            assert "c" not in states(conn, sid)
            assert [(x["ok"], x["error"]) for x in loads(conn)][0] == (False, "abandoned: the loader went away")
            assert loader.reap_orphan_loads(database) == 0
        finally:
            database.close()
    finally:
        sim.stop()


def test_unload_refuses_busy_then_unloads(conn, db_url):
    sim = start_sim()
    try:
        rows = setup_cluster(conn, {"mac": sim})
        sid = rows["mac"]["id"]
        jobs.enqueue_many(conn, [jobs.NewJob("chat", "1", "e", "a", 50)])
        claim = jobs.claim(conn, "w", lease_seconds=60)
        with pytest.raises(loader.ModelBusy, match="1 request"):
            loader.unload(db_url, "mac", "a")
        assert sim.engine.is_loaded("a")
        jobs.complete(conn, claim.job_id, claim.token)

        events = []
        assert loader.unload(db_url, "mac", "a", progress=lambda e, **kw: events.append(e))
        assert events == ["unloading", "unloaded"]
        assert not sim.engine.is_loaded("a") and "a" not in states(conn, sid)
        assert {r["model"] for r in state.slot_counts(conn, sid)} == {"b"}
        assert loader.unload(db_url, "mac", "a") is False
    finally:
        sim.stop()


def test_named_server_and_unknown_server(conn, db_url):
    one, two = start_sim(), start_sim()
    try:
        setup_cluster(conn, {"one": one, "two": two})
        events = []
        res = loader.ensure_loaded(db_url, "c", server="two", progress=lambda e, **kw: events.append(e))
        assert res.server == "two" and events == ["loading", "loaded"]
        assert one.model_stats("c")["load_requests"] == 0
        with pytest.raises(loader.LoadError, match="unknown server 'nope'"):
            loader.ensure_loaded(db_url, "c", server="nope")
    finally:
        one.stop()
        two.stop()


def test_load_waits_for_an_unload_in_progress(conn, db_url):
    """A caller that finds the model 'unloading' waits for that operation's lock instead of racing it."""
    sim = start_sim()
    try:
        rows = setup_cluster(conn, {"mac": sim})
        sid = rows["mac"]["id"]
        with db.connect(db_url, autocommit=True) as holder:
            assert loader.try_lock_model(holder, sid, "a")
            conn.execute("UPDATE model_instances SET state = 'unloading' WHERE model = 'a'")
            done = threading.Event()
            out = {}

            def call():
                out["res"] = loader.ensure_loaded(db_url, "a", wait_s=10)
                done.set()

            t = threading.Thread(target=call)
            t.start()
            wait_for(lambda: conn.execute("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' "
                                          "AND NOT granted").fetchone()["n"] == 1, message="caller blocked on the lock")
            assert not done.is_set()
            conn.execute("UPDATE model_instances SET state = 'loaded' WHERE model = 'a'")
            loader.unlock_model(holder, sid, "a")
            t.join(10)
        assert out["res"].loaded_now is False and sim.model_stats("a")["load_requests"] == 0
    finally:
        sim.stop()


def test_models_cli_load_list_unload(conn, db_url, capsys):
    from aibot.cli import main

    sim = start_sim()
    try:
        setup_cluster(conn, {"mac": sim})
        assert main(["models", "load", "mac", "c"]) == 0
        out = capsys.readouterr().out
        assert "loading c on mac (~15.0GB) ..." in out and "loaded c on mac in" in out and "parallel 4" in out
        assert sim.engine.is_loaded("c")

        assert main(["models", "load", "any", "c"]) == 0
        assert "c is already loaded on mac" in capsys.readouterr().out

        assert main(["models", "list"]) == 0
        listing = [ln.split()[:3] for ln in capsys.readouterr().out.splitlines()[2:]]
        assert listing == [["mac", "a", "loaded"], ["mac", "b", "loaded"], ["mac", "c", "loaded"]]

        assert main(["models", "unload", "mac", "c"]) == 0
        assert "unloaded c from mac" in capsys.readouterr().out
        assert not sim.engine.is_loaded("c")

        assert main(["models", "load", "mac", "nope-model", "--size-gb", "1"]) == 2
        assert "the server offers no model named 'nope-model'; it offers: a, a@f16" in capsys.readouterr().err
    finally:
        sim.stop()


def test_scheduler_loads_models_that_queued_work_needs(conn, database):
    sim = start_sim()
    try:
        rows = setup_cluster(conn, {"mac": sim})
        jobs.enqueue_many(conn, [jobs.NewJob("chat", "1", "e", "c", 50), jobs.NewJob("chat", "2", "e", "a", 50)])
        assert jobs.claim(conn, "w", lease_seconds=60).model == "a"     # "c" has no slot anywhere yet
        assert jobs.claim(conn, "w", lease_seconds=60) is None
        summary = scheduled.describe_demand(loader.rebalance_and_load(database))
        assert "loaded c@mac" in summary
        assert sim.model_stats("c")["loads"] == 1
        got = jobs.claim(conn, "w", lease_seconds=60)
        assert (got.model, got.server_id) == ("c", rows["mac"]["id"])
        # Nothing left to load: a second run changes nothing.
        assert scheduled.describe_demand(loader.rebalance_and_load(database)) is None
        assert sim.model_stats("c")["load_requests"] == 1
    finally:
        sim.stop()


def test_refresh_all_picks_up_models_loaded_behind_our_back(conn, database):
    sim = start_sim()
    try:
        rows = setup_cluster(conn, {"mac": sim})
        sim.load("c")
        summary = scheduled.describe_refresh(refresh.refresh_all(database, sync=False))
        assert "mac +1 -0" in summary and "slot pair(s) resized" in summary
        assert states(conn, rows["mac"]["id"])["c"] == "loaded"
        assert scheduled.describe_refresh(refresh.refresh_all(database, sync=False)) is None
    finally:
        sim.stop()


def test_concurrent_loads_of_different_models_never_overcommit_a_server(conn, db_url):
    # 64 GB with "a" (15 GB) resident and protected by residency: "c" (15) or "big" (25) fits, not both.
    sim = start_sim(preloaded=["a"], load_overhead_seconds=0.5)
    try:
        rows = setup_cluster(conn, {"mac": sim}, memory_gb=64)
        sid = rows["mac"]["id"]
        barrier = threading.Barrier(2)
        outcomes = {}

        def call(model, size):
            barrier.wait()
            try:
                outcomes[model] = loader.ensure_loaded(db_url, model, size_bytes=size)
            except loader.NoRoom as exc:
                outcomes[model] = exc

        threads = [threading.Thread(target=call, args=m) for m in (("c", 15 * GB), ("big", 25 * GB))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        loaded = [m for m, o in outcomes.items() if isinstance(o, loader.LoadResult)]
        refused = [m for m, o in outcomes.items() if isinstance(o, loader.NoRoom)]
        assert len(loaded) == 1 and len(refused) == 1
        assert sim.model_stats(refused[0])["load_requests"] == 0
        inst = [Instance(r["model"], r["size_bytes"], r["parallel"], r["state"])
                for r in state.instances(conn, sid)]
        assert sorted(i.model for i in inst) == sorted(["a", loaded[0]])
        slot_rows = sum(r["free"] + r["held"] for r in state.slot_counts(conn, sid))
        budget = Budget.from_row(state.server_by_id(conn, sid))
        assert fits(budget, inst, slot_rows)
    finally:
        sim.stop()


def test_waiting_for_a_stuck_loader_times_out(conn, db_url):
    sim = start_sim()
    try:
        rows = setup_cluster(conn, {"mac": sim})
        sid = rows["mac"]["id"]
        with db.connect(db_url, autocommit=True) as holder:
            assert loader.try_lock_model(holder, sid, "c")
            conn.execute("INSERT INTO model_instances (server_id, model, state, size_bytes) VALUES (%s, 'c', 'loading', 1)",
                         (sid,))
            with pytest.raises(loader.LoadTimeout, match="'c'"):
                loader.ensure_loaded(db_url, "c", wait_s=0.3)
        assert sim.model_stats("c")["load_requests"] == 0
    finally:
        sim.stop()


def test_concurrent_callers_with_two_equal_servers_load_one_replica(conn, db_url):
    """The (server, model) lock alone would let two callers pick two different servers."""
    sims = {"mac1": start_sim(load_overhead_seconds=0.3), "mac2": start_sim(load_overhead_seconds=0.3)}
    try:
        setup_cluster(conn, sims)
        threads, results, errors = start_callers(db_url, "c", 12)
        for t in threads:
            t.join(30)
        assert errors == []
        assert sum(s.model_stats("c")["load_requests"] for s in sims.values()) == 1
        assert len({r.server for r in results}) == 1
    finally:
        for s in sims.values():
            s.stop()


def test_slots_shrink_in_the_same_transaction_that_reserves_a_loading_models_memory(conn, db_url):
    """Accounted memory counts every slot's buffer: free slots the new model's memory no longer covers
    must be gone before any claim can take them, not at the next rebalance tick."""
    sim = start_sim(preloaded=["c"], load_overhead_seconds=1.0)
    try:
        rows = register_sims(conn, {"mac": sim}, memory_gb=48)
        sid = rows["mac"]["id"]

        def slot_rows():
            return conn.execute("SELECT count(*) AS n FROM aibot.slots WHERE server_id = %s AND NOT retired",
                                (sid,)).fetchone()["n"]

        # 48 GB − 8 reserve − 15 model − 4 safety = 21 GB = 7 buffers; c's parallel 4 allows 4.
        assert slot_rows() == 4
        t = threading.Thread(target=loader.ensure_loaded, args=(db_url, "a"), kwargs={"worker_id": "w"})
        t.start()
        wait_for(lambda: sim.model_stats("a")["loading_instances"] == 1, timeout=10, message="load started")
        # During the load: 48 − 8 − 30 − 4 = 6 GB = 2 buffers.
        assert slot_rows() <= 2
        t.join(20)
        assert slot_rows() == 2
    finally:
        sim.stop()
