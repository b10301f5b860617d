"""The non-LM-Studio flavours over real loopback HTTP: OpenAI, llama-server (single and router); Ollama has
tests/sim/test_ollama.py."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from aibot.sim import GB, ModelSpec, SimConfig, SimServer
from aibot.sim.config import SimConfigError
from tests.support.waiting import wait_for
from tests.support.sim import sim_factory

MODELS = [ModelSpec("m-a", 1 * GB, parallel=2, context_length=8192), ModelSpec("m-b", 2 * GB, parallel=3)]


@pytest.fixture
def make_sim():
    factory = sim_factory(models=MODELS, speed=0.001, reply_tokens=12)
    make = next(factory)
    yield lambda api, **kw: make(api=api, **kw)
    next(factory, None)


def chat(url: str, model: str | None, path: str = "/v1/chat/completions", params: dict | None = None,
         **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hello"}], **extra}
    if model is not None:
        body["model"] = model
    return httpx.post(url + path, json=body, params=params, timeout=10)


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
# (behaviours and their sources: aibot/sim/apis/llamacpp.py; payload shapes: tests/backends/test_llamacpp_contract.py)


def test_llamacpp_health_props_models_tokenize(make_sim):
    sim = make_sim("llamacpp")
    assert httpx.get(f"{sim.url}/health").json() == {"status": "ok"}
    props = httpx.get(f"{sim.url}/props").json()
    # -c 8192 --parallel 2: each slot gets 4096 tokens, and that is what n_ctx reports
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 4096
    assert props["is_sleeping"] is False
    models = httpx.get(f"{sim.url}/v1/models").json()
    [entry] = models["data"]
    assert (entry["id"], entry["aliases"], entry["owned_by"]) == ("m-a", ["m-a"], "llamacpp")
    assert (entry["meta"]["n_ctx"], entry["meta"]["size"]) == (4096, 1 * GB)
    toks = httpx.post(f"{sim.url}/tokenize", json={"content": "Hello, world!"}).json()["tokens"]
    assert len(toks) == 4 and all(isinstance(t, int) for t in toks)
    assert httpx.post(f"{sim.url}/tokenize", json={}).json() == {"tokens": []}
    assert httpx.post(f"{sim.url}/tokenize", json={"content": 3}).status_code == 400
    nf = httpx.get(f"{sim.url}/nope")
    assert nf.status_code == 404 and nf.json()["error"] == {"message": "File Not Found", "type": "not_found_error",
                                                              "code": 404}
    assert httpx.get(f"{sim.url}/metrics").status_code == 501            # not started with --metrics


def test_llamacpp_ignores_the_model_field(make_sim):
    sim = make_sim("llamacpp")
    for requested in ("m-b", "anything", None):
        r = chat(sim.url, requested)
        assert r.status_code == 200 and r.json()["model"] == "m-a"
        assert "timings" in r.json() and r.json()["timings"]["predicted_n"] == 12
    assert sim.model_stats("m-a")["served"] == 3 and sim.model_stats("m-b")["served"] == 0


def test_llamacpp_alias_names_the_model(make_sim):
    sim = make_sim("llamacpp", model_aliases={"m-a": ["alpha"]})
    [entry] = httpx.get(f"{sim.url}/v1/models").json()["data"]
    assert (entry["id"], entry["aliases"]) == ("alpha", ["alpha", "m-a"])    # the first alias is the name
    assert chat(sim.url, "whatever").json()["model"] == "alpha"


def test_llamacpp_slots_show_processing(make_sim):
    sim = make_sim("llamacpp", speed=1.0, ttft_seconds=0.0, per_token_seconds=0.02, reply_tokens=40)
    slots = httpx.get(f"{sim.url}/slots").json()
    assert [s["id"] for s in slots] == [0, 1] and not any(s["is_processing"] for s in slots)
    assert all(s["n_ctx"] == 4096 for s in slots)
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


@pytest.mark.parametrize("stream", [False, True])
def test_llamacpp_prompt_longer_than_the_slot_is_the_exact_400(make_sim, stream):
    sim = make_sim("llamacpp")
    long = " ".join(["word"] * 4100)                 # 4104 tokens with the role framing; the slot has 4096
    r = chat(sim.url, None, messages=[{"role": "user", "content": long}], stream=stream)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {"error": {
        "code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": 4104, "n_ctx": 4096,
        "message": "request (4104 tokens) exceeds the available context size (4096 tokens), try increasing it"}}
    st = sim.model_stats("m-a")
    assert (st["rejected"], st["served"], st["in_flight"]) == (1, 0, 0)
    short = " ".join(["word"] * 4000)
    assert chat(sim.url, None, messages=[{"role": "user", "content": short}]).status_code == 200


def test_llamacpp_sleeps_when_idle_and_wakes_on_a_request(make_sim):
    sim = make_sim("llamacpp", sleep_idle_seconds=0.05)
    wait_for(lambda: httpx.get(f"{sim.url}/props").json()["is_sleeping"], 5)
    assert httpx.get(f"{sim.url}/health").status_code == 200        # /health and /props do not wake it
    assert httpx.get(f"{sim.url}/props").json()["is_sleeping"] is True
    assert sim.stats()["memory"]["used_bytes"] == 0                  # the model and its KV cache are freed
    assert chat(sim.url, None).status_code == 200
    assert sim.model_stats("m-a")["wakes"] == 1


# ------------------------------------------------------------------ llama-server router


def _status(url: str) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in httpx.get(f"{url}/v1/models").json()["data"]}


def _entry(url: str, key: str) -> dict:
    return next(m for m in httpx.get(f"{url}/models").json()["data"] if m["id"] == key)


def test_router_load_status_slots_unload(make_sim):
    # A 4 s load: the two requests that must see it "loading" come well before it ends on a busy machine.
    sim = make_sim("llamacpp-router", speed=1.0, seconds_per_gb=2.0, load_overhead_seconds=0.0)
    assert _status(sim.url) == {"m-a": "unloaded", "m-b": "unloaded"}
    r = httpx.post(f"{sim.url}/models/load", json={"model": "m-b"})
    assert r.status_code == 200 and r.json() == {"success": True}
    assert _status(sim.url)["m-b"] == "loading"
    again = httpx.post(f"{sim.url}/models/load", json={"model": "m-b"})     # loading counts as running
    assert again.status_code == 400 and again.json()["error"]["message"] == "model is already running"
    wait_for(lambda: _status(sim.url)["m-b"] == "loaded", 20)
    slots = httpx.get(f"{sim.url}/slots", params={"model": "m-b"}).json()
    assert len(slots) == 3 and {s["n_ctx"] for s in slots} == {1536}   # 4096 / 3, padded to 256
    assert _entry(sim.url, "m-b")["meta"]["n_ctx"] == 1536
    r = httpx.get(f"{sim.url}/slots", params={"model": "m-a", "autoload": "false"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "model is not loaded"
    assert httpx.get(f"{sim.url}/slots").status_code == 400
    assert httpx.post(f"{sim.url}/models/unload", json={"model": "m-b"}).json() == {"success": True}
    assert _status(sim.url)["m-b"] == "unloaded"
    r = httpx.post(f"{sim.url}/models/unload", json={"model": "m-b"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "model is not running"


def test_router_routes_by_model_and_autoloads(make_sim):
    sim = make_sim("llamacpp-router", preloaded=["m-a"])
    r = chat(sim.url, "m-a")
    assert r.status_code == 200 and r.json()["model"] == "m-a"
    r = chat(sim.url, "nope")
    assert r.status_code == 400 and r.json()["error"]["message"] == "model 'nope' not found"
    assert httpx.post(f"{sim.url}/models/load", json={"model": "nope"}).status_code == 404
    # autoload on chat (router default), and the status follows
    assert chat(sim.url, "m-b").status_code == 200
    assert _status(sim.url) == {"m-a": "loaded", "m-b": "loaded"}
    assert sim.model_stats("m-b")["loads"] == 1


def test_router_observing_an_unloaded_model_loads_it_unless_autoload_false(make_sim):
    sim = make_sim("llamacpp-router")
    r = httpx.get(f"{sim.url}/props", params={"model": "m-b", "autoload": "false"})
    assert r.status_code == 400 and _status(sim.url)["m-b"] == "unloaded"
    r = httpx.get(f"{sim.url}/props", params={"model": "m-b"}, timeout=10)   # autoload is on by default
    assert r.status_code == 200 and r.json()["total_slots"] == 3 and _status(sim.url)["m-b"] == "loaded"


def test_router_without_autoload(make_sim):
    sim = make_sim("llamacpp-router", jit=False)
    r = chat(sim.url, "m-a")
    assert r.status_code == 400 and r.json()["error"]["message"] == "model is not loaded"
    assert httpx.get(f"{sim.url}/props").json()["models_autoload"] is False
    r = httpx.post(f"{sim.url}/v1/chat/completions?autoload=true", timeout=10,
                   json={"model": "m-a", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and _status(sim.url)["m-a"] == "loaded"


def test_router_loading_model_without_autoload_answers_loading(make_sim):
    sim = make_sim("llamacpp-router", jit=False, speed=1.0, seconds_per_gb=0.5, load_overhead_seconds=0.0)
    httpx.post(f"{sim.url}/models/load", json={"model": "m-a"})
    r = chat(sim.url, "m-a")
    assert r.status_code == 503 and r.json()["error"]["message"] == "Loading model"


def test_router_failed_load_is_visible_at_once_with_its_exit_code(make_sim):
    sim = make_sim("llamacpp-router", broken_models=["m-b"], speed=1.0, load_overhead_seconds=0.1)
    t = time.monotonic()
    assert httpx.post(f"{sim.url}/models/load", json={"model": "m-b"}).json() == {"success": True}
    status = wait_for(lambda: _entry(sim.url, "m-b")["status"] if _entry(sim.url, "m-b")["status"].get("failed")
                      else None, 5)
    assert time.monotonic() - t < 1.0
    assert (status["value"], status["exit_code"], status["failed"]) == ("unloaded", 1, True)
    assert "meta" not in _entry(sim.url, "m-b")
    r = chat(sim.url, "m-b")                                   # autoload tries again, and fails again
    assert r.status_code == 500 and r.json()["error"] == {"code": 500, "type": "server_error",
                                                          "message": "model name=m-b failed to load"}
    sim.engine.set_broken("m-b", None)                          # the file is fixed
    assert chat(sim.url, "m-b").status_code == 200
    assert "failed" not in _entry(sim.url, "m-b")["status"]
    assert sim.model_stats("m-b")["load_failures"] == 2


def test_router_models_max_evicts_the_least_recently_used(make_sim):
    models = [ModelSpec("x", GB), ModelSpec("y", GB), ModelSpec("z", GB)]
    sim = make_sim("llamacpp-router", models=models, models_max=2, preloaded=["x", "y"])
    assert httpx.get(f"{sim.url}/props").json()["max_instances"] == 2
    assert chat(sim.url, "x").status_code == 200                # y is now the least recently used
    assert httpx.post(f"{sim.url}/models/load", json={"model": "z"}).status_code == 200
    wait_for(lambda: _status(sim.url)["z"] == "loaded", 5)
    assert _status(sim.url) == {"x": "loaded", "y": "unloaded", "z": "loaded"}
    assert "failed" not in _entry(sim.url, "y")["status"]      # an eviction is a clean exit
    assert sim.stats()["memory"]["evictions"] == 1
    # a chat for y autoloads it and evicts the least recently used again (x: z was loaded after it)
    assert chat(sim.url, "y").status_code == 200
    assert _status(sim.url) == {"x": "unloaded", "y": "loaded", "z": "loaded"}


def test_router_models_max_with_every_model_busy(make_sim):
    models = [ModelSpec("x", GB, parallel=1), ModelSpec("y", GB)]
    sim = make_sim("llamacpp-router", models=models, models_max=1, preloaded=["x"], speed=1.0,
                   ttft_seconds=0.0, per_token_seconds=0.02, reply_tokens=50)
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(chat, sim.url, "x")
        wait_for(lambda: sim.model_stats("x")["in_flight"] == 1, 5)
        r = httpx.post(f"{sim.url}/models/load", json={"model": "y"})
        assert r.status_code == 500 and r.json()["error"]["message"] == "model limit reached, try again later"
        assert busy.result().status_code == 200
    assert httpx.post(f"{sim.url}/models/load", json={"model": "y"}).status_code == 200


def test_router_preloads_beyond_models_max_refuse_to_start():
    with pytest.raises(SimConfigError, match="exceeds models_max"):
        SimServer(SimConfig(api="llamacpp-router", models=MODELS, models_max=1, preloaded=["m-a", "m-b"]))


def test_router_sleeping_is_running_and_wakes_on_slots_or_chat(make_sim):
    sim = make_sim("llamacpp-router", preloaded=["m-a"], sleep_idle_seconds=0.05)
    wait_for(lambda: _status(sim.url)["m-a"] == "sleeping", 5)
    assert _entry(sim.url, "m-a")["meta"]["n_ctx"] == 4096        # the child's info stays listed
    props = httpx.get(f"{sim.url}/props", params={"model": "m-a"}).json()
    assert props["is_sleeping"] is True and _status(sim.url)["m-a"] == "sleeping"   # /props does not wake it
    r = httpx.post(f"{sim.url}/models/load", json={"model": "m-a"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "model is already running"
    assert len(httpx.get(f"{sim.url}/slots", params={"model": "m-a"}).json()) == 2   # /slots is a task: wakes
    assert sim.model_stats("m-a")["wakes"] == 1
    wait_for(lambda: _status(sim.url)["m-a"] == "sleeping", 5)
    assert chat(sim.url, "m-a", params={"autoload": "false"}).status_code == 200  # resident: no autoload needed
    assert sim.model_stats("m-a")["wakes"] == 2


def test_router_aliases_route_to_the_preset(make_sim):
    sim = make_sim("llamacpp-router", model_aliases={"m-a": ["alpha", "first"]})
    assert _entry(sim.url, "m-a")["aliases"] == ["alpha", "first"]
    assert httpx.post(f"{sim.url}/models/load", json={"model": "alpha"}).status_code == 200
    wait_for(lambda: _status(sim.url)["m-a"] == "loaded", 5)
    r = chat(sim.url, "first")
    assert r.status_code == 200 and r.json()["model"] == "m-a"
    assert chat(sim.url, "Alpha").status_code == 400               # exact names only


def test_router_metrics_per_model(make_sim):
    sim = make_sim("llamacpp-router", preloaded=["m-a"], metrics=True)
    assert chat(sim.url, "m-a").status_code == 200
    text = httpx.get(f"{sim.url}/metrics", params={"model": "m-a"}).text
    values = dict(line.split(" ") for line in text.splitlines() if line and not line.startswith("#"))
    assert values["llamacpp:tokens_predicted_total"] == "12" and values["llamacpp:requests_processing"] == "0"


# Ollama: tests/sim/test_ollama.py
