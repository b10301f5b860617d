"""`aibot plan` on a cold cluster: no server holds a model yet, so the plan places the configured models
the way the loader will and sizes the servers as if they held them (issue 15, finding 4)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from aibot.cluster import plan as plans
from aibot.cluster.placement import Resident, ServerView
from aibot.cluster.sizing import GB, Budget
from aibot.harness import entity, write_config
from aibot.sim import SimServer
from aibot.sim.catalog import ModelSpec
from aibot.sim.config import SimConfig

pytestmark = pytest.mark.timeout(120)

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def view(sid: int, name: str, ram_gb: int, *, parallel: int = 1, residents=(), can_load=True) -> ServerView:
    return ServerView(sid, name, Budget(ram_gb * GB), tuple(residents), can_load=can_load, default_parallel=parallel)


def test_place_cold_packs_largest_first_and_names_what_fits_nowhere():
    views = [view(1, "small", 48), view(2, "big", 128, parallel=4), view(3, "off", 512, can_load=False)]
    models = [("m7", 7 * GB, "config"), ("m30", 30 * GB, "config"), ("m90", 90 * GB, "server"),
              ("m200", 200 * GB, "config")]
    placed = {c.model: c for c in plans.place_cold(views, models, now=NOW)}
    # m200 first: no server has room (and the ineligible one is named as such).
    assert placed["m200"].server is None
    assert "not enough memory" in placed["m200"].reason and "not eligible" in placed["m200"].reason
    # m90 on big (128 − 8 − 12 = 108 GB free: 90 fits with buffers); m30 then fits only on small
    # (48 − 8 − 4 = 36 GB; big has 18 GB left); m7 no longer fits on small (6 GB left), so on big.
    assert (placed["m90"].server, placed["m30"].server, placed["m7"].server) == ("big", "small", "big")
    assert [v.residents for v in views] == [(), (), ()], "the views are not changed"


def test_place_cold_keeps_live_residents_and_never_evicts():
    busy = Resident("resident", 100 * GB, 1, "loaded", loaded_at=None)
    [only] = plans.place_cold([view(1, "s", 128, residents=[busy])], [("new", 20 * GB, "config")], now=NOW)
    assert only.server is None and only.reason.startswith("fits only by evicting resident")


MODELS = [ModelSpec("a", 15 * GB, parallel=4), ModelSpec("b", 15 * GB, parallel=2), ModelSpec("c", 8 * GB),
          ModelSpec("z", 60 * GB)]


@pytest.fixture
def cold_sim():
    s = SimServer(SimConfig(api="lmstudio", models=MODELS, speed=0.001)).start()
    yield s
    s.stop()


def test_plan_cli_on_a_cold_cluster_plans_from_the_configuration(conn, cold_sim, tmp_path, capsys):
    from aibot.cli import main

    path = write_config(tmp_path / "config.json",
                        servers=[{"name": "mac", "url": cold_sim.url, "capabilities": {"maxMemory": 64},
                                  "defaultParallel": 2}],
                        entities=[entity("ea", "a"), entity("eb", "b"), entity("ec", "c"), entity("ez", "z")],
                        models={"z": {"sizeGB": 50}})
    assert main(["plan", "--config", path, "--processes", "2"]) == 0
    out = capsys.readouterr().out
    assert "cold cluster: planned from configuration" in out
    # a, b, c (38 GB) fit: 64 − 8 − 5.6 − 38 = 12.4 GB → 4 buffers; Σ parallel 3 × 2 = 6 → 4 slots.
    assert "mac: models 38GB + 4 × 3GB requests + system 8GB + safety 5.6GB = 63.6GB of 64GB" in out
    assert "dramatiq aibot.actors --processes 2 --threads 2" in out
    assert "--threads 1" not in out
    [z] = [ln for ln in out.splitlines() if ln.strip().startswith("z ")]
    assert "(none)" in z and "not enough memory" in z, z
    p = plans.plan(conn, config_path=path)
    assert p.basis == "config" and p.total_slots == 4
    assert {c.model: c.server for c in p.cold} == {"a": "mac", "b": "mac", "c": "mac", "z": None}
    # The server's own report wins over the configuration's figure.
    assert {c.model: c.size_bytes for c in p.cold}["z"] == 60 * GB
    assert [m.state for m in p.servers[0].models] == ["planned"] * 3


def test_cold_sizes_come_from_the_plans_configuration(conn, tmp_path):
    """A model no server has reported is sized by the configuration `aibot plan --config` names."""
    from aibot.cluster import refresh

    path = write_config(tmp_path / "config.json",
                        servers=[{"name": "off", "url": "http://127.0.0.1:9", "capabilities": {"maxMemory": 64}}],
                        entities=[entity("ey", "y")], models={"y": {"sizeGB": 20}})
    from aibot.config import load_config

    refresh.sync_servers(conn, load_config(path).servers)
    p = plans.plan(conn, config_path=path)
    [y] = p.cold
    assert (p.basis, y.size_bytes, y.size_source, y.server) == ("config", 20 * GB, 'config models["y"].sizeGB', "off")
    # 64 − 8 − 5.6 − 20 = 30.4 GB → 10 buffers; one model at parallel 1 → 1 slot (the server is down:
    # it is planned as if up, and its state says it is not).
    assert p.total_slots == 1


def test_plan_of_a_warm_cluster_is_the_live_one(conn, cold_sim, tmp_path, capsys):
    from aibot.cli import main

    cold_sim.load("a")
    path = write_config(tmp_path / "config.json",
                        servers=[{"name": "mac", "url": cold_sim.url, "capabilities": {"maxMemory": 64}}],
                        entities=[entity("ea", "a"), entity("eb", "b")])
    assert main(["plan", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "cold cluster" not in out
    p = plans.plan(conn, config_path=path)
    assert p.basis == "live" and p.cold == () and p.total_slots == 4
