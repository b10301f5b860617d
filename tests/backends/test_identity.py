"""Configured names meet the servers' names: refresh, loader and claim agree on a model whatever the
server calls it, and a name a server will never serve is refused once, with the names it does offer.

Against simulators that name models as the real servers do (LM Studio's key + variants and instance
ids, Ollama's renamed `<base>-<quant>:latest`); see docs/backends.md "Model identity".
"""

from __future__ import annotations

import pytest

from aibot.backends.factory import backend_for_server
from aibot.cluster import loader, state
from aibot.cluster import refresh as refreshes
from aibot.queue import jobs
from aibot.sim import SimServer
from aibot.sim.catalog import GB, ModelSpec
from aibot.sim.config import SimConfig
from tests.support.cluster_rows import register_sims

pytestmark = pytest.mark.timeout(120)

FAST = dict(speed=1.0, seconds_per_gb=0.0, load_overhead_seconds=0.05, ttft_seconds=0.005, per_token_seconds=0.001,
            reply_tokens=5)


def sim(api: str, models, **kw) -> SimServer:
    return SimServer(SimConfig(api=api, models=models, **{**FAST, **kw})).start()


def instances(conn) -> dict[str, tuple]:
    return {r["model"]: (r["state"], r["instance_id"], r["instances"], r["origin"])
            for r in conn.execute("SELECT * FROM aibot.model_instances ORDER BY model")}


def refresh(database, wanted=()):
    with database.transaction() as conn:
        rows = state.servers(conn)
    out = []
    for r in rows:
        backend = backend_for_server(r)
        try:
            with database.transaction() as conn:
                out.append(refreshes.refresh_server(conn, r, backend, wanted))
        finally:
            backend.close()
    return out


def test_lm_studio_variant_name_loads_by_key_once_and_survives_refreshes(conn, database, db_url):
    s = sim("lmstudio", [ModelSpec("the-eternal@f16", 2 * GB), ModelSpec("the-eternal@q8_0", GB)])
    try:
        register_sims(conn, {"studio": s})
        res = loader.ensure_loaded(db_url, "the-eternal@f16")
        assert res.loaded_now
        assert instances(conn) == {"the-eternal@f16": ("loaded", "the-eternal", 1, "aibot")}
        for _ in range(3):   # the refresh finds it under the configured name: nothing forgotten, nothing added
            [r] = refresh(database, {"the-eternal@f16"})
            assert (r.added, r.removed) == ([], [])
        assert instances(conn) == {"the-eternal@f16": ("loaded", "the-eternal", 1, "aibot")}
        assert not loader.ensure_loaded(db_url, "the-eternal@f16").loaded_now
        listed = s.engine.instances()
        assert [i.id for i in listed] == ["the-eternal"]          # never a second instance `the-eternal:2`
        assert s.stats()["requests"]["by_endpoint"].get("POST /api/v1/models/load") == 1
        # The claim hands the worker the server's instance name and its per-request context.
        jobs.enqueue_many(conn, [jobs.NewJob("chat", "1", "e", "the-eternal@f16", 50)])
        claim = jobs.claim(conn, "w", lease_seconds=30)
        assert (claim.model, claim.instance, claim.context_length) == ("the-eternal@f16", "the-eternal", 4096)
    finally:
        s.stop()


def test_a_variant_lm_studio_cannot_load_is_refused_once_and_the_waiting_jobs_say_why(conn, database, db_url):
    s = sim("lmstudio", [ModelSpec("the-eternal@f16", 2 * GB), ModelSpec("the-eternal@q8_0", GB)])
    try:
        register_sims(conn, {"studio": s})
        jobs.enqueue_many(conn, [jobs.NewJob("chat", str(i), "e", "the-eternal@q8_0", 50) for i in range(3)])
        for _ in range(3):   # three demand passes: one refusal, no load request ever reaches the server
            loaded, failed = loader.load_for_demand(database, worker_id="t")
            assert loaded == [] and len(failed) == 1
        assert s.stats()["requests"]["by_endpoint"].get("POST /api/v1/models/load") is None
        [refusal] = conn.execute("SELECT * FROM aibot.model_health").fetchall()
        assert "cannot pick variant 'the-eternal@q8_0'" in refusal["unavailable_reason"]
        notes = {r["waiting_reason"] for r in conn.execute("SELECT waiting_reason FROM aibot.jobs")}
        assert len(notes) == 1 and "cannot pick variant" in notes.pop()
        assert {r["attempts"] for r in conn.execute("SELECT attempts FROM aibot.jobs")} == {0}

        # The operator selects that variant in LM Studio: the model list changes, the refusal is retried.
        s.stop()
        s2 = sim("lmstudio", [ModelSpec("the-eternal@q8_0", GB), ModelSpec("the-eternal@f16", 2 * GB)],
                 port=int(s.url.rsplit(":", 1)[1]))
        try:
            refresh(database, {"the-eternal@q8_0"})
            assert conn.execute("SELECT unavailable_reason FROM aibot.model_health").fetchone()["unavailable_reason"] is None
            loaded, failed = loader.load_for_demand(database, worker_id="t")
            assert loaded == ["the-eternal@q8_0@studio"] and failed == []
        finally:
            s2.stop()
    finally:
        s.stop()


def test_an_unknown_name_is_refused_by_the_refresh_with_the_names_the_server_offers(conn, database):
    s = sim("lmstudio", [ModelSpec("a@f16", GB), ModelSpec("b@f16", GB)])
    try:
        register_sims(conn, {"studio": s})
        [r] = refresh(database, {"nope@f16", "a@f16"})
        assert r.refused == ["nope@f16"]
        reason = conn.execute("SELECT unavailable_reason FROM aibot.model_health WHERE model = 'nope@f16'").fetchone()
        assert "offers no model named 'nope@f16'; it offers: a, a@f16, b, b@f16" in reason["unavailable_reason"]
    finally:
        s.stop()


def test_ollama_tags_never_make_the_refresh_forget_a_model(conn, database, db_url):
    # Jobs of an Ollama cluster name `<base>-<quant>`; Ollama lists `<base>-<quant>:latest`.
    s = sim("ollama", [ModelSpec("x@f16", GB), ModelSpec("y@f16", GB)])
    try:
        register_sims(conn, {"ollama": s})
        assert loader.ensure_loaded(db_url, "x-f16").loaded_now
        for _ in range(3):
            [r] = refresh(database, {"x-f16", "y-f16"})
            assert (r.added, r.removed) == ([], [])
        assert instances(conn) == {"x-f16": ("loaded", "x-f16:latest", 1, "aibot")}
        assert not loader.ensure_loaded(db_url, "x-f16").loaded_now
        assert s.model_stats("x@f16")["loads"] == 1
    finally:
        s.stop()


def test_a_model_loaded_by_someone_else_is_adopted_not_loaded_again(conn, database, db_url):
    s = sim("lmstudio", [ModelSpec("m@f16", GB)])
    try:
        register_sims(conn, {"studio": s})
        s.engine.load("m@f16")                      # `lms load m` by an operator, behind aibot's back
        res = loader.ensure_loaded(db_url, "m@f16")
        assert not res.loaded_now
        assert instances(conn) == {"m@f16": ("loaded", "m", 1, "server")}
        assert [i.id for i in s.engine.instances()] == ["m"]
        assert conn.execute("SELECT count(*) AS n FROM aibot.model_loads").fetchone()["n"] == 0
    finally:
        s.stop()


def test_an_openai_server_listing_no_sizes_counts_the_configured_size(conn, tmp_path, monkeypatch):
    # A plain OpenAI-compatible listing gives no size: the model's memory comes from models[].sizeGB.
    import json

    from aibot.settings import reset_settings

    s = sim("openai", [ModelSpec("vllm-model", 3 * GB)], preloaded=["vllm-model"])
    try:
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"lmStudioServers": [{"name": "v", "url": s.url, "kind": "openai"}],
                                    "models": {"vllm-model": {"sizeGB": 3}},
                                    "entities": [{"id": "e", "model": "vllm-model", "systemPrompt": "x",
                                                  "username": "E", "color": "080175220"}]}))
        monkeypatch.setenv("AIBOT_CONFIG", str(path))
        reset_settings()
        register_sims(conn, {"v": s})
        size = conn.execute("SELECT size_bytes FROM aibot.model_instances WHERE model = 'vllm-model'").fetchone()
        assert size["size_bytes"] == 3 * GB
    finally:
        s.stop()
        reset_settings()
