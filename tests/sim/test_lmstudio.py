"""The LM Studio flavour over real loopback HTTP: shapes, loads, memory, slots, JIT, streaming, auth."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from aibot.sim import GB, ModelSpec, SimConfig, SimServer
from tests.backends.canned_server import fixture
from tests.support.sim import sim_factory
from tests.support.waiting import wait_for

TINY = [ModelSpec("pub/small", 1 * GB, parallel=4), ModelSpec("pub/big", 4 * GB, parallel=4),
        ModelSpec("pub/huge", 15 * GB, parallel=1)]


@pytest.fixture
def make_sim():
    yield from sim_factory(models=TINY, speed=0.001, reply_tokens=20)


def chat(url: str, model: str, text: str = "hello there", **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)


def test_v1_models_shape_and_loaded_instances(make_sim):
    sim = make_sim(preloaded=["pub/small"], parallel=3)
    data = httpx.get(f"{sim.url}/api/v1/models").json()
    by_key = {m["key"]: m for m in data["models"]}
    assert set(by_key) == {"pub/small", "pub/big", "pub/huge"}
    small = by_key["pub/small"]
    assert small["size_bytes"] == 1 * GB and small["type"] == "llm" and small["max_context_length"] == 32768
    assert small["loaded_instances"] == [{"id": "pub/small", "config": {
        "context_length": 4096, "eval_batch_size": 512, "parallel": 3, "flash_attention": True,
        "offload_kv_cache_to_gpu": True}}]
    assert by_key["pub/big"]["loaded_instances"] == []


def test_v0_and_openai_listings(make_sim):
    sim = make_sim(preloaded=["pub/small"])
    v0 = httpx.get(f"{sim.url}/api/v0/models").json()
    states = {m["id"]: m["state"] for m in v0["data"]}
    assert v0["object"] == "list" and states == {"pub/small": "loaded", "pub/big": "not-loaded",
                                                  "pub/huge": "not-loaded"}
    one = httpx.get(f"{sim.url}/api/v0/models/pub/small").json()
    assert one["state"] == "loaded" and one["loaded_context_length"] == 4096
    assert httpx.get(f"{sim.url}/api/v0/models/pub/nope").status_code == 404
    # JIT on: /v1/models lists every downloaded model; JIT off: only loaded ones
    assert [m["id"] for m in httpx.get(f"{sim.url}/v1/models").json()["data"]] == ["pub/small", "pub/big", "pub/huge"]
    nojit = make_sim(preloaded=["pub/big"], jit=False)
    assert [m["id"] for m in httpx.get(f"{nojit.url}/v1/models").json()["data"]] == ["pub/big"]
    assert httpx.get(f"{sim.url}/lmstudio-greeting").json()["lmstudio"] is True


def test_chat_completion_body_usage_and_v0_stats(make_sim):
    sim = make_sim(preloaded=["pub/small"])
    r = chat(sim.url, "pub/small", "Tell me about rivers", max_tokens=8)
    assert r.status_code == 200
    body = r.json()
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["model"] == "pub/small"
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].startswith("small reply")
    assert "Tell me about rivers" in choice["message"]["content"] or choice["finish_reason"] == "length"
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8
    v0 = httpx.post(f"{sim.url}/api/v0/chat/completions",
                    json={"model": "pub/small", "messages": [{"role": "user", "content": "hi"}]}).json()
    assert v0["stats"]["stop_reason"] == "eosFound" and v0["model_info"]["format"] == "gguf"
    assert v0["usage"]["completion_tokens"] == 20


def test_chat_validation_errors_name_the_field(make_sim):
    sim = make_sim(preloaded=["pub/small"])
    r = httpx.post(f"{sim.url}/v1/chat/completions", json={"model": "pub/small"})
    assert r.status_code == 400 and "'messages'" in r.json()["error"]["message"]
    r = httpx.post(f"{sim.url}/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = chat(sim.url, "pub/small", max_tokens="ten")
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_streaming_sse_chunks_and_done(make_sim):
    sim = make_sim(preloaded=["pub/small"])
    body = {"model": "pub/small", "messages": [{"role": "user", "content": "stream please"}], "stream": True,
            "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", f"{sim.url}/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == ["stop"] and chunks[-1]["usage"]["completion_tokens"] == 20
    plain = chat(sim.url, "pub/small", "stream please").json()["choices"][0]["message"]["content"]
    assert text.split(":", 1)[1] == plain.split(":", 1)[1]   # same reply apart from the counter


def test_load_time_is_proportional_to_size(make_sim):
    sim = make_sim(speed=1.0, seconds_per_gb=0.08, load_overhead_seconds=0.0)
    times = {}
    with httpx.Client(timeout=10) as c:   # one pooled client: a new client's set-up is not load time
        c.get(f"{sim.url}/api/v1/models")
        for key in ("pub/small", "pub/big"):
            t = time.monotonic()
            r = c.post(f"{sim.url}/api/v1/models/load", json={"model": key, "echo_load_config": True})
            times[key] = time.monotonic() - t
            assert r.status_code == 200
            body = r.json()
            assert body["status"] == "loaded" and body["instance_id"] == key and body["type"] == "llm"
            assert body["load_config"]["context_length"] == 4096
    assert 2.5 < times["pub/big"] / times["pub/small"] < 6.0
    assert sim.model_stats("pub/big")["loads"] == 1


def test_load_rejects_undocumented_fields_and_bad_context(make_sim):
    sim = make_sim()
    r = httpx.post(f"{sim.url}/api/v1/models/load", json={"model": "pub/small", "parallel": 2})
    assert r.status_code == 400 and "'parallel'" in r.json()["error"]["message"]
    r = httpx.post(f"{sim.url}/api/v1/models/load", json={"model": "pub/small", "context_length": 10**9})
    assert r.status_code == 400 and "context_length" in r.json()["error"]["message"]
    r = httpx.post(f"{sim.url}/api/v1/models/load", json={})
    assert r.status_code == 400 and "'model'" in r.json()["error"]["message"]


def test_unload_and_duplicate_instances(make_sim):
    sim = make_sim()
    url = sim.url
    assert httpx.post(f"{url}/api/v1/models/load", json={"model": "pub/small"}).json()["instance_id"] == "pub/small"
    assert httpx.post(f"{url}/api/v1/models/load", json={"model": "pub/small"}).json()["instance_id"] == "pub/small:2"
    assert sim.stats()["memory"]["used_bytes"] == 2 * GB
    r = httpx.post(f"{url}/api/v1/models/unload", json={"instance_id": "pub/small:2"})
    assert r.status_code == 200 and r.json() == {"instance_id": "pub/small:2"}
    assert httpx.post(f"{url}/api/v1/models/unload", json={"instance_id": "pub/small:2"}).status_code == 404
    st = sim.stats()
    assert st["memory"]["used_bytes"] == 1 * GB and st["memory"]["peak_bytes"] == 2 * GB
    assert st["models"]["pub/small"]["unloads"] == 1


def test_out_of_memory_load_is_the_generic_model_load_failed(make_sim):
    """#2295: an out-of-memory REST load comes back as a generic model_load_failed (fixture v1_load_failed)."""
    sim = make_sim(memory_bytes=5 * GB)
    assert httpx.post(f"{sim.url}/api/v1/models/load", json={"model": "pub/big"}).status_code == 200
    r = httpx.post(f"{sim.url}/api/v1/models/load", json={"model": "pub/huge"}, timeout=10)
    expected = fixture("lmstudio", "v1_load_failed")["error"]
    assert r.status_code == 500 and set(r.json()) == {"error"} and set(r.json()["error"]) == set(expected)
    assert r.json()["error"]["type"] == "model_load_failed"
    assert r.json()["error"]["message"] == f'Failed to load model "pub/huge". {expected["message"]}'
    assert "insufficient" not in r.text


def test_memory_guardrail_option_uses_its_wording(make_sim):
    sim = make_sim(memory_bytes=5 * GB, lmstudio_load_failure="guardrail")
    assert httpx.post(f"{sim.url}/api/v1/models/load", json={"model": "pub/big"}).status_code == 200
    r = httpx.post(f"{sim.url}/api/v1/models/load", json={"model": "pub/huge"}, timeout=10)
    wording = fixture("lmstudio", "guardrail_refusal_message")
    assert r.status_code == 500 and r.json()["error"]["message"] == wording.replace("273.25", "15.00")
    # the JIT path refuses the same way
    r = chat(sim.url, "pub/huge")
    assert r.status_code == 500 and r.json()["error"]["message"] == wording.replace("273.25", "15.00")
    st = sim.stats()
    assert st["memory"]["refusals"] == 2 and st["memory"]["peak_bytes"] <= 5 * GB
    assert st["models"]["pub/huge"]["load_failures"] == 2 and st["models"]["pub/huge"]["loads"] == 0


def test_parallel_limit_queues_extras_and_records_peak(make_sim):
    sim = make_sim(preloaded=["pub/small"], parallel=4, speed=1.0, ttft_seconds=0.05,
                   per_token_seconds=0.005)   # ~0.15 s per reply, so the ten overlap
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda i: chat(sim.url, "pub/small", f"q{i}").status_code, range(10)))
    assert results == [200] * 10
    st = sim.model_stats("pub/small")
    assert st["peak_in_flight"] == 4 and st["served"] == 10 and st["in_flight"] == 0
    assert st["peak_queued"] >= 1
    assert sim.stats()["server"]["peak_in_flight"] == 4


def test_four_concurrent_take_about_1_4x_one(make_sim):
    """Continuous batching: server-side generation time of 4 batched requests ≈ 1.4 × one alone."""
    sim = make_sim(preloaded=["pub/small"], speed=1.0, ttft_seconds=0.0, per_token_seconds=0.005,
                   reply_tokens=60)

    def gen_time(_: int = 0) -> float:
        r = httpx.post(f"{sim.url}/api/v0/chat/completions", timeout=10,
                       json={"model": "pub/small", "messages": [{"role": "user", "content": "x"}]})
        return r.json()["stats"]["generation_time"]
    one = min(gen_time(), gen_time())
    with ThreadPoolExecutor(4) as pool:
        four = max(pool.map(gen_time, range(4)))
    assert sim.model_stats("pub/small")["peak_in_flight"] == 4
    assert 1.2 < four / one < 1.9, (one, four)


def test_without_jit_unloaded_model_gets_lm_studio_error(make_sim):
    sim = make_sim(jit=False)
    r = chat(sim.url, "pub/small")
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "No models loaded. Please load a model in the developer page or use "
                                             "the 'lms load' command.", "type": "invalid_request_error",
                                  "param": "model", "code": None}}
    assert r.json() == fixture("lmstudio", "no_models_loaded")
    sim.load("pub/big")
    r = chat(sim.url, "pub/small")
    assert r.status_code == 400 and "not loaded" in r.json()["error"]["message"]
    r = chat(sim.url, "pub/nope")
    expected = fixture("lmstudio", "invalid_model_identifier")["error"]
    assert r.status_code == 400 and set(r.json()["error"]) == set(expected)
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
    assert r.json()["error"]["message"] == ('Invalid model identifier "pub/nope". Please specify a valid downloaded '
                                            "model (e.g., pub/small, pub/big, pub/huge).")


def test_jit_concurrent_requests_load_once(make_sim):
    sim = make_sim(speed=1.0, seconds_per_gb=0.3, load_overhead_seconds=0.0, per_token_seconds=0.0,
                   ttft_seconds=0.0)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda i: chat(sim.url, "pub/small").status_code, range(4))) == [200] * 4
    st = sim.model_stats("pub/small")
    assert st["loads"] == 1 and st["load_requests"] == 4 and st["served"] == 4
    assert sim.stats()["memory"]["peak_bytes"] == 1 * GB


def test_jit_race_option_loads_duplicates(make_sim):
    sim = make_sim(jit_race=True, speed=1.0, seconds_per_gb=0.3, load_overhead_seconds=0.0,
                   per_token_seconds=0.0, ttft_seconds=0.0)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda i: chat(sim.url, "pub/small").status_code, range(4))) == [200] * 4
    st = sim.model_stats("pub/small")
    assert st["loads"] > 1 and st["loaded_instances"] == st["loads"]
    assert sim.stats()["memory"]["peak_bytes"] >= 2 * GB


@pytest.mark.parametrize("version, present, absent", [
    ("0.4", ["/api/v1/models", "/api/v0/models", "/v1/models"], []),
    ("0.3", ["/api/v0/models", "/v1/models"], ["/api/v1/models"]),
    ("openai-only", ["/v1/models"], ["/api/v1/models", "/api/v0/models", "/lmstudio-greeting"]),
])
def test_lmstudio_versions_expose_their_apis(make_sim, version, present, absent):
    sim = make_sim(lmstudio_version=version)
    for path in present:
        assert httpx.get(sim.url + path).status_code == 200, path
    for path in absent:
        r = httpx.get(sim.url + path)
        assert r.status_code == 200 and "Unexpected endpoint" in r.json()["error"], path


def test_unknown_endpoint_answers_200_like_real_lm_studio(make_sim):
    sim = make_sim(lmstudio_version="0.3")
    r = httpx.post(f"{sim.url}/chat/completions", json={})
    assert r.status_code == 200 and r.json() == fixture("lmstudio", "unexpected_endpoint")
    strict = make_sim(lmstudio_version="0.3", unknown_endpoint_status=404)
    assert httpx.get(f"{strict.url}/api/v1/models").status_code == 404


def test_bearer_token_required_when_set(make_sim):
    sim = make_sim(api_token="sk-lm-test:secret", preloaded=["pub/small"])
    assert httpx.get(f"{sim.url}/v1/models").status_code == 401
    assert httpx.get(f"{sim.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.get(f"{sim.url}/v1/models", headers={"Authorization": "Bearer sk-lm-test:secret"})
    assert ok.status_code == 200
    assert httpx.get(f"{sim.url}/lmstudio-greeting").status_code == 200
    assert httpx.get(f"{sim.url}/_sim/stats").status_code == 200
    assert "secret" not in repr(sim.config) and "secret" not in httpx.get(f"{sim.url}/_sim/config").text


def test_admin_endpoints_load_unload_reset_and_stats(make_sim):
    sim = make_sim()
    url = sim.url
    assert httpx.post(f"{url}/_sim/load", json={"model": "pub/big"}).json()["status"] == "loaded"
    assert sim.engine.is_loaded("pub/big")
    assert chat(url, "pub/big").status_code == 200
    stats = httpx.get(f"{url}/_sim/stats").json()
    assert stats["models"]["pub/big"]["served"] == 1 and stats["requests"]["total"] == 1
    assert stats["requests"]["by_endpoint"] == {"POST /v1/chat/completions": 1}
    assert stats["requests"]["by_status"] == {"200": 1}
    reset = httpx.post(f"{url}/_sim/reset").json()
    assert reset["models"]["pub/big"]["served"] == 0 and reset["requests"]["total"] == 0
    assert reset["models"]["pub/big"]["loaded_instances"] == 1
    assert httpx.post(f"{url}/_sim/unload", json={"model": "pub/big"}).json() == {"unloaded": 1}
    assert not sim.engine.is_loaded("pub/big")
    r = httpx.post(f"{url}/_sim/load", json={"model": "pub/nope"})
    assert r.status_code == 400 and "pub/nope" in r.json()["error"]
    assert httpx.get(f"{url}/_sim/what").status_code == 404


def test_request_while_loading_waits_and_v1_shows_loaded_after(make_sim):
    sim = make_sim(speed=1.0, seconds_per_gb=0.3, load_overhead_seconds=0.0, per_token_seconds=0.0,
                   ttft_seconds=0.0)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(chat, sim.url, "pub/small")
        wait_for(lambda: sim.stats()["models"]["pub/small"]["loading_instances"] == 1, 5, message="JIT load start")
        assert httpx.get(f"{sim.url}/api/v0/models/pub/small").json()["state"] == "not-loaded"
        assert fut.result().status_code == 200
    assert httpx.get(f"{sim.url}/api/v0/models/pub/small").json()["state"] == "loaded"


def test_stop_is_prompt_even_with_a_request_in_progress():
    sim = SimServer(SimConfig(models=TINY, preloaded=["pub/small"], speed=1.0, ttft_seconds=30)).start()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(lambda: chat(sim.url, "pub/small"))
        wait_for(lambda: sim.model_stats("pub/small")["in_flight"] == 1, 5)
        t = time.monotonic()
        sim.stop()
        assert time.monotonic() - t < 3
        with pytest.raises(httpx.TransportError):
            fut.result()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{sim.url}/v1/models")


# ---------------------------------------------------------------- as the fixtures say (tests/fixtures/lmstudio)

ETERNAL = [ModelSpec("the-eternal@f16", 2 * GB, parallel=2), ModelSpec("the-eternal@q8_0", 1 * GB, parallel=2),
           ModelSpec("sim/other", 1 * GB, quantization="Q4_K_M", bits_per_weight=4)]


def load(url: str, model: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/models/load", json={"model": model, **extra}, timeout=10)


def v1_entry(url: str, key: str) -> dict:
    return {m["key"]: m for m in httpx.get(f"{url}/api/v1/models").json()["models"]}[key]


def test_v1_listing_has_the_documented_fields(make_sim):
    sim = make_sim(preloaded=["pub/small"])
    documented = fixture("lmstudio", "v1_models")["models"][0]
    entry = v1_entry(sim.url, "pub/small")
    assert set(entry) == set(documented)
    # `num_experts` is for MoE models only (docs list.md)
    assert set(entry["loaded_instances"][0]["config"]) == set(documented["loaded_instances"][0]["config"]) - {
        "num_experts"}
    assert entry["variants"] == ["pub/small@f16"] and entry["selected_variant"] == "pub/small@f16"


def test_specs_become_one_key_with_variants_first_selected(make_sim):
    sim = make_sim(models=ETERNAL)
    keys = [m["key"] for m in httpx.get(f"{sim.url}/api/v1/models").json()["models"]]
    assert keys == ["the-eternal", "sim/other"]
    eternal, other = v1_entry(sim.url, "the-eternal"), v1_entry(sim.url, "sim/other")
    assert eternal["variants"] == ["the-eternal@f16", "the-eternal@q8_0"]
    assert eternal["selected_variant"] == "the-eternal@f16"
    assert (eternal["quantization"]["name"], eternal["size_bytes"]) == ("F16", 2 * GB)
    assert other["variants"] == ["sim/other@q4_k_m"] and other["quantization"]["name"] == "Q4_K_M"
    with pytest.raises(ValueError, match="both LM Studio variant 'x@f16'"):
        SimServer(SimConfig(models=[ModelSpec("x", GB), ModelSpec("x@f16", GB)]))


def test_rest_load_takes_keys_and_refuses_variants(make_sim):
    sim = make_sim(models=ETERNAL)
    documented = fixture("lmstudio", "v1_load_variant_model_not_found")
    for variant in ("the-eternal@f16", "the-eternal@q8_0"):      # the selected one too (#1462)
        r = load(sim.url, variant)
        assert r.status_code == 404
        assert r.json() == {"error": {"type": documented["error"]["type"],
                                      "message": f"Model {variant} not found in downloaded models"}}
    assert sim.model_stats("the-eternal@f16")["load_requests"] == 0
    r = load(sim.url, "the-eternal", echo_load_config=True)
    documented = fixture("lmstudio", "v1_load_response")
    assert r.status_code == 200 and set(r.json()) == set(documented)
    assert set(r.json()["load_config"]) == set(documented["load_config"]) - {"num_experts"}   # MoE only
    assert r.json()["instance_id"] == "the-eternal"
    assert sim.model_stats("the-eternal@f16")["loads"] == 1 and sim.model_stats("the-eternal@q8_0")["loads"] == 0


def test_second_load_is_key_2_and_listed_by_instance_id(make_sim):
    sim = make_sim(models=ETERNAL)
    assert [load(sim.url, "the-eternal").json()["instance_id"] for _ in range(2)] == ["the-eternal", "the-eternal:2"]
    assert [i["id"] for i in v1_entry(sim.url, "the-eternal")["loaded_instances"]] == ["the-eternal", "the-eternal:2"]
    documented = fixture("lmstudio", "openai_models_instances")["data"][0]
    nojit = make_sim(models=ETERNAL, jit=False)
    for _ in range(2):
        load(nojit.url, "the-eternal")
    listed = httpx.get(f"{nojit.url}/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["the-eternal", "the-eternal:2"]
    assert all(set(m) == set(documented) and m["owned_by"] == documented["owned_by"] for m in listed)
    # with JIT on, every downloaded model is listed too (docs openai-compat/models.md)
    assert [m["id"] for m in httpx.get(f"{sim.url}/v1/models").json()["data"]] == [
        "the-eternal", "sim/other", "the-eternal:2"]
    r = httpx.post(f"{sim.url}/api/v1/models/unload", json={"instance_id": "the-eternal:2"})
    assert r.json() == {"instance_id": "the-eternal:2"} and set(r.json()) == set(fixture("lmstudio", "v1_unload_response"))
    assert [i["id"] for i in v1_entry(sim.url, "the-eternal")["loaded_instances"]] == ["the-eternal"]


def test_chat_by_variant_jit_loads_that_variant_under_the_key(make_sim):
    sim = make_sim(models=ETERNAL, lmstudio_auto_evict=False)
    r = chat(sim.url, "the-eternal@q8_0")
    assert r.status_code == 200 and r.json()["model"] == "the-eternal"        # the serving instance's id (#619)
    assert sim.model_stats("the-eternal@q8_0")["loads"] == 1
    # the selected variant by key: another instance of the same key
    r = chat(sim.url, "the-eternal@f16")
    assert r.json()["model"] == "the-eternal:2" and sim.model_stats("the-eternal@f16")["loads"] == 1
    assert chat(sim.url, "the-eternal:2").json()["model"] == "the-eternal:2"
    assert sim.model_stats("the-eternal@f16")["served"] == 2


def test_jit_auto_evict_keeps_one_jit_model_and_spares_rest_loads(make_sim):
    sim = make_sim(models=ETERNAL)
    assert load(sim.url, "sim/other").status_code == 200          # not JIT: "not affected"
    assert chat(sim.url, "the-eternal@q8_0").status_code == 200
    assert chat(sim.url, "the-eternal@f16").status_code == 200    # JIT-loads another model: evicts q8_0
    loaded = {i.key for i in sim.engine.instances() if i.state == "loaded"}
    assert loaded == {"sim/other", "the-eternal@f16"}
    assert sim.stats()["memory"]["evictions"] == 1
    keep = make_sim(models=ETERNAL, lmstudio_auto_evict=False)
    chat(keep.url, "the-eternal@q8_0")
    chat(keep.url, "the-eternal@f16")
    assert {i.key for i in keep.engine.instances()} == {"the-eternal@q8_0", "the-eternal@f16"}


def test_jit_auto_evict_cuts_a_generating_model(make_sim):
    """#671: JIT-loading a new model evicts the previous JIT model even while it generates."""
    sim = make_sim(models=ETERNAL, speed=1.0, seconds_per_gb=0.0, load_overhead_seconds=0.0, ttft_seconds=0.0,
                   per_token_seconds=0.05, reply_tokens=200)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(chat, sim.url, "the-eternal@q8_0")
        wait_for(lambda: sim.model_stats("the-eternal@q8_0")["in_flight"] == 1, 5, message="q8_0 generating")
        assert chat(sim.url, "sim/other", max_tokens=1).status_code == 200
        with pytest.raises(httpx.TransportError):
            slow.result(timeout=10)
    assert sim.model_stats("the-eternal@q8_0")["failed"] == 1


def test_jit_idle_ttl_unloads_only_jit_models(make_sim):
    sim = make_sim(models=ETERNAL, lmstudio_jit_ttl_seconds=0.3, lmstudio_auto_evict=False)
    load(sim.url, "sim/other")
    chat(sim.url, "the-eternal@f16")

    def loaded(server: SimServer) -> list[str]:
        return [i["id"] for m in httpx.get(f"{server.url}/api/v1/models").json()["models"]
                for i in m["loaded_instances"]]
    assert loaded(sim) == ["the-eternal", "sim/other"]
    wait_for(lambda: loaded(sim) == ["sim/other"], 5, message="the JIT model's idle TTL")
    never = make_sim(models=ETERNAL, lmstudio_jit_ttl_seconds=None)
    chat(never.url, "the-eternal@f16")
    assert never.flavour.expire_idle_jit() == 0 and loaded(never) == ["the-eternal"]


def test_v0_lists_only_loaded_models_without_jit(make_sim):
    sim = make_sim(jit=False, preloaded=["pub/big"])
    assert [m["id"] for m in httpx.get(f"{sim.url}/api/v0/models").json()["data"]] == ["pub/big"]


def test_missing_token_gets_lm_studios_401_body(make_sim):
    sim = make_sim(api_token="sk-lm-test:secret")
    r = httpx.get(f"{sim.url}/api/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.json()["error"]["message"].startswith("An LM Studio API token is required")
