"""Cluster state in Postgres: servers from config, refresh from a simulator, slot rows = sizing result."""

from __future__ import annotations

import pytest

from aibot import db
from aibot.backends import make_backend
from aibot.cluster import loader, refresh, sizing, slots, state
from aibot.cluster import plan as plans
from aibot.cluster.sizing import GB
from aibot.config import ServerConfig
from aibot.queue import jobs
from aibot.sim import SimServer
from aibot.sim.catalog import ModelSpec
from aibot.sim.config import SimConfig

pytestmark = pytest.mark.timeout(120)


def cfg(name: str, url: str = "http://10.0.0.102:1234", **kw) -> ServerConfig:
    data = {"name": name, "url": url, **kw}
    return ServerConfig.model_validate(data)


def server_row(conn, name: str) -> dict:
    return state.server_by_name(conn, name)


def add_instance(conn, server_id: int, model: str, size_gb: float, parallel: int = 1, state: str = "loaded"):
    conn.execute("INSERT INTO model_instances (server_id, model, state, size_bytes, parallel) VALUES (%s,%s,%s,%s,%s)",
                 (server_id, model, state, int(size_gb * GB), parallel))


def slot_counts(conn, server_id: int | None = None) -> dict[tuple[str, str], dict]:
    rows = state.slot_counts(conn, server_id)
    names = {r["id"]: r["name"] for r in state.servers(conn)}
    return {(names[r["server_id"]], r["model"]): r for r in rows}


def active(conn) -> dict[tuple[str, str], int]:
    return {k: v["free"] + v["held"] for k, v in slot_counts(conn).items() if v["free"] + v["held"]}


# --- sync -------------------------------------------------------------------------------------------

def test_sync_upserts_by_name_and_disables_missing(conn):
    res = refresh.sync_servers(conn, [cfg("a", capabilities={"maxMemory": 128}), cfg("b", url="http://10.0.0.100:1234")])
    assert sorted(res.added) == ["a", "b"] and res.disabled == []
    a = server_row(conn, "a")
    assert (a["memory_bytes"], a["memory_source"], a["configured_memory_bytes"]) == (128 * GB, "config", 128 * GB)
    assert (a["system_reserve_bytes"], a["safety_fraction"], a["per_request_bytes"], a["hard_cap"]) == \
        (8 * GB, 0.10, 3 * GB, 12)
    assert server_row(conn, "b")["memory_bytes"] is None   # remote, unknown RAM: no psutil guess

    res = refresh.sync_servers(conn, [cfg("a", capabilities={"maxMemory": 64}, hardCap=4)])
    assert res.updated == ["a"] and res.disabled == ["b"]
    a2 = server_row(conn, "a")
    assert a2["id"] == a["id"] and a2["memory_bytes"] == 64 * GB and a2["hard_cap"] == 4
    assert server_row(conn, "b")["enabled"] is False


def test_sync_uses_psutil_for_a_local_server_without_memory(conn):
    import psutil

    refresh.sync_servers(conn, [cfg("local", url="http://127.0.0.1:1234")])
    row = server_row(conn, "local")
    assert (row["memory_bytes"], row["memory_source"]) == (psutil.virtual_memory().total, "host")


def test_sync_rejects_duplicate_names(conn):
    with pytest.raises(ValueError, match="'a' appears twice"):
        refresh.sync_servers(conn, [cfg("a"), cfg("a")])


def test_memory_source_priority():
    assert sizing.choose_memory(100, 50, 10) == (100, "server")
    assert sizing.choose_memory(None, 50, 10) == (50, "config")
    assert sizing.choose_memory(None, None, 10) == (10, "host")
    assert sizing.choose_memory(None, None, None) == (None, None)


# --- rebalance -------------------------------------------------------------------------------------

def test_rebalance_makes_rows_equal_the_seed_formula(conn):
    refresh.sync_servers(conn, [cfg("mac", capabilities={"maxMemory": 128})])
    sid = server_row(conn, "mac")["id"]
    for i in range(6):
        add_instance(conn, sid, f"m{i}", 15, parallel=4)
    deltas = slots.rebalance(conn)
    # Σ parallel 24, memory bound (128 − 8 − 90 − 12)/3 = 6, cap 12 → 6 slots, one per model.
    assert active(conn) == {("mac", f"m{i}"): 1 for i in range(6)}
    assert len(deltas) == 6 and all(d.change.add == 1 for d in deltas)
    assert slots.rebalance(conn) == []    # idempotent


def test_rebalance_split_follows_demand(conn):
    refresh.sync_servers(conn, [cfg("s", capabilities={"maxMemory": 64})])
    sid = server_row(conn, "s")["id"]
    add_instance(conn, sid, "a", 15, parallel=4)
    add_instance(conn, sid, "b", 15, parallel=4)
    # 64 − 8 − 30 − 5.6 = 20.4 GB → 6 buffers; 8 parallel → 6 slots.
    slots.rebalance(conn, {"b": 10})
    assert active(conn) == {("s", "a"): 2, ("s", "b"): 4}
    slots.rebalance(conn, {"a": 10})
    assert active(conn) == {("s", "a"): 4, ("s", "b"): 2}


def test_shrinking_retires_held_rows_and_release_deletes_them(conn):
    refresh.sync_servers(conn, [cfg("s", capabilities={"maxMemory": 128})])
    sid = server_row(conn, "s")["id"]
    add_instance(conn, sid, "m", 15, parallel=4)
    slots.rebalance(conn, {})
    assert active(conn) == {("s", "m"): 4}
    ids = jobs.enqueue_many(conn, [jobs.NewJob("chat", str(i), "e", "m", 50) for i in range(3)])
    claims = [jobs.claim(conn, "w", lease_seconds=60) for _ in ids]
    assert all(c is not None and c.server_id == sid for c in claims)

    # A 90 GB model arrives: 128 − 8 − 105 − 12 = 3 GB → one request buffer for the whole server.
    add_instance(conn, sid, "big", 90, parallel=1)
    slots.rebalance(conn, {})
    counts = slot_counts(conn)
    # The one slot goes to "big" (name order, no demand); m's free row goes, its 3 held rows retire.
    assert (counts[("s", "m")]["free"], counts[("s", "m")]["held"], counts[("s", "m")]["retired_held"]) == (0, 0, 3)
    # ... and big gets no row yet: 3 requests are still in flight, more would overcommit memory.
    assert ("s", "big") not in counts or counts[("s", "big")]["free"] == 0
    assert jobs.claim(conn, "w", lease_seconds=60) is None

    # Releasing the jobs deletes retired rows instead of freeing them; then big gets its slot.
    for c in claims:
        jobs.complete(conn, c.job_id, c.token)
    assert sum(v["retired_held"] + v["retired_free"] for v in slot_counts(conn).values()) == 0
    slots.rebalance(conn, {})
    assert active(conn) == {("s", "big"): 1}
    budget = sizing.Budget.from_row(server_row(conn, "s"))
    inst = [sizing.Instance("m", 15 * GB, 4), sizing.Instance("big", 90 * GB, 1)]
    assert sizing.fits(budget, inst, 1) and not sizing.fits(budget, inst, 2)


def test_capacity_growth_unretires_before_adding(conn):
    refresh.sync_servers(conn, [cfg("s", capabilities={"maxMemory": 128})])
    sid = server_row(conn, "s")["id"]
    add_instance(conn, sid, "m", 15, parallel=2)
    slots.rebalance(conn, {})
    ids = jobs.enqueue_many(conn, [jobs.NewJob("chat", str(i), "e", "m", 50) for i in range(2)])
    for _ in ids:
        assert jobs.claim(conn, "w", lease_seconds=60) is not None
    conn.execute("UPDATE model_instances SET parallel = 1 WHERE model = 'm'")
    slots.rebalance(conn, {})
    assert slot_counts(conn)[("s", "m")]["retired_held"] == 1
    conn.execute("UPDATE model_instances SET parallel = 3 WHERE model = 'm'")
    [d] = slots.rebalance(conn, {})
    assert (d.change.unretire, d.change.add) == (1, 1)
    c = slot_counts(conn)[("s", "m")]
    assert (c["held"], c["free"], c["retired_held"]) == (2, 1, 0)


def test_disabled_server_and_vanished_model_lose_free_slots(conn):
    refresh.sync_servers(conn, [cfg("a", capabilities={"maxMemory": 128}), cfg("b", capabilities={"maxMemory": 128})])
    a, b = server_row(conn, "a")["id"], server_row(conn, "b")["id"]
    add_instance(conn, a, "m", 15, parallel=2)
    add_instance(conn, b, "m", 15, parallel=2)
    slots.rebalance(conn, {})
    assert active(conn) == {("a", "m"): 2, ("b", "m"): 2}
    refresh.sync_servers(conn, [cfg("a", capabilities={"maxMemory": 128})])      # b left the config
    conn.execute("DELETE FROM model_instances WHERE server_id = %s", (a,))     # m vanished from a
    slots.rebalance(conn, {})
    assert active(conn) == {}


def test_plan_reports_servers_and_worker_command(conn):
    refresh.sync_servers(conn, [cfg("mac1", capabilities={"maxMemory": 128}),
                                cfg("mac2", url="http://10.0.0.100:1234", capabilities={"maxMemory": 128})])
    for name in ("mac1", "mac2"):
        sid = server_row(conn, name)["id"]
        conn.execute("UPDATE servers SET health = 'healthy' WHERE id = %s", (sid,))
        for i in range(6):
            add_instance(conn, sid, f"m{i}", 15, parallel=4)
    slots.rebalance(conn, {})
    conn.execute("INSERT INTO workers (worker_id, host, pid) VALUES ('h1:1:x', 'h1', 1), ('h1:2:y', 'h1', 2)")
    p = plans.plan(conn)
    assert p.total_slots == 12
    s1 = p.servers[0]
    assert (s1.name, s1.sizing.slots, s1.sizing.parallel_total, s1.sizing.memory_bound) == ("mac1", 6, 24, 6)
    assert sum(m.rows for m in s1.models) == 6 and all(m.target == 1 for m in s1.models)
    [h] = p.hosts
    assert (h.host, h.processes, h.threads) == ("h1", 2, 6)
    assert h.command == "dramatiq aibot.actors --processes 2 --threads 6"
    assert h.processes * h.threads >= p.total_slots


def test_worker_command_covers_all_slots():
    for total in range(0, 40):
        for procs in (1, 2, 3, 8):
            p, t, cmd = sizing.worker_command(total, procs)
            assert p * t >= total and t >= 1 and cmd.endswith(f"--threads {t}")
    with pytest.raises(sizing.SizingError, match="processes"):
        sizing.worker_command(4, 0)


# --- refresh against the simulator ------------------------------------------------------------------

MODELS = [ModelSpec("a", 15 * GB, parallel=4), ModelSpec("b", 15 * GB, parallel=2), ModelSpec("c", 8 * GB)]


@pytest.fixture
def sim():
    s = SimServer(SimConfig(api="lmstudio", models=MODELS, preloaded=["a", "b"], speed=0.001)).start()
    yield s
    s.stop()


def test_refresh_writes_loaded_models_and_removes_vanished(conn, sim):
    refresh.sync_servers(conn, [cfg("sim", url=sim.url, capabilities={"maxMemory": 64})])
    row = server_row(conn, "sim")
    backend = make_backend("lmstudio", sim.url)
    try:
        res = refresh.refresh_server(conn, row, backend)
        assert res.ok and res.models == ["a", "b"] and sorted(res.added) == ["a", "b"]
        inst = {r["model"]: r for r in state.instances(conn, row["id"])}
        assert {m: (r["state"], r["size_bytes"], r["parallel"]) for m, r in inst.items()} == \
            {"a": ("loaded", 15 * GB, 4), "b": ("loaded", 15 * GB, 2)}
        assert state.catalog_size(conn, "a")["size_bytes"] == 15 * GB
        slots.rebalance(conn, {})
        assert active(conn) == {("sim", "a"): 4, ("sim", "b"): 2}

        sim.unload("b")
        # A live loader's 'loading' row survives a refresh that does not list it yet.
        add_instance(conn, row["id"], "c", 8, state="loading")
        with db.connect(conn.info.dsn, autocommit=True) as holder:
            assert loader.try_lock_model(holder, row["id"], "c")
            res = refresh.refresh_server(conn, row, backend)
            assert res.removed == ["b"]
            states = {r["model"]: r["state"] for r in state.instances(conn, row["id"])}
            assert states == {"a": "loaded", "c": "loading"}
        # The loader went away without finishing. Its HTTP load may still finish at the server (which
        # lists a model only once loaded), so the refresh keeps the row: the orphan reaper settles it
        # (tests/cluster/test_loader.py), and a loader asking next adopts the instance rather than
        # loading a second one beside it.
        res = refresh.refresh_server(conn, row, backend)
        assert res.removed == []
        assert {r["model"]: r["state"] for r in state.instances(conn, row["id"])}["c"] == "loading"
        conn.execute("DELETE FROM aibot.model_instances WHERE server_id = %s AND model = 'c'", (row["id"],))
        slots.rebalance(conn, {})
        assert active(conn) == {("sim", "a"): 4}
        assert server_row(conn, "sim")["refreshed_at"] is not None
    finally:
        backend.close()


def test_refresh_failure_records_a_server_fault(conn, sim):
    refresh.sync_servers(conn, [cfg("sim", url=sim.url, capabilities={"maxMemory": 64})])
    row = server_row(conn, "sim")
    backend = make_backend("lmstudio", sim.url)
    sim.begin_outage(mode="503")
    try:
        res = refresh.refresh_server(conn, row, backend)
        assert not res.ok and "refresh" in res.error
        assert server_row(conn, "sim")["failure_count"] == 1
    finally:
        sim.end_outage()
        backend.close()


# --- `aibot plan` ----------------------------------------------------------------------------------------

def test_plan_cli_syncs_refreshes_and_prints(conn, sim, tmp_path, capsys):
    import json

    from aibot.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"entities": [], "lmStudioServers": [
        {"name": "mac", "url": sim.url, "capabilities": {"maxMemory": 64}}]}))
    assert main(["plan", "--config", str(path), "--processes", "2"]) == 0
    out = capsys.readouterr().out
    # 64 − 8 − 30 − 5.6 = 20.4 GB → 6 buffers; Σ parallel 4 + 2 = 6 → 6 slots.
    [line] = [ln.split() for ln in out.splitlines() if ln.startswith("  mac ")]
    # server kind state RAM from models Σparallel bound cap slots limited-by rows in-flight
    assert line == ["mac", "lmstudio", "unknown", "64.0GB", "config", "2", "6", "6", "12", "6", "parallel", "6", "0"]
    assert "mac: models 30GB + 6 × 3GB requests + system 8GB + safety 5.6GB = 61.6GB of 64GB" in out
    assert "dramatiq aibot.actors --processes 2 --threads 3" in out
    # The refresh wrote state and slot rows, which --no-refresh then shows as is.
    assert active(conn) == {("mac", "a"): 4, ("mac", "b"): 2}
    assert main(["plan", "--no-refresh"]) == 0
    assert "refreshed:" not in capsys.readouterr().out


def test_plan_cli_rejects_bad_processes(db_url, capsys):
    from aibot.cli import main

    assert main(["plan", "--no-refresh", "--processes", "0"]) == 2
    assert "--processes must be >= 1" in capsys.readouterr().err
