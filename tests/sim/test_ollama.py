"""The simulator's Ollama flavour over real loopback HTTP, against what the real server answers: the shapes
of tests/fixtures/ollama (copied from Ollama's docs and source), its name rules, keep-alive expiry,
OLLAMA_MAX_LOADED_MODELS eviction, memory eviction, OLLAMA_NUM_PARALLEL and its error bodies."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from aibot.backends.ollama import out_of_memory
from aibot.sim import GB, ModelSpec, SimConfig, SimServer
from aibot.sim.apis.ollama_sched import digest
from aibot.sim.config import SimConfigError
from tests.support.sim import sim_factory
from tests.support.waiting import wait_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ollama"
MODELS = [ModelSpec("m-a", 1 * GB, context_length=8192), ModelSpec("m-b", 2 * GB)]


def fixture(name: str):
    return json.loads((FIXTURES / f"{name}.json").read_text())["payload"]


@pytest.fixture
def make_sim():
    factory = sim_factory(models=MODELS, speed=0.001, reply_tokens=12, api="ollama")
    make = next(factory)
    yield make
    next(factory, None)


def post(sim, path: str, **body) -> httpx.Response:
    return httpx.post(sim.url + path, json=body, timeout=10)


def ps(sim) -> list[dict]:
    return httpx.get(f"{sim.url}/api/ps").json()["models"]


def loaded(sim) -> list[str]:
    return sorted(p["name"] for p in ps(sim))


def seconds_left(entry: dict) -> float:
    return datetime.fromisoformat(entry["expires_at"]).timestamp() - time.time()


def same_shape(got, want) -> bool:
    """`got` has every key of `want`, recursively, with values of the same JSON type."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and same_shape(got[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(got, list) and (not want or not got or same_shape(got[0], want[0]))
    return type(got) is type(want) or {type(got), type(want)} <= {int, float}


# ------------------------------------------------------------------ shapes, as the fixtures


def test_listings_have_the_documented_shapes_and_tagged_names(make_sim):
    sim = make_sim()
    assert httpx.get(f"{sim.url}/").text == "Ollama is running"
    assert same_shape(httpx.get(f"{sim.url}/api/version").json(), fixture("version_docs"))
    tags = httpx.get(f"{sim.url}/api/tags").json()
    assert same_shape(tags, fixture("tags_docs"))
    assert [(t["name"], t["model"], t["size"]) for t in tags["models"]] == [
        ("m-a:latest", "m-a:latest", 1 * GB), ("m-b:latest", "m-b:latest", 2 * GB)]
    assert tags["models"][0]["details"]["context_length"] == 32768          # the trained context
    assert ps(sim) == []
    assert post(sim, "/api/generate", model="m-a").json()["done_reason"] == "load"
    [entry] = ps(sim)
    assert same_shape(entry, fixture("ps_openapi")["models"][0])
    assert (entry["name"], entry["size"], entry["size_vram"], entry["context_length"]) == ("m-a:latest", GB, GB, 8192)
    assert [m["id"] for m in httpx.get(f"{sim.url}/v1/models").json()["data"]] == ["m-a:latest", "m-b:latest"]
    assert httpx.get(f"{sim.url}/nope").status_code == 404


def test_a_namespaced_key_is_listed_with_its_namespace(make_sim):
    sim = make_sim(models=[ModelSpec("sim/the-eternal-f16", GB)])
    assert [t["name"] for t in httpx.get(f"{sim.url}/api/tags").json()["models"]] == ["sim/the-eternal-f16:latest"]
    assert post(sim, "/api/generate", model="sim/the-eternal-f16").status_code == 200
    assert post(sim, "/api/generate", model="the-eternal-f16").status_code == 404   # library/, not sim/


def test_keys_ollama_would_refuse_are_a_config_error():
    with pytest.raises(SimConfigError, match="'bad name!' is not a valid Ollama model name"):
        SimServer(SimConfig(api="ollama", models=[ModelSpec("bad name!", GB)]))
    with pytest.raises(SimConfigError, match="name the same Ollama model"):
        SimServer(SimConfig(api="ollama", models=[ModelSpec("x", GB), ModelSpec("library/X:latest", GB)]))


def test_lm_studio_style_keys_are_installed_under_the_renamed_name():
    # The team renamed `<base>@<quant>` to `<base>-<quant>` when it moved to Ollama (original-bot.md §2.3).
    sim = SimServer(SimConfig(api="ollama", models=[ModelSpec("the-eternal@f16", GB)])).start()
    try:
        names = [m["name"] for m in httpx.get(f"{sim.url}/api/tags", timeout=5).json()["models"]]
        assert names == ["the-eternal-f16:latest"]
    finally:
        sim.stop()


def test_load_and_unload_answer_like_the_docs(make_sim):
    sim = make_sim()
    load = post(sim, "/api/generate", model="m-a", keep_alive="10m").json()
    assert same_shape(load, fixture("generate_load")) and load["done_reason"] == "load"
    assert load["model"] == "m-a"                                  # echoed as requested
    assert 590 < seconds_left(ps(sim)[0]) <= 600
    unload = post(sim, "/api/generate", model="m-a", keep_alive=0).json()
    assert same_shape(unload, fixture("generate_unload")) and unload["done_reason"] == "unload"
    assert ps(sim) == []
    chat_load = post(sim, "/api/chat", model="m-b", messages=[]).json()
    assert chat_load["done_reason"] == "load" and chat_load["message"] == {"role": "assistant", "content": ""}


# ------------------------------------------------------------------ names


@pytest.mark.parametrize("name", ["m-a", "m-a:latest", "M-A", "library/m-a", "registry.ollama.ai/library/m-a:latest",
                                  " m-a ", "m-a:local"])
def test_names_resolve_as_ollama_does(make_sim, name):
    sim = make_sim()
    r = post(sim, "/api/generate", model=name, prompt="hi", stream=False)
    assert r.status_code == 200 and r.json()["model"] == name
    assert loaded(sim) == ["m-a:latest"]


def test_unknown_and_invalid_names_get_ollamas_errors(make_sim):
    sim = make_sim()
    for path in ("/api/generate", "/api/chat"):
        r = post(sim, path, model="m-a:q4", messages=[])
        assert (r.status_code, r.json()) == (404, {"error": "model 'm-a:q4' not found"})
        assert same_shape(r.json(), fixture("error_not_found")["body"])
        r = post(sim, path, model="m-a@f16")
        assert (r.status_code, r.json()) == (400, fixture("error_invalid_name")["body"])
    assert (post(sim, "/api/chat", model="").status_code, post(sim, "/api/generate", model="").status_code) == (400, 404)
    r = post(sim, "/v1/chat/completions", model="nope", messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == 404 and r.json() == fixture("error_v1_not_found")["body"]


# ------------------------------------------------------------------ keep-alive


@pytest.mark.parametrize("value,error", [
    ("soon", 'time: invalid duration "soon"'),
    ("300", 'time: missing unit in duration "300"'),        # a string is a Go duration; seconds are a number
    ("5y", 'time: unknown unit "y" in duration "5y"'),
    (True, "Unsupported type: 'bool'"),
])
def test_bad_keep_alive_is_a_400_with_gos_message(make_sim, value, error):
    r = post(make_sim(), "/api/generate", model="m-a", keep_alive=value)
    assert (r.status_code, r.json()) == (400, {"error": error})


def test_keep_alive_forever_reports_a_far_future_expiry(make_sim):
    sim = make_sim()
    post(sim, "/api/generate", model="m-a", keep_alive=-1)
    post(sim, "/api/generate", model="m-b", keep_alive="-1m")
    years = [seconds_left(p) / (365.25 * 86400) for p in ps(sim)]
    assert all(292 < y < 293 for y in years)                   # Go's MaxInt64 nanoseconds


def test_an_idle_model_expires_after_its_keep_alive(make_sim):
    sim = make_sim(ollama_keep_alive="2s")
    post(sim, "/api/generate", model="m-a")                    # no keep_alive: OLLAMA_KEEP_ALIVE
    post(sim, "/api/generate", model="m-b", keep_alive=-1)
    assert loaded(sim) == ["m-a:latest", "m-b:latest"]
    assert [p["name"] for p in ps(sim)] == ["m-b:latest", "m-a:latest"]   # longest time left first
    wait_for(lambda: loaded(sim) == ["m-b:latest"], timeout=5, message="m-a expired")


def test_a_request_without_keep_alive_keeps_the_models_and_one_with_replaces_it(make_sim):
    sim = make_sim()
    post(sim, "/api/generate", model="m-a", keep_alive=-1)
    post(sim, "/v1/chat/completions", model="m-a", messages=[{"role": "user", "content": "hi"}])
    assert seconds_left(ps(sim)[0]) > 100 * 365 * 86400       # /v1 sends no keep_alive: still pinned
    post(sim, "/api/chat", model="m-a", keep_alive="1m", messages=[{"role": "user", "content": "hi"}])
    assert 50 < seconds_left(ps(sim)[0]) <= 60


def test_a_different_num_ctx_reloads_and_v1_asks_for_the_default(make_sim):
    """Why the backend never loads with num_ctx: the first /v1 chat would reload the model, unpinned."""
    sim = make_sim()
    post(sim, "/api/generate", model="m-a", keep_alive=-1, options={"num_ctx": 2048})
    assert ps(sim)[0]["context_length"] == 2048
    post(sim, "/v1/chat/completions", model="m-a", messages=[{"role": "user", "content": "hi"}])
    [entry] = ps(sim)
    assert entry["context_length"] == 8192 and seconds_left(entry) <= 300     # reloaded with the defaults
    assert sim.model_stats("m-a")["loads"] == 2


# ------------------------------------------------------------------ eviction


def test_max_loaded_models_evicts_the_shortest_keep_alive_first(make_sim):
    models = [ModelSpec(k, GB) for k in ("p", "q", "r", "s")]
    sim = make_sim(models=models)                                       # default: 3 (no GPU)
    post(sim, "/api/generate", model="p", keep_alive=-1)
    post(sim, "/api/generate", model="q", keep_alive="10m")
    post(sim, "/api/generate", model="r", keep_alive="20m")
    post(sim, "/api/generate", model="s", keep_alive=-1)
    assert loaded(sim) == ["p:latest", "r:latest", "s:latest"]          # q had the shortest keep-alive
    sim2 = make_sim(models=models, ollama_max_loaded_models=2)
    for k in ("p", "q", "r"):
        post(sim2, "/api/generate", model=k, keep_alive=-1)
    first = min(("p", "q"), key=digest)                                 # a tie: by model path (digest)
    assert loaded(sim2) == sorted(f"{k}:latest" for k in {"p", "q", "r"} - {first})


def test_a_model_that_does_not_fit_evicts_others_and_alone_too_big_fails(make_sim):
    models = [ModelSpec("x", 2 * GB), ModelSpec("y", 2 * GB), ModelSpec("w", 2 * GB), ModelSpec("z", 5 * GB)]
    sim = make_sim(models=models, memory_bytes=4 * GB)
    for k in ("x", "y"):
        post(sim, "/api/generate", model=k, keep_alive=-1)
    post(sim, "/api/generate", model="w", keep_alive=-1)
    assert len(loaded(sim)) == 2 and "w:latest" in loaded(sim)
    r = post(sim, "/api/generate", model="z")
    assert r.status_code == 500 and out_of_memory(r.json()["error"])
    assert r.json() == fixture("error_oom_v033")["body"]
    assert loaded(sim) == []                   # Ollama unloaded the others first: z was alone when it failed


def test_a_busy_model_is_evicted_only_when_its_request_is_done(make_sim):
    sim = make_sim(ollama_max_loaded_models=1, speed=1.0, ttft_seconds=0.0, per_token_seconds=0.02,
                   seconds_per_gb=0.0, load_overhead_seconds=0.0)
    post(sim, "/api/generate", model="m-a", keep_alive=-1)
    with ThreadPoolExecutor(1) as pool:
        chat = pool.submit(post, sim, "/api/generate", model="m-a", prompt="hi", stream=False)
        wait_for(lambda: sim.model_stats("m-a")["in_flight"] == 1, timeout=5, message="m-a generating")
        load = post(sim, "/api/generate", model="m-b")         # a load takes no time here: it waited
        at_load = sim.model_stats("m-a")
        assert chat.result().status_code == 200 and chat.result().json()["eval_count"] == 12   # not cut off
    assert load.json()["done_reason"] == "load"
    assert (at_load["in_flight"], at_load["served"], at_load["unloads"]) == (0, 1, 1)
    assert loaded(sim) == ["m-b:latest"]


def test_an_idle_model_is_evicted_before_a_busy_one(make_sim):
    sim = make_sim(models=[*MODELS, ModelSpec("m-c", GB)], ollama_max_loaded_models=2, speed=1.0,
                   ttft_seconds=0.0, per_token_seconds=0.2, seconds_per_gb=0.0, load_overhead_seconds=0.0)
    post(sim, "/api/generate", model="m-a", keep_alive="10m")     # first in line: the shorter keep-alive
    post(sim, "/api/generate", model="m-b", keep_alive=-1)
    with ThreadPoolExecutor(1) as pool:
        chat = pool.submit(post, sim, "/api/generate", model="m-a", prompt="hi", stream=False)
        wait_for(lambda: sim.model_stats("m-a")["in_flight"] == 1, timeout=5, message="m-a generating")
        assert post(sim, "/api/generate", model="m-c").status_code == 200
        assert sim.model_stats("m-a")["in_flight"] == 1                # did not wait for m-a
        assert loaded(sim) == ["m-a:latest", "m-c:latest"]
        assert chat.result().status_code == 200


# ------------------------------------------------------------------ chat and parallelism


def test_chat_streams_ndjson_by_default_and_loads_with_the_default_keep_alive(make_sim):
    sim = make_sim()
    with httpx.stream("POST", f"{sim.url}/api/chat",
                      json={"model": "m-a", "messages": [{"role": "user", "content": "hi"}]}, timeout=10) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True
    assert lines[-1]["eval_count"] == 12 and lines[-1]["done_reason"] == "stop"
    assert "".join(x["message"]["content"] for x in lines).startswith("m-a reply")
    assert 290 < seconds_left(ps(sim)[0]) <= 300


def test_non_streaming_generate_and_the_openai_path(make_sim):
    sim = make_sim()
    r = post(sim, "/api/chat", model="m-a:latest", stream=False, options={"num_predict": 4},
             messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == 200 and r.json()["done_reason"] == "length" and r.json()["eval_count"] == 4
    g = post(sim, "/api/generate", model="m-b", prompt="why", stream=False).json()
    assert g["response"].startswith("m-b reply") and g["done"] is True
    o = post(sim, "/v1/chat/completions", model="m-a", messages=[{"role": "user", "content": "hi"}])
    assert o.status_code == 200 and o.json()["model"] == "m-a"
    assert o.json()["choices"][0]["message"]["content"].startswith("m-a reply")


@pytest.mark.parametrize("parallel,peak", [(None, 1), (3, 3)])    # OLLAMA_NUM_PARALLEL, default 1
def test_num_parallel(make_sim, parallel, peak):
    sim = make_sim(preloaded=["m-b"], parallel=parallel, speed=1.0, ttft_seconds=0.05, per_token_seconds=0.005)
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda i: post(sim, "/api/chat", model="m-b", stream=False,
                                             messages=[{"role": "user", "content": str(i)}]).status_code, range(6)))
    assert codes == [200] * 6
    assert sim.model_stats("m-b")["peak_in_flight"] == peak and sim.model_stats("m-b")["served"] == 6


def test_loads_are_one_at_a_time(make_sim):
    sim = make_sim(speed=1.0, seconds_per_gb=0.15, load_overhead_seconds=0.0)
    started = time.monotonic()
    barrier = threading.Barrier(2)

    def load(key):
        barrier.wait()
        return post(sim, "/api/generate", model=key).status_code

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(load, ["m-a", "m-b"])) == [200, 200]
    assert time.monotonic() - started >= 0.15 + 0.30 - 0.02     # 1 GB then 2 GB, not side by side
