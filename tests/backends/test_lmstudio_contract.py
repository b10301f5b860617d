"""LM Studio's own payloads (tests/fixtures/lmstudio/, each citing its source) parsed by LMStudioBackend over
loopback HTTP: catalogue per API level, identity rules, load adoption and refusal typing, unload by instance."""

from __future__ import annotations

import pytest

from aibot.backends import Timeouts, make_backend
from aibot.backends.base import (
    Catalogue,
    InsufficientResources,
    LoadedModel,
    LoadFailed,
    ModelUnavailable,
    find,
)
from aibot.backends.lmstudio import JIT_IDLE_TTL_SECONDS, LMStudioBackend
from tests.backends.canned_server import CannedServer, fixture

FAST = Timeouts(connect=1, read=2, total=3, control=3, load=3, probe_connect=0.5, probe_total=1)
GEMMA = "google/gemma-4-26b-a4b"
MISTRAL = "mistralai/mistral-small-3.2"


@pytest.fixture
def server():
    s = CannedServer()
    yield s
    s.stop()


@pytest.fixture
def backend(server):
    b = make_backend("lmstudio", server.url, timeouts=FAST, default_parallel=2)
    yield b
    b.close()


def v1(server, *extra_models):
    server.answer("GET", "/api/v1/models", {"models": [*fixture("lmstudio", "v1_models")["models"], *extra_models]})


def mistral_entry():
    """The #1462 entry with the two fields its issue text states (see the fixture's note)."""
    entry = dict(fixture("lmstudio", "v1_model_multi_variant_1462"))
    entry.update(variants=[f"{MISTRAL}@q4_k_m", f"{MISTRAL}@q8_0"], selected_variant=f"{MISTRAL}@q8_0",
                 loaded_instances=[])
    return entry


def only_older_levels(server, *, v0=True):
    """LM Studio answers paths it does not serve with 200 "Unexpected endpoint" (#618)."""
    unexpected = fixture("lmstudio", "unexpected_endpoint")
    server.answer("GET", "/api/v1/models", unexpected)
    if not v0:
        server.answer("GET", "/api/v0/models", unexpected)


def test_kind_declares_its_attributes():
    assert (LMStudioBackend.can_load, LMStudioBackend.model_id_template, LMStudioBackend.default_port) == \
        (True, "{base}@{quant}", 1234)


# ---------------------------------------------------------------- v1 catalogue


def test_v1_catalogue_from_the_documented_listing(server, backend):
    v1(server)
    cat = backend.catalogue()
    assert backend.api_level == "v1" and cat.complete and cat.max_loaded is None
    gemma, deepseek, nomic = cat.models
    assert gemma.key == GEMMA and gemma.status == "loaded"
    assert set(gemma.names) == {f"{GEMMA}@q4_k_m", "gemma-4-26b-a4b", "gemma-4-26b-a4b@q4_k_m"}
    assert (gemma.size_bytes, gemma.max_context_length) == (17990911801, 262144)
    assert gemma.instances == (LoadedModel(key=GEMMA, size_bytes=17990911801, parallel=4, context_length=4096,
                                           model=GEMMA),)
    assert gemma.instances[0].ttl_seconds is None          # REST-loaded: no idle TTL
    assert (deepseek.key, deepseek.status, deepseek.instances, deepseek.names) == ("deepseek-r1", "unloaded", (), ())
    assert (nomic.key, nomic.size_bytes, nomic.max_context_length) == (
        "text-embedding-nomic-embed-text-v1.5-embedding", 274290560, 2048)
    assert backend.list_loaded() == list(gemma.instances)


@pytest.mark.parametrize("wanted, key", [
    (GEMMA, GEMMA),                                    # the key
    (f"{GEMMA}@q4_k_m", GEMMA),                        # the selected variant
    (f"{GEMMA}@Q4_K_M", GEMMA),                        # ... written as the UI shows the quantization
    ("gemma-4-26b-a4b", GEMMA),                        # publisher only on the server's side
    ("gemma-4-26b-a4b@q4_k_m", GEMMA),
    ("deepseek-r1", "deepseek-r1"),
    ("deepseek/deepseek-r1", "deepseek-r1"),           # publisher only on the config's side
    (f"{GEMMA}:2", GEMMA),                             # an instance id of the entry (gone or not)
    ("other/gemma-4-26b-a4b", None),                   # another publisher's upload
    (f"{GEMMA}@q8_0", None),                           # a variant the entry does not have
    ("GOOGLE/gemma-4-26b-a4b", None),                  # keys are identifiers: exact
    ("", None),
])
def test_identify_by_lm_studio_names(server, backend, wanted, key):
    v1(server)
    found = backend.identify(wanted, backend.catalogue())
    assert (found.key if found else None) == key


def test_identify_is_none_when_two_entries_fit(backend):
    cat = Catalogue((backend._v1_entry({"key": "a/x"}), backend._v1_entry({"key": "b/x"})))
    assert backend.identify("x", cat) is None
    assert backend.identify("a/x", cat).key == "a/x"


def test_a_lone_variant_is_the_selected_one_when_the_listing_omits_it(backend):
    cat = Catalogue((backend._v1_entry({"key": "k", "variants": ["k@q4_0"]}),))
    assert backend.identify("k@q4_0", cat).key == "k"


def test_unknown_name_lists_what_the_server_offers(server, backend):
    v1(server)
    with pytest.raises(ModelUnavailable, match="offers no model named 'nope'.*deepseek-r1") as info:
        find(backend, "nope", backend.catalogue(), "lm1")
    assert info.value.permanent


def test_selected_variant_identifies_and_loads_by_key(server, backend):
    v1(server, mistral_entry())
    server.answer("POST", "/api/v1/models/load", fixture("lmstudio", "v1_load_response"))
    cat = backend.catalogue()
    assert backend.identify(f"{MISTRAL}@q8_0", cat).key == MISTRAL
    backend.load(f"{MISTRAL}@q8_0")
    assert server.sent("POST", "/api/v1/models/load") == [{"model": MISTRAL, "echo_load_config": True}]


def test_other_variant_is_found_but_refused_without_a_load(server, backend):
    v1(server, mistral_entry())
    found = backend.identify(f"{MISTRAL}@q4_k_m", backend.catalogue())
    assert found.key == f"{MISTRAL}@q4_k_m" and found.status == "unloaded" and not found.instances
    assert "cannot pick variant" in found.detail
    with pytest.raises(ModelUnavailable) as info:
        backend.load(f"{MISTRAL}@q4_k_m")
    assert info.value.permanent
    assert f"'{MISTRAL}@q4_k_m' of '{MISTRAL}' (selected: '{MISTRAL}@q8_0'" in str(info.value)
    assert server.sent("POST", "/api/v1/models/load") == []


# ---------------------------------------------------------------- v1 load and unload


def test_load_adopts_a_loaded_instance(server, backend):
    v1(server)
    assert backend.load(f"{GEMMA}@q4_k_m").key == GEMMA
    assert server.sent("POST", "/api/v1/models/load") == []     # a second load would add `:2` (#168, #1582)


def test_load_sends_the_key_only_and_reads_the_documented_answer(server, backend):
    v1(server)
    server.answer("POST", "/api/v1/models/load", fixture("lmstudio", "v1_load_response"))
    inst = backend.load("deepseek-r1", context_length=16384, parallel=3)
    assert server.sent("POST", "/api/v1/models/load") == [
        {"model": "deepseek-r1", "echo_load_config": True, "context_length": 16384}]    # never `parallel` (#2024)
    # the canned listing does not show the new instance, so it is built from the answer's instance_id/load_config
    assert (inst.key, inst.context_length, inst.model, inst.size_bytes) == (
        "openai/gpt-oss-20b", 16384, "deepseek-r1", 40492610355)


@pytest.mark.parametrize("status", [404, 400, 200])
def test_model_not_found_is_permanent(server, backend, status):
    v1(server)
    server.answer("POST", "/api/v1/models/load", fixture("lmstudio", "v1_load_variant_model_not_found"), status)
    with pytest.raises(ModelUnavailable) as info:
        backend.load("deepseek-r1")
    assert info.value.permanent and info.value.scope == "request"
    assert "not found in downloaded models" in str(info.value) and "model_not_found" in str(info.value)


@pytest.mark.parametrize("status", [500, 400, 200])
def test_guardrail_refusal_is_insufficient_resources(server, backend, status):
    v1(server)
    body = {"error": {"type": "model_load_failed", "message": fixture("lmstudio", "guardrail_refusal_message")}}
    server.answer("POST", "/api/v1/models/load", body, status)
    with pytest.raises(InsufficientResources) as info:
        backend.load("deepseek-r1")
    assert info.value.server_fault and "273.25 GB" in str(info.value)


@pytest.mark.parametrize("status", [500, 400, 200])
def test_model_load_failed_is_a_load_failure_of_that_model(server, backend, status):
    v1(server)
    server.answer("POST", "/api/v1/models/load", fixture("lmstudio", "v1_load_failed"), status)
    with pytest.raises(LoadFailed) as info:
        backend.load("deepseek-r1")
    err = info.value
    assert err.scope == "model" and not err.permanent and not err.server_fault
    assert "Error loading model. (Exit code: null)" in str(err) and "#2295" in str(err)


def test_unload_sends_exactly_that_instance(server, backend):
    v1(server)
    server.answer("POST", "/api/v1/models/unload", fixture("lmstudio", "v1_unload_response"))
    backend.unload(f"{GEMMA}:2")                      # not loaded: nothing to do
    assert server.sent("POST", "/api/v1/models/unload") == []
    backend.unload(GEMMA)
    assert server.sent("POST", "/api/v1/models/unload") == [{"instance_id": GEMMA}]


# ---------------------------------------------------------------- older levels: JIT


def test_v0_catalogue_from_the_documented_listing(server, backend):
    only_older_levels(server)
    server.answer("GET", "/api/v0/models", fixture("lmstudio", "v0_models"))
    cat = backend.catalogue()
    assert backend.api_level == "v0" and cat.complete and cat.max_loaded == 1    # JIT Auto-Evict
    assert [(m.key, m.status, m.max_context_length) for m in cat.models] == [
        ("qwen2-vl-7b-instruct", "unloaded", 32768), ("meta-llama-3.1-8b-instruct", "unloaded", 131072),
        ("text-embedding-nomic-embed-text-v1.5", "unloaded", 2048)]
    assert cat.instances() == []


def test_v0_loaded_model_has_the_jit_ttl(server, backend):
    only_older_levels(server)
    server.answer("GET", "/api/v0/models", fixture("lmstudio", "v0_models_loaded"))
    [inst] = backend.catalogue().instances()
    assert inst == LoadedModel(key="gemma-3-4b-it", parallel=2, context_length=4096, model="gemma-3-4b-it",
                               ttl_seconds=JIT_IDLE_TTL_SECONDS)


def test_v0_load_is_a_one_token_jit_chat(server, backend):
    only_older_levels(server)
    server.answer("GET", "/api/v0/models", fixture("lmstudio", "v0_models"))
    server.answer("POST", "/v1/chat/completions", {"choices": [{"message": {"content": "h"}, "finish_reason": "length"}]})
    inst = backend.load("meta-llama-3.1-8b-instruct")
    [body] = server.sent("POST", "/v1/chat/completions")
    assert (body["model"], body["max_tokens"]) == ("meta-llama-3.1-8b-instruct", 1)
    assert inst.key == "meta-llama-3.1-8b-instruct" and inst.ttl_seconds == JIT_IDLE_TTL_SECONDS
    with pytest.raises(ModelUnavailable):
        backend.load("not-downloaded")               # v0 lists downloaded models: the name is unknown


def test_openai_level_folds_instance_ids_into_their_model(server, backend):
    only_older_levels(server, v0=False)
    server.answer("GET", "/v1/models", fixture("lmstudio", "openai_models_instances"))
    cat = backend.catalogue()
    assert backend.api_level == "openai" and not cat.complete and cat.max_loaded == 1
    [entry] = cat.models
    assert entry.key == "llama-3.2-1b-instruct"
    assert [(i.key, i.model, i.ttl_seconds) for i in entry.instances] == [
        ("llama-3.2-1b-instruct:2", "llama-3.2-1b-instruct", JIT_IDLE_TTL_SECONDS)]
    assert backend.identify("llama-3.2-1b-instruct:2", cat) is entry
    assert find(backend, "elsewhere", cat, "lm1").key == "elsewhere"    # incomplete: not known to be unknown
