"""Single-flight model loading when the loader's lock connection dies mid-load.

Found by the chaos suite: a PostgreSQL restart or pg_terminate_backend ends the session that holds
the (server, model) advisory lock, but the loader's HTTP load goes on. The next caller gets the
lock, takes the 'loading' row for debris of a dead loader, and loads the model again: LM Studio adds
a second instance (`model:2`), doubling the memory and the parallel slots the cluster believes in.
The fix: the next loader watches the server for the orphaned load to finish before loading again.
"""

from __future__ import annotations

import threading

import pytest

from aibot.cluster import loader
from aibot.cluster import state as cluster_state
from aibot.cluster.sizing import GB
from aibot.sim import SimServer
from aibot.sim.catalog import ModelSpec
from aibot.sim.config import SimConfig
from tests.support.cluster_rows import register_sims
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


def _terminate_lock_holders(conn) -> int:
    rows = conn.execute(
        "SELECT pg_terminate_backend(l.pid) AS ok FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database() "
        "AND l.pid <> pg_backend_pid()").fetchall()
    return sum(1 for r in rows if r["ok"])


def test_losing_the_lock_connection_mid_load_does_not_load_twice(conn, db_url):
    sim = SimServer(SimConfig(api="lmstudio", models=[ModelSpec("m", 15 * GB, parallel=2)], speed=1.0,
                              seconds_per_gb=0.0, load_overhead_seconds=2.0, load_duplicates=True)).start()
    try:
        register_sims(conn, {"mac": sim})
        errors: list[Exception] = []

        def first() -> None:
            try:
                loader.ensure_loaded(db_url, "m", worker_id="first")
            except Exception as exc:  # noqa: BLE001 - its connection is killed on purpose
                errors.append(exc)

        t = threading.Thread(target=first)
        t.start()
        wait_for(lambda: sim.model_stats("m")["loading_instances"] == 1, timeout=10, message="first load started")
        assert _terminate_lock_holders(conn) >= 1
        loader.ensure_loaded(db_url, "m", worker_id="second")
        t.join(20)
        wait_for(lambda: sim.model_stats("m")["loading_instances"] == 0, timeout=10)
        assert sim.model_stats("m")["loaded_instances"] == 1, "the model was loaded twice"
    finally:
        sim.stop()


def test_a_finished_orphan_load_is_adopted_not_repeated(conn, db_url):
    """The case the LM Studio backend fix covers: the orphaned load finished before anyone retried."""
    sim = SimServer(SimConfig(api="lmstudio", models=[ModelSpec("m", 15 * GB, parallel=2)], speed=1.0,
                              seconds_per_gb=0.0, load_overhead_seconds=0.5, load_duplicates=True)).start()
    try:
        register_sims(conn, {"mac": sim})
        # A loader died after reserving the row; the server went on to load the model.
        conn.execute("INSERT INTO model_instances (server_id, model, state, size_bytes, parallel) "
                     "SELECT id, 'm', 'loading', %s, 1 FROM servers WHERE name = 'mac'", (15 * GB,))
        sim.load("m", instant=True)
        res = loader.ensure_loaded(db_url, "m", worker_id="next")
        assert sim.model_stats("m")["loaded_instances"] == 1, "the finished orphan load was repeated"
        assert res.server == "mac"
        [state] = cluster_state.residency(conn, "m")
        assert state["state"] == "loaded", state
    finally:
        sim.stop()
