"""The non-LM-Studio flavours over real loopback HTTP: OpenAI, llama-server (single and router); Ollama has
tests/test_sim_ollama.py."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from aibot.sim import GB, ModelSpec, SimConfig, SimServer
from tests.waiting import wait_for
from tests.sim_support import sim_factory

MODELS = [ModelSpec("m-a", 1 * GB, parallel=2, context_length=8192), ModelSpec("m-b", 2 * GB, parallel=3)]


@pytest.fixture
def make_sim():
    factory = sim_factory(models=MODELS, speed=0.001, reply_tokens=12)
    make = next(factory)
    yield lambda api, **kw: make(api=api, **kw)
    next(factory, None)


def chat(url: str, model: str | None, path: str = "/v1/chat/completions", **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hello"}], **extra}
    if model is not None:
        body["model"] = model
    return httpx.post(url + path, json=body, timeout=10)


# ------------------------------------------------------------------ OpenAI-compatible


def test_openai_serves_only_v1_with_all_models_loaded(make_sim):
    sim = make_sim("openai")
    assert [m["id"] for m in httpx.get(f"{sim.url}/v1/models").json()["data"]] == ["m-a", "m-b"]
    r = chat(sim.url, "m-b")
    assert r.status_code == 200 and r.json()["model"] == "m-b"
    r = chat(sim.url, "gpt-9")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{sim.url}/api/v0/models").status_code == 404
    assert httpx.post(f"{sim.url}/api/v1/models/load", json={"model": "m-a"}).status_code == 404


def test_openai_with_explicit_preload_serves_just_those(make_sim):
    sim = make_sim("openai", preloaded=["m-a"])
    assert [m["id"] for m in httpx.get(f"{sim.url}/v1/models").json()["data"]] == ["m-a"]
    assert chat(sim.url, "m-b").status_code == 404


# ------------------------------------------------------------------ llama-server single model


def test_llamacpp_health_props_models_tokenize(make_sim):
    sim = make_sim("llamacpp")
    assert httpx.get(f"{sim.url}/health").json() == {"status": "ok"}
    props = httpx.get(f"{sim.url}/props").json()
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 8192
    models = httpx.get(f"{sim.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["m-a"] and models["data"][0]["owned_by"] == "llamacpp"
    toks = httpx.post(f"{sim.url}/tokenize", json={"content": "Hello, world!"}).json()["tokens"]
    assert len(toks) == 4 and all(isinstance(t, int) for t in toks)
    assert httpx.post(f"{sim.url}/tokenize", json={"content": 3}).status_code == 400
    nf = httpx.get(f"{sim.url}/nope")
    assert nf.status_code == 404 and nf.json()["error"]["type"] == "not_found_error"


def test_llamacpp_ignores_the_model_field(make_sim):
    sim = make_sim("llamacpp")
    for requested in ("m-b", "anything", None):
        r = chat(sim.url, requested)
        assert r.status_code == 200 and r.json()["model"] == "m-a"
        assert "timings" in r.json() and r.json()["timings"]["predicted_n"] == 12
    assert sim.model_stats("m-a")["served"] == 3 and sim.model_stats("m-b")["served"] == 0


def test_llamacpp_slots_show_processing(make_sim):
    sim = make_sim("llamacpp", speed=1.0, ttft_seconds=0.0, per_token_seconds=0.02, reply_tokens=40)
    slots = httpx.get(f"{sim.url}/slots").json()
    assert [s["id"] for s in slots] == [0, 1] and not any(s["is_processing"] for s in slots)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(chat, sim.url, "m-a")
        busy = wait_for(lambda: [s["id"] for s in httpx.get(f"{sim.url}/slots").json() if s["is_processing"]], 5)
        assert busy == [0]
        assert fut.result().status_code == 200
    assert not any(s["is_processing"] for s in httpx.get(f"{sim.url}/slots").json())


def test_llamacpp_api_key(make_sim):
    sim = make_sim("llamacpp", api_token="k")
    assert httpx.get(f"{sim.url}/health").status_code == 200
    r = httpx.get(f"{sim.url}/props")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{sim.url}/props", headers={"Authorization": "Bearer k"}).status_code == 200


# ------------------------------------------------------------------ llama-server router


def _status(url: str) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in httpx.get(f"{url}/v1/models").json()["data"]}


def test_router_load_status_slots_unload(make_sim):
    sim = make_sim("llamacpp-router", speed=1.0, seconds_per_gb=0.2, load_overhead_seconds=0.0)
    assert _status(sim.url) == {"m-a": "unloaded", "m-b": "unloaded"}
    r = httpx.post(f"{sim.url}/models/load", json={"model": "m-b"})
    assert r.status_code == 200 and r.json() == {"success": True}
    assert _status(sim.url)["m-b"] == "loading"
    wait_for(lambda: _status(sim.url)["m-b"] == "loaded", 5)
    slots = httpx.get(f"{sim.url}/slots", params={"model": "m-b"}).json()
    assert len(slots) == 3
    assert httpx.get(f"{sim.url}/slots", params={"model": "m-a"}).status_code == 400
    assert httpx.get(f"{sim.url}/slots").status_code == 400
    assert httpx.post(f"{sim.url}/models/unload", json={"model": "m-b"}).json() == {"success": True}
    assert _status(sim.url)["m-b"] == "unloaded"
    assert httpx.post(f"{sim.url}/models/unload", json={"model": "m-b"}).status_code == 400


def test_router_routes_by_model_and_rejects_unknown_with_400(make_sim):
    sim = make_sim("llamacpp-router", preloaded=["m-a"])
    r = chat(sim.url, "m-a")
    assert r.status_code == 200 and r.json()["model"] == "m-a"
    r = chat(sim.url, "nope")
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
    assert httpx.post(f"{sim.url}/models/load", json={"model": "nope"}).status_code == 400
    # autoload on chat (router default), and the status follows
    assert chat(sim.url, "m-b").status_code == 200
    assert _status(sim.url) == {"m-a": "loaded", "m-b": "loaded"}
    assert sim.model_stats("m-b")["loads"] == 1


def test_router_without_autoload(make_sim):
    sim = make_sim("llamacpp-router", jit=False)
    r = chat(sim.url, "m-a")
    assert r.status_code == 400 and "not loaded" in r.json()["error"]["message"]


# Ollama: tests/test_sim_ollama.py
