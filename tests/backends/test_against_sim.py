"""Every backend against the simulator (aibot.sim) over loopback HTTP: listing, load control, chat,
streaming, health, typed errors from injected faults, LM Studio's API-level fallback and bearer tokens."""

from __future__ import annotations

import time

import pytest

from tests.support.waiting import wait_for

pytest.importorskip("aibot.sim.server")

from aibot.backends import (  # noqa: E402
    BadResponse,
    ChatRequest,
    InsufficientResources,
    ModelNotLoaded,
    ServerFault,
    Timeout,
    Timeouts,
    Unauthorized,
    Unreachable,
    Unsupported,
    make_backend,
)
from aibot.backends.base import ContextOverflow, LoadFailed, ModelUnavailable  # noqa: E402
from aibot.backends.base import ModelUnavailable, find  # noqa: E402
from aibot.backends.ollama import OllamaBackend  # noqa: E402
from aibot.sim.catalog import GB, ModelSpec  # noqa: E402
from aibot.sim.config import SimConfig  # noqa: E402
from aibot.sim.server import SimServer  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

FAST = Timeouts(connect=1, read=2, total=3, control=3, load=10, probe_connect=0.5, probe_total=1)
TINY = "sim/tiny-1"
MODELS = [ModelSpec(TINY, 1 * GB, parallel=4, context_length=4096),
          ModelSpec("sim/tiny-2", 2 * GB, parallel=2, context_length=8192),
          ModelSpec("sim/big", 40 * GB, parallel=4)]


def req(model=TINY, **params):
    return ChatRequest(model=model, messages=[{"role": "user", "content": "hello"}],
                       params={"max_tokens": 8, **params}, stop=["\n\n"])


@pytest.fixture
def sim():
    started = []

    def start(api="lmstudio", *, token=None, timeouts=FAST, default_parallel=1, max_loaded_models=None, **config):
        config.setdefault("speed", 0.001)
        config.setdefault("models", MODELS)
        config.setdefault("preloaded", [TINY] if api != "openai" else [])
        server = SimServer(SimConfig(api=api, **config)).start()
        backend = make_backend(api, server.url, token=token, timeouts=timeouts, default_parallel=default_parallel)
        if max_loaded_models is not None:      # the server config's maxLoadedModels (Ollama does not report it)
            backend = OllamaBackend(server.url, token=token, timeouts=timeouts, default_parallel=default_parallel,
                                    max_loaded_models=max_loaded_models)
        started.append((server, backend))
        return server, backend

    yield start
    for server, backend in started:
        backend.close()
        server.stop()


# ---------------------------------------------------------------- the happy path, per kind

@pytest.mark.parametrize("api", ["lmstudio", "llamacpp", "llamacpp-router", "ollama", "openai"])
def test_health_chat_and_stream(sim, api):
    _, b = sim(api)
    assert b.health().healthy
    result = b.chat(req())
    assert result.text and result.finish_reason in ("stop", "length")
    assert result.completion_tokens and result.completion_tokens <= 8
    assert "".join(b.chat_stream(req())).strip()


def test_lmstudio_v1_list_load_unload(sim):
    server, b = sim("lmstudio")
    [tiny] = b.list_loaded()
    assert (tiny.key, tiny.size_bytes, tiny.parallel, tiny.context_length) == (TINY, 1 * GB, 4, 4096)
    loaded = b.load("sim/tiny-2", context_length=2048, parallel=3)
    assert (loaded.key, loaded.size_bytes, loaded.parallel, loaded.context_length) == ("sim/tiny-2", 2 * GB, 2, 2048)
    assert {m.key for m in b.list_loaded()} == {TINY, "sim/tiny-2"}
    b.unload("sim/tiny-2")
    assert [m.key for m in b.list_loaded()] == [TINY]
    b.unload("sim/tiny-2")            # not loaded: a no-op
    assert b.api_level == "v1"
    assert "/api/v1/models/load" in str(server.stats()["requests"]["by_endpoint"])


def test_lmstudio_out_of_memory_load_is_a_load_failure_of_that_model(sim):
    """The generic `model_load_failed` (#2295) backs off the (server, model) pair, not the server."""
    _, b = sim("lmstudio", memory_bytes=10 * GB)
    with pytest.raises(LoadFailed) as info:
        b.load("sim/big")
    assert info.value.scope == "model" and not info.value.server_fault and "model_load_failed" in str(info.value)


def test_lmstudio_guardrail_refusal_is_insufficient_resources(sim):
    _, b = sim("lmstudio", memory_bytes=10 * GB, lmstudio_load_failure="guardrail")
    with pytest.raises(InsufficientResources) as info:
        b.load("sim/big")
    assert info.value.server_fault


ETERNAL = [ModelSpec("the-eternal@f16", 2 * GB, parallel=4), ModelSpec("the-eternal@q8_0", 1 * GB, parallel=4)]


def test_lmstudio_configured_variant_loads_by_key_and_is_adopted(sim):
    server, b = sim("lmstudio", models=ETERNAL, preloaded=[])
    cat = b.catalogue()
    [entry] = cat.models
    assert (entry.key, entry.status) == ("the-eternal", "unloaded")
    assert b.identify("the-eternal@f16", cat) is entry
    inst = b.load("the-eternal@f16")
    assert (inst.key, inst.model, inst.size_bytes, inst.parallel) == ("the-eternal", "the-eternal", 2 * GB, 4)
    assert b.load("the-eternal").key == "the-eternal"            # adopted: no `the-eternal:2`
    assert server.model_stats("the-eternal@f16")["load_requests"] == 1
    assert [i.key for i in b.list_loaded()] == ["the-eternal"]
    chat = b.chat(req(inst.key))
    assert chat.text and chat.model == "the-eternal"


def test_lmstudio_other_variant_is_unavailable_without_a_load(sim):
    server, b = sim("lmstudio", models=ETERNAL, preloaded=[])
    with pytest.raises(ModelUnavailable, match="cannot pick variant 'the-eternal@q8_0'") as info:
        b.load("the-eternal@q8_0")
    assert info.value.permanent
    assert server.model_stats("the-eternal@q8_0")["load_requests"] == 0
    assert "POST /api/v1/models/load" not in server.stats()["requests"]["by_endpoint"]


def test_lmstudio_unload_takes_exactly_one_instance(sim):
    import httpx

    server, b = sim("lmstudio", models=ETERNAL, preloaded=["the-eternal@f16"])
    assert httpx.post(f"{server.url}/api/v1/models/load", json={"model": "the-eternal"}).json()["instance_id"] == \
        "the-eternal:2"
    [entry] = b.catalogue().models
    assert [i.key for i in entry.instances] == ["the-eternal", "the-eternal:2"]
    b.unload("the-eternal:2")
    assert [i.key for i in b.list_loaded()] == ["the-eternal"]
    b.unload("the-eternal@f16")                              # not an instance id: nothing unloaded
    assert [i.key for i in b.list_loaded()] == ["the-eternal"]


def test_lmstudio_jit_levels_declare_ttl_and_auto_evict(sim):
    server, b = sim("lmstudio", lmstudio_version="0.3")
    b.load("sim/tiny-2")
    cat = b.catalogue()
    assert cat.max_loaded == 1
    assert {(i.key, i.ttl_seconds) for i in cat.instances()} == {(TINY, 3600), ("sim/tiny-2", 3600)}
    b.load("sim/big")          # a second JIT load: LM Studio evicts the previous JIT model (tiny-2)
    assert {i.key for i in b.list_loaded()} == {TINY, "sim/big"}


def test_lmstudio_model_not_loaded_without_jit(sim):
    _, b = sim("lmstudio", jit=False)
    with pytest.raises(ModelNotLoaded) as info:
        b.chat(req("sim/tiny-2"))
    assert not info.value.server_fault


@pytest.mark.parametrize("unknown_status", [404, 200])
@pytest.mark.parametrize("version,level", [("0.4", "v1"), ("0.3", "v0"), ("openai-only", "openai")])
def test_lmstudio_api_level_fallback(sim, version, level, unknown_status):
    server, b = sim("lmstudio", lmstudio_version=version, unknown_endpoint_status=unknown_status,
                    default_parallel=2)
    loaded = b.list_loaded()
    assert b.api_level == level
    keys = {m.key for m in loaded}
    if level == "openai":
        assert keys == {m.key for m in MODELS}             # JIT lists everything; all count as loaded
    else:
        assert keys == {TINY}
    if level != "v1":
        assert all(m.parallel == 2 for m in loaded)       # no parallel reported: default_parallel
    # The level is remembered: a second listing asks one path only.
    before = dict(server.stats()["requests"]["by_endpoint"])
    b.list_loaded()
    after = server.stats()["requests"]["by_endpoint"]
    asked = {k for k in after if after[k] != before.get(k)}
    assert len(asked) == 1
    assert b.health().healthy


def test_lmstudio_old_api_loads_by_jit_and_cannot_unload(sim):
    _, b = sim("lmstudio", lmstudio_version="0.3")
    assert b.load("sim/tiny-2").key == "sim/tiny-2"
    assert {m.key for m in b.list_loaded()} == {TINY, "sim/tiny-2"}
    with pytest.raises(Unsupported, match="0.4"):
        b.unload("sim/tiny-2")


def test_llamacpp_single_model(sim):
    _, b = sim("llamacpp")
    [m] = b.list_loaded()
    assert (m.key, m.parallel, m.context_length) == (TINY, 4, 1024)     # -c 4096 over 4 slots
    cat = b.catalogue()
    assert [(o.key, o.status, o.size_bytes) for o in cat.models] == [(TINY, "loaded", 1 * GB)]
    assert b.load(TINY).key == TINY
    with pytest.raises(ModelUnavailable) as info:
        b.load("sim/tiny-2")                       # never servable here, whatever is retried
    assert info.value.permanent and TINY in str(info.value)
    with pytest.raises(Unsupported):
        b.unload(TINY)
    assert b.tokenize(TINY, "hello world, how are you") > b.tokenize(TINY, "hello") > 0


def test_llamacpp_router_load_unload(sim):
    _, b = sim("llamacpp-router")
    assert [(m.key, m.state, m.parallel) for m in b.list_loaded()] == [(TINY, "loaded", 4)]
    loaded = b.load("sim/tiny-2")
    assert (loaded.key, loaded.state, loaded.parallel, loaded.context_length) == ("sim/tiny-2", "loaded", 2, 4096)
    assert b.load("sim/tiny-2").key == "sim/tiny-2"           # already loaded: adopted
    b.unload("sim/tiny-2")
    assert [m.key for m in b.list_loaded()] == [TINY]
    entry = b.identify("sim/tiny-2", b.catalogue())
    assert entry.status == "unloaded" and entry.size_bytes == 2 * GB    # remembered from when it ran
    b.unload("sim/tiny-2")                                     # not loaded: no-op
    with pytest.raises(ModelUnavailable):
        b.load("no/such-model")
    assert b.tokenize("sim/tiny-2", "a few words here") is None         # not running: never loaded for this
    assert b.tokenize(TINY, "a few words here") == 4


def test_llamacpp_router_waits_for_a_slow_load(sim):
    _, b = sim("llamacpp-router", speed=0.02)      # a 2 GB load now takes about 0.1 s
    b.poll_interval = 0.01
    assert b.load("sim/tiny-2").state == "loaded"


def test_llamacpp_router_failed_load_is_load_failed_in_under_a_second(sim):
    server, b = sim("llamacpp-router", broken_models=["sim/tiny-2"], speed=1.0, load_overhead_seconds=0.17)
    t = time.monotonic()
    with pytest.raises(LoadFailed) as info:
        b.load("sim/tiny-2")
    assert time.monotonic() - t < 1.5                    # not the 10 s load timeout
    assert info.value.scope == "model" and "exited with code 1" in str(info.value)
    assert b.identify("sim/tiny-2", b.catalogue()).status == "failed"
    assert b.chat(req()).text                            # the router's other model is fine


def test_llamacpp_router_sees_autoload_models_max_and_sleep(sim):
    server, b = sim("llamacpp-router", models_max=2, sleep_idle_seconds=0.05, speed=0.01)
    assert b.catalogue().max_loaded == 2
    assert b.chat(req("sim/tiny-2")).text                # autoload: the router loads it for the chat
    assert {m.key for m in b.list_loaded()} == {TINY, "sim/tiny-2"}

    def both_asleep():
        asleep = [m for m in b.list_loaded() if m.state == "sleeping"]
        return asleep if len(asleep) == 2 else None

    sleeping = wait_for(both_asleep, 5)
    assert {m.key for m in sleeping} == {TINY, "sim/tiny-2"}
    assert all(m.parallel and m.context_length for m in sleeping)     # from /props, which does not wake
    assert server.model_stats(TINY)["wakes"] == 0
    b.load("sim/big")                                    # a third model: the least recently used goes
    assert {m.key for m in b.list_loaded()} == {"sim/tiny-2", "sim/big"}
    assert server.stats()["memory"]["evictions"] == 1


def test_llamacpp_router_one_models_slots_failing_degrades_only_that_entry(sim):
    server, b = sim("llamacpp-router", preloaded=[TINY, "sim/tiny-2"], faults={"scope": "all"})
    server.set_faults(script=["none", "error"])          # the listing passes, then TINY's /props?model= fails
    cat = b.catalogue()
    tiny, other = b.identify(TINY, cat), b.identify("sim/tiny-2", cat)
    assert "GET /props failed" in tiny.detail and tiny.status == "loaded" and tiny.instances
    assert other.detail is None and other.instances[0].parallel == 2


@pytest.mark.parametrize("api", ["llamacpp", "llamacpp-router"])
def test_llamacpp_prompt_longer_than_the_slot_is_context_overflow(sim, api):
    server, b = sim(api)
    long = ChatRequest(model=TINY, messages=[{"role": "user", "content": "word " * 1100}], params={"max_tokens": 8})
    with pytest.raises(ContextOverflow, match="1024 per slot") as info:
        b.chat(long)
    assert not info.value.server_fault and info.value.scope == "request"
    with pytest.raises(ContextOverflow):
        list(b.chat_stream(long))
    assert server.model_stats(TINY)["rejected"] == 2


def test_ollama_catalogue_names_sizes_and_identity(sim):
    _, b = sim("ollama", default_parallel=3)
    cat = b.catalogue()
    assert [(m.key, m.status, m.size_bytes) for m in cat.models] == [
        ("sim/tiny-1:latest", "loaded", 1 * GB), ("sim/tiny-2:latest", "unloaded", 2 * GB),
        ("sim/big:latest", "unloaded", 40 * GB)]
    [m] = b.list_loaded()
    assert (m.key, m.model, m.size_bytes, m.parallel, m.context_length, m.ttl_seconds) == (
        "sim/tiny-1:latest", "sim/tiny-1:latest", 1 * GB, 3, 4096, None)        # preloaded = pinned
    assert b.identify("sim/tiny-2", cat).key == "sim/tiny-2:latest"
    assert b.identify("SIM/Tiny-2:latest", cat).key == "sim/tiny-2:latest"
    assert b.identify("tiny-2", cat) is None                  # library/tiny-2 is another model
    with pytest.raises(ModelUnavailable, match="sim/tiny-2:latest"):
        find(b, "tiny-2", cat, "oll")


def test_ollama_load_pins_and_unload_removes_exactly_that_model(sim):
    server, b = sim("ollama")
    loaded = b.load("sim/tiny-2:latest", context_length=2048)
    assert (loaded.key, loaded.size_bytes, loaded.context_length, loaded.ttl_seconds) == (
        "sim/tiny-2:latest", 2 * GB, 8192, None)                # num_ctx is not sent: the model's default
    assert b.load("sim/tiny-2").key == "sim/tiny-2:latest"     # adopted, not loaded twice
    assert server.model_stats("sim/tiny-2")["loads"] == 1
    b.unload("sim/tiny-2:latest")
    assert [m.key for m in b.list_loaded()] == ["sim/tiny-1:latest"]
    b.unload("sim/tiny-2:latest")                              # not loaded: a no-op


def test_ollama_refusals_are_typed(sim):
    _, b = sim("ollama", memory_bytes=10 * GB)
    with pytest.raises(InsufficientResources):
        b.load("sim/big:latest")
    with pytest.raises(ModelUnavailable, match=r"installed: sim/big:latest, sim/tiny-1:latest"):
        b.load("no/such-model")
    with pytest.raises(ModelUnavailable, match="invalid model name"):
        b.load("tiny@f16")
    with pytest.raises(ModelNotLoaded):
        b.chat(req("no/such-model"))


def test_ollama_evictions_show_in_the_catalogue(sim):
    _, b = sim("ollama", ollama_max_loaded_models=2, ollama_keep_alive="2s", max_loaded_models=2)
    assert b.catalogue().max_loaded == 2                       # from the server config, not the API
    b.chat(req("sim/tiny-2"))                                  # a plain request: default keep-alive
    [timed] = [i for i in b.list_loaded() if i.key == "sim/tiny-2:latest"]
    assert timed.ttl_seconds is not None and timed.ttl_seconds <= 2
    wait_for(lambda: [i.key for i in b.list_loaded()] == ["sim/tiny-1:latest"], timeout=5,
             message="sim/tiny-2 expired by its keep-alive")
    b.load("sim/tiny-2:latest")
    b.load("sim/big:latest")                                   # a third model: OLLAMA_MAX_LOADED_MODELS=2
    cat = b.catalogue()
    assert sum(m.status == "loaded" for m in cat.models) == 2
    assert b.identify("sim/big", cat).status == "loaded"


def test_openai_has_no_load_control(sim):
    _, b = sim("openai", default_parallel=2)
    assert all(m.parallel == 2 for m in b.list_loaded())
    with pytest.raises(Unsupported):
        b.load("not/listed")
    with pytest.raises(Unsupported):
        b.unload(TINY)


def test_one_backend_serves_many_threads(sim):
    from concurrent.futures import ThreadPoolExecutor

    server, b = sim("lmstudio")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: b.chat(req()), range(32)))
    assert len(results) == 32 and all(r.text for r in results)
    assert server.stats()["requests"]["by_endpoint"]


# ---------------------------------------------------------------- injected faults

@pytest.mark.parametrize("api", ["lmstudio", "llamacpp", "ollama"])
@pytest.mark.parametrize("fault,error", [
    ("error", ServerFault), ("html", ServerFault), ("malformed", BadResponse),
    ("empty_choices", BadResponse), ("truncated", BadResponse),
])
def test_fault_typing(sim, api, fault, error):
    server, b = sim(api)
    server.set_faults(script=[fault])
    with pytest.raises(error) as info:
        b.chat(req())
    assert info.value.server_fault
    b.chat(req())   # the next request is fine


@pytest.mark.parametrize("fault", ["error", "html", "truncated", "malformed"])
def test_stream_fault_typing(sim, fault):
    server, b = sim("lmstudio")
    server.set_faults(script=[fault])
    with pytest.raises((ServerFault, BadResponse)) as info:
        list(b.chat_stream(req()))
    assert info.value.server_fault


def test_html_502_keeps_status(sim):
    server, b = sim("lmstudio")
    server.set_faults(script=["html"])
    with pytest.raises(ServerFault) as info:
        b.chat(req())
    assert info.value.status == 502 and "html" in (info.value.body or "").lower()


def test_slow_reply_is_timeout(sim):
    server, b = sim("lmstudio", timeouts=Timeouts(read=0.3, total=1))
    server.set_faults(script=["slow"], slow_seconds=5)
    with pytest.raises(Timeout):
        b.chat(req())


def test_outage_refuse_is_unreachable_then_recovers(sim):
    server, b = sim("lmstudio")
    server.begin_outage(seconds=None, mode="refuse")
    with pytest.raises(Unreachable):
        b.chat(req())
    assert not b.health().healthy
    server.end_outage()
    assert b.health().healthy
    assert b.chat(req()).text


def test_outage_503_is_server_fault(sim):
    server, b = sim("llamacpp")
    server.begin_outage(seconds=None, mode="503")
    with pytest.raises(ServerFault) as info:
        b.chat(req())
    assert info.value.status == 503
    health = b.health()
    assert not health.healthy
    server.end_outage()


# ---------------------------------------------------------------- bearer token

@pytest.mark.parametrize("api", ["lmstudio", "llamacpp-router", "ollama", "openai"])
def test_bearer_token(sim, api):
    token = "sk-lm-abcd1234:0123456789abcdefghij"
    server, good = sim(api, token=token, api_token=token)
    assert good.chat(req()).text
    assert good.list_loaded()
    bad = make_backend(api, server.url, token="wrong-token", timeouts=FAST)
    with pytest.raises(Unauthorized) as info:
        bad.chat(req())
    assert info.value.server_fault and "wrong-token" not in str(info.value)
    none = make_backend(api, server.url, timeouts=FAST)
    with pytest.raises(Unauthorized):
        none.list_loaded()
    bad.close()
    none.close()
