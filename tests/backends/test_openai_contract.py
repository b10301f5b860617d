"""The generic OpenAI-compatible kind: the OpenAI API's own `GET /models` answer (tests/fixtures/openai/) parsed
by OpenAICompatBackend over loopback HTTP, and its naming rules."""

from __future__ import annotations

import pytest

from aibot.backends import Timeouts, Unsupported, make_backend
from aibot.backends.base import Catalogue, LoadedModel, find
from aibot.backends.openai_compat import OpenAICompatBackend
from tests.backends.canned_server import CannedServer, fixture

FAST = Timeouts(connect=1, read=2, total=3, control=3, load=3, probe_connect=0.5, probe_total=1)


@pytest.fixture
def server():
    s = CannedServer()
    yield s
    s.stop()


@pytest.fixture
def backend(server):
    b = make_backend("openai", server.url, timeouts=FAST, default_parallel=3)
    yield b
    b.close()


def test_kind_declares_its_attributes():
    assert (OpenAICompatBackend.can_load, OpenAICompatBackend.model_id_template) == (False, "{base}@{quant}")
    assert OpenAICompatBackend.default_port is None      # no standard port: configs give one


def test_catalogue_from_the_documented_listing(server, backend):
    server.answer("GET", "/v1/models", fixture("openai", "models_list"))
    cat = backend.catalogue()
    assert not cat.complete and cat.max_loaded is None
    [entry] = cat.models
    assert (entry.key, entry.status, entry.names) == ("id", "loaded", ())
    assert entry.instances == (LoadedModel(key="id", parallel=3, model="id"),)
    assert backend.list_loaded() == list(entry.instances)
    assert backend.identify("id", cat) is entry
    assert find(backend, "other", cat, "srv").key == "other"   # incomplete listing: maybe servable


def test_load_only_finds_a_listed_model(server, backend):
    server.answer("GET", "/v1/models", fixture("openai", "models_list"))
    assert backend.load("id").key == "id"
    with pytest.raises(Unsupported, match="it lists: id"):
        backend.load("not/listed")
    assert server.sent("POST", "/v1/chat/completions") == []


def entries(backend, *ids):
    return Catalogue(tuple(backend.listed_entry(i) for i in ids), complete=False)


@pytest.mark.parametrize("ids, wanted, key", [
    (["meta-llama/Llama-3.1-8B-Instruct"], "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    (["meta-llama/Llama-3.1-8B-Instruct"], "Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    (["Llama-3.1-8B-Instruct"], "meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"),
    (["a/x", "b/x"], "x", None),                     # ambiguous
    (["a/x", "b/x"], "b/x", "b/x"),
    (["a/x"], "b/x", None),                          # another publisher's upload is another model
    (["qwen/qwen3.6-27b", "qwen3.6-27b"], "qwen3.6-27b", "qwen3.6-27b"),   # both listed (#2024): exact wins
    (["m"], "M", None),
])
def test_identify_exact_then_unique_publisher_less(backend, ids, wanted, key):
    found = backend.identify(wanted, entries(backend, *ids))
    assert (found.key if found else None) == key
