"""Server kinds come from the backend classes: a new kind is one class, and config validation, model-id
templates, placement's `can_load`, `make_backend` and the servers table all accept it with no other
module touched. The toy kind below is that one class."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from aibot.backends import make_backend, registry
from aibot.backends.openai_compat import OpenAICompatBackend
from aibot.cluster import refresh, state
from aibot.config import ServerConfig, resolve_model_id
from aibot.config.models import Entity


class ToyBackend(OpenAICompatBackend):
    """A made-up server kind: OpenAI-compatible chat, its own naming, port and load control."""

    kind = "toy"
    can_load = True
    model_id_template = "{base}~{quant}"
    default_port = 4321


@pytest.fixture
def toy():
    registry.register(ToyBackend)
    yield ToyBackend
    registry.unregister("toy")


def test_the_built_in_kinds_are_found_in_the_package():
    assert set(registry.kinds()) >= {"lmstudio", "llamacpp", "llamacpp-router", "ollama", "openai"}
    assert registry.can_load("lmstudio") and registry.can_load("llamacpp-router") and registry.can_load("ollama")
    assert not registry.can_load("openai") and not registry.can_load("llamacpp"), \
        "a plain OpenAI server and a single-model llama-server cannot load models on request"
    assert registry.default_port("ollama") == 11434 and registry.default_port("openai") is None


def test_config_accepts_the_new_kind_with_its_default_port(toy):
    server = ServerConfig.model_validate({"ip": "127.0.0.1", "kind": "toy"})
    assert (server.kind, server.url) == ("toy", "http://127.0.0.1:4321")
    with pytest.raises(ValueError, match="unknown server kind 'vllm'.*'toy'"):
        ServerConfig.model_validate({"ip": "127.0.0.1", "kind": "vllm"})


def test_model_ids_follow_the_new_kinds_template(toy):
    entity = Entity.model_validate({"id": "e", "username": "e", "color": "080175220", "baseModel": "gemma",
                                    "quantizations": {"q8": {"modelPath": "gemma@q8"}}, "defaultQuantization": "q8"})
    assert resolve_model_id(entity, "toy") == "gemma~q8"
    assert resolve_model_id(entity, "lmstudio") == "gemma@q8"


def test_make_backend_builds_the_new_kind(toy):
    backend = make_backend("toy", "http://127.0.0.1:4321")
    try:
        assert isinstance(backend, ToyBackend)
    finally:
        backend.close()


def test_the_database_and_placement_take_the_new_kind(conn, toy):
    refresh.sync_servers(conn, [ServerConfig.model_validate({"name": "t", "ip": "127.0.0.1", "kind": "toy",
                                                             "capabilities": {"maxMemory": 64}})])
    [view] = [v for v in state.server_views(conn) if v.name == "t"]
    assert view.can_load, "placement may load models on a usable server of a kind that can load"
    assert state.can_load("toy") and not state.can_load("no-such-kind")


def test_a_kind_no_class_declares_is_refused_by_name(conn):
    with pytest.raises(ValueError, match="server 'x': unknown server kind 'toy'"):
        refresh.sync_servers(conn, [SimpleNamespace(name="x", url="http://127.0.0.1:1", kind="toy")])
    with pytest.raises(ValueError, match="unknown server kind 'toy'; expected one of .*lmstudio"):
        make_backend("toy", "http://127.0.0.1:1")


def test_a_class_without_its_own_kind_is_not_a_kind():
    class NoKind(OpenAICompatBackend):
        pass

    with pytest.raises(TypeError, match="own `kind`"):
        registry.register(NoKind)
