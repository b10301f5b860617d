"""Model id resolution: original precedence, per-backend naming, explicit override."""

from __future__ import annotations

import pytest

from aibot.config import ConfigError, Entity, UnresolvableModel, resolve_model_id


def entity(**kw) -> Entity:
    return Entity.model_validate({"id": "e1", "username": "E", "color": "001002003", **kw})


QUANTS = {"f16": {"modelPath": "the-eternal@f16"}, "q8_0": {"modelPath": "the-eternal-q8_0"}}

# (entity fields, backend kind, override, expected)
TABLE = [
    # quantizations[defaultQuantization].modelPath first
    ({"quantizations": QUANTS, "defaultQuantization": "f16", "baseModel": "ignored", "model": "x"},
     "lmstudio", None, "the-eternal@f16"),
    # written in LM Studio form, asked for by Ollama / llama.cpp: rewritten with the template
    ({"quantizations": QUANTS, "defaultQuantization": "f16"}, "ollama", None, "the-eternal-f16"),
    ({"quantizations": QUANTS, "defaultQuantization": "f16"}, "llamacpp", None, "the-eternal-f16"),
    ({"quantizations": QUANTS, "defaultQuantization": "f16"}, "llamacpp-router", None, "the-eternal-f16"),
    # written in Ollama form, asked for by LM Studio
    ({"quantizations": QUANTS, "defaultQuantization": "q8_0"}, "lmstudio", None, "the-eternal@q8_0"),
    ({"quantizations": QUANTS, "defaultQuantization": "q8_0"}, "ollama", None, "the-eternal-q8_0"),
    ({"quantizations": QUANTS, "defaultQuantization": "q8_0"}, "openai", None, "the-eternal@q8_0"),
    # a modelPath that is not <base><sep><quant> is used as written
    ({"quantizations": {"f16": {"modelPath": "org/custom-model.gguf"}}, "defaultQuantization": "f16"},
     "ollama", None, "org/custom-model.gguf"),
    # only baseModel + defaultQuantization: built from the template
    ({"baseModel": "sleep-coach", "defaultQuantization": "f32"}, "lmstudio", None, "sleep-coach@f32"),
    ({"baseModel": "sleep-coach", "defaultQuantization": "f32"}, "ollama", None, "sleep-coach-f32"),
    # quantization entry without a modelPath: built from baseModel
    ({"baseModel": "b", "quantizations": {"f16": {"enabled": True}}, "defaultQuantization": "f16"},
     "llamacpp", None, "b-f16"),
    # baseModel alone, then model (legacy)
    ({"baseModel": "plain-base", "model": "legacy"}, "lmstudio", None, "plain-base"),
    ({"model": "legacy-7b"}, "ollama", None, "legacy-7b"),
    # the message's botParams.model override wins verbatim (the original ignored it)
    ({"quantizations": QUANTS, "defaultQuantization": "f16"}, "lmstudio", "other@q8_0", "other@q8_0"),
    ({"model": "legacy"}, "ollama", " override-x ", "override-x"),
    # blank override means "none"
    ({"model": "legacy"}, "lmstudio", "  ", "legacy"),
]


@pytest.mark.parametrize(("fields", "kind", "override", "expected"), TABLE)
def test_resolution_table(fields, kind, override, expected):
    assert resolve_model_id(entity(**fields), kind, override=override) == expected


def test_default_backend_is_lmstudio():
    assert resolve_model_id(entity(baseModel="b", defaultQuantization="q8_0")) == "b@q8_0"


def test_unresolvable_names_the_entity():
    with pytest.raises(UnresolvableModel) as info:
        resolve_model_id(entity())
    assert isinstance(info.value, ConfigError)
    assert "'e1'" in str(info.value) and "baseModel" in str(info.value)


def test_override_rescues_an_entity_without_model():
    assert resolve_model_id(entity(), override="m") == "m"


def test_unknown_backend_kind():
    with pytest.raises(ValueError, match="vllm"):
        resolve_model_id(entity(model="m"), "vllm")
