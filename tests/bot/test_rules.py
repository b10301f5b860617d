"""Which chat messages become jobs (aibot.bot.rules): pure, no database."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibot.bot import rules
from aibot.config import load_config

ENTITY_BASE = {
    "systemRole": "system", "systemPrompt": "You are a test.",
    "rateLimits": {"minSecondsBetweenPosts": 0, "maxPostsPerMinute": 100, "maxPostsPerHour": 1000},
}

CONFIG = {
    "version": "test",
    "botSettings": {"pollingInterval": 50},
    "queueSettings": {"defaultPriority": 40, "maxRetries": 4},
    "entities": [
        {**ENTITY_BASE, "id": "alice", "username": "Alice", "color": "255000000", "baseModel": "alice",
         "quantizations": {"f16": {"modelPath": "alice@f16"}}, "defaultQuantization": "f16", "nom": 3,
         "defaultPriority": 20},
        {**ENTITY_BASE, "id": "bob", "username": "Bob", "color": "000255000", "model": "bob-model"},
        {**ENTITY_BASE, "id": "off", "enabled": False, "username": "Off", "color": "000000255", "model": "off"},
    ],
}


def write_config(tmp_path: Path, mutate=None) -> Path:
    """A config file for bot tests; `mutate(dict)` edits a copy before writing."""
    data = copy.deepcopy(CONFIG)
    if mutate:
        mutate(data)
    path = tmp_path / "config-aientities.json"
    path.write_text(json.dumps(data))
    return path


def human(text="hello", entity="alice", context=None, **params):
    """A human message as the frontend posts it; `params` go into botParams."""
    bot = {"entity": entity, "processed": False, **params}
    m = {"id": "m1", "text": text, "username": "Me", "color": "195080200", "timestamp": 1_700_000_000_000,
         "domain": "saywhatwant.app", "message-type": "human", "botParams": bot}
    if context is not None:
        m["context"] = context
    return m


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return load_config(write_config(tmp_path_factory.mktemp("cfg")))


def test_a_human_message_to_an_enabled_entity_becomes_a_job(config):
    d = rules.evaluate(human(context=["a: 1", "b: 2"]), config)
    assert d.action == rules.JOB
    assert (d.message_id, d.entity_id, d.model) == ("m1", "alice", "alice@f16")
    assert d.message_at is not None and int(d.message_at.timestamp() * 1000) == 1_700_000_000_000
    p = d.payload
    assert p["text"] == "hello" and p["username"] == "Me" and p["context"] == ["a: 1", "b: 2"]
    assert p["message_id"] == "m1" and p["entity_id"] == "alice" and p["message_ts"] == 1_700_000_000_000
    assert p["ais"] is None and p["model_override"] is None and p["user_color"] == "195080200"
    assert (p["entity_username"], p["entity_color"]) == ("Alice", "255000000")
    json.dumps(p)  # the payload is stored as jsonb


@pytest.mark.parametrize("kind", ["AI", "ai", " Ai "])
def test_ai_messages_are_never_answered(config, kind):
    m = human()
    m["message-type"] = kind
    assert rules.evaluate(m, config).action == rules.IGNORE


def test_messages_without_bot_params_or_entity_are_ignored(config):
    m = human()
    del m["botParams"]
    assert rules.evaluate(m, config).action == rules.IGNORE
    assert rules.evaluate(human(entity=None), config).action == rules.IGNORE
    assert rules.evaluate(human(entity=""), config).action == rules.IGNORE


def test_processed_true_is_ignored_but_false_and_missing_are_answered(config):
    assert rules.evaluate(human(processed=True), config).action == rules.IGNORE
    assert rules.evaluate(human(processed=False), config).action == rules.JOB
    m = human()
    del m["botParams"]["processed"]
    assert rules.evaluate(m, config).action == rules.JOB


def test_unknown_and_disabled_entities_are_rejected_with_the_reason(config):
    d = rules.evaluate(human(entity="nobody"), config)
    assert d.action == rules.REJECT and d.entity_id == "nobody" and "unknown entity" in d.reason
    assert "nobody" in d.reason
    d = rules.evaluate(human(entity="off"), config)
    assert d.action == rules.REJECT and "disabled" in d.reason


def test_no_ping_special_case(config):
    d = rules.evaluate(human(text="I was shopping and typing, ping!"), config)
    assert d.action == rules.JOB and d.priority == 20


@pytest.mark.parametrize("given_priority, expected, warned", [
    (0, 0, False), (5, 5, False), (99, 99, False), ("7", 7, False), (3.0, 3, False),
    (100, 20, True), (-1, 20, True), (2.5, 20, True), ("high", 20, True), (True, 20, True), ([1], 20, True),
])
def test_message_priority_then_entity_default(config, given_priority, expected, warned):
    d = rules.evaluate(human(priority=given_priority), config)
    assert d.action == rules.JOB and d.priority == expected
    assert bool(d.warnings) == warned and d.payload["warnings"] == list(d.warnings)
    if warned:
        assert "botParams.priority" in d.warnings[0]


def test_priority_falls_back_to_queue_default_then_50(config, tmp_path):
    assert rules.evaluate(human(entity="bob"), config).priority == 40
    no_default = load_config(write_config(tmp_path, lambda c: c.pop("queueSettings")))
    assert rules.evaluate(human(entity="bob"), no_default).priority == 50


def test_choose_priority_chain_is_pure():
    assert rules.choose_priority(None, None, None) == (50, None)
    assert rules.choose_priority(None, 0, 40) == (0, None)        # entity default 0 is valid, not falsy
    assert rules.choose_priority(None, None, 0) == (0, None)
    assert rules.choose_priority(0, 30, 40) == (0, None)
    p, w = rules.choose_priority(150, None, 40)
    assert p == 40 and "150" in w


def test_context_is_capped_to_the_last_nom_lines(config):
    lines = [f"u: {i}" for i in range(10)]
    assert rules.evaluate(human(context=lines), config).payload["context"] == lines[-3:]  # alice nom=3
    assert rules.evaluate(human(entity="bob", context=lines), config).payload["context"] == lines  # nom 100
    assert rules.cap_context(lines, 0) == []
    assert rules.cap_context(lines, 20) == lines


@pytest.mark.parametrize("ais, name, color", [
    ("MyAI:255069000", "MyAI", "255069000"),
    ("My AI:000000000-abc123", "My AI", "000000000-abc123"),
    ("Sixteen_chars_ok:010020030", "Sixteen_chars_ok", "010020030"),
])
def test_ais_override(config, ais, name, color):
    d = rules.evaluate(human(ais=ais), config)
    assert d.payload["ais"] == {"name": name, "color": color}


def test_ais_random_resolves_to_a_concrete_stable_colour(config):
    d1 = rules.evaluate(human(ais="Ghost:random"), config)
    d2 = rules.evaluate(human(ais="Ghost:random"), config)
    color = d1.payload["ais"]["color"]
    assert d1.payload["ais"]["name"] == "Ghost" and color == d2.payload["ais"]["color"]
    assert len(color) == 9 and all(0 <= int(color[i:i + 3]) <= 255 for i in (0, 3, 6))
    assert rules.random_color("m1|alice") == color
    assert rules.random_color("m2|alice") != color   # another message gets its own colour


@pytest.mark.parametrize("ais, fragment", [
    ("NoColour", "Name:color"), (":255000000", "name is empty"), ("WayTooLongNameForTheChat:255000000", "16"),
    ("X:256000000", "256"), ("X:12345678", "RRRGGGBBB"), ("X:blue", "RRRGGGBBB"), (42, "Name:color"),
])
def test_bad_ais_is_rejected_naming_the_field(config, ais, fragment):
    d = rules.evaluate(human(ais=ais), config)
    assert d.action == rules.REJECT and "botParams.ais" in d.reason and fragment in d.reason


def test_model_override_is_honoured(config):
    d = rules.evaluate(human(model="other-model@q8_0"), config)
    assert d.model == "other-model@q8_0" and d.payload["model_override"] == "other-model@q8_0"
    assert rules.evaluate(human(model=""), config).model == "alice@f16"
    d = rules.evaluate(human(model=7), config)
    assert d.action == rules.REJECT and "botParams.model" in d.reason


def test_model_resolution_follows_the_backend_kind(config):
    assert rules.evaluate(human(), config, backend_kind="ollama").model == "alice-f16"


@pytest.mark.parametrize("mutate, fragment", [
    (lambda m: m.pop("text"), "text: missing"),
    (lambda m: m.update(text=5), "text: expected a string"),
    (lambda m: m.update(text="   "), "text: empty"),
    (lambda m: m.update(text="x" * 10_001), "text: longer than 10000"),
    (lambda m: m.update(username=["me"]), "username: expected a string"),
    (lambda m: m.update(timestamp="yesterday"), "timestamp"),
    (lambda m: m.update(context="a: 1"), "context: expected a list"),
    (lambda m: m.update(context=["ok", 3]), "context[1]"),
    (lambda m: m.update(color=255), "color"),
    (lambda m: m.update(botParams="entity=alice"), "botParams: expected an object"),
    (lambda m: m["botParams"].update(entity=["alice"]), "botParams.entity"),
    (lambda m: m.update({"message-type": 1}), "message-type"),
    (lambda m: m.update(id={"x": 1}), "id:"),
])
def test_malformed_messages_are_rejected_with_the_field_named(config, mutate, fragment):
    m = human()
    mutate(m)
    d = rules.evaluate(m, config)
    assert d.action == rules.REJECT, d
    assert fragment in d.reason
    assert len(d.reason) < 300  # values are truncated


def test_missing_id_gets_a_stable_synthetic_id(config):
    m = human(entity="nobody")
    del m["id"]
    a, b = rules.evaluate(m, config), rules.evaluate(copy.deepcopy(m), config)
    assert a.message_id == b.message_id and a.message_id.startswith("raw-")
    assert rules.evaluate(m, config, fallback_id="inbox-7").message_id == "inbox-7"


@pytest.mark.parametrize("raw", [None, 3, "text", [1, 2], True])
def test_non_objects_are_rejected(config, raw):
    d = rules.evaluate(raw, config)
    assert d.action == rules.REJECT and "expected a JSON object" in d.reason and d.message_id.startswith("raw-")


def test_integer_ids_are_accepted_as_strings(config):
    m = human()
    m["id"] = 12345
    assert rules.evaluate(m, config).message_id == "12345"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
FIELDS = st.fixed_dictionaries({}, optional={
    "id": JSON, "text": JSON, "username": JSON, "timestamp": JSON, "context": JSON, "color": JSON,
    "message-type": st.sampled_from(["human", "AI", None]) | JSON,
    "botParams": st.fixed_dictionaries({}, optional={
        "entity": st.sampled_from(["alice", "bob", "off", "nobody", ""]) | JSON,
        "priority": JSON, "ais": st.sampled_from(["A:random", "A:255255255", "A:999"]) | JSON,
        "model": JSON, "processed": JSON}) | JSON,
})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=JSON | FIELDS)
def test_arbitrary_json_always_gets_a_decision(config, raw):
    d = rules.evaluate(raw, config)
    assert d.action in (rules.JOB, rules.REJECT, rules.IGNORE)
    assert isinstance(d.message_id, str) and d.message_id
    assert isinstance(d.entity_id, str) and d.entity_id
    assert 0 <= d.priority <= 99
    if d.action == rules.REJECT:
        assert d.reason and "internal error" not in d.reason
    if d.action == rules.JOB:
        assert d.model and d.entity_id in ("alice", "bob")
        json.dumps(d.payload)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda m: m.update(text="nul\x00byte"), "text: contains a NUL"),
    (lambda m: m.update(text="lone \ud800 surrogate"), "text: contains a NUL character or invalid Unicode"),
    (lambda m: m.update(context=["ok", "bad\x00"]), "context[1]"),
    (lambda m: m["botParams"].update(ais="Gh\x00st:random"), "botParams.ais"),
])
def test_unstorable_strings_are_rejected(config, mutate, fragment):
    m = human()
    mutate(m)
    d = rules.evaluate(m, config)
    assert d.action == rules.REJECT and fragment in d.reason
    assert rules.is_storable(d.reason) and rules.is_storable(d.message_id)


def test_unstorable_ids_fall_back_to_synthetic_ones(config):
    m = human()
    m["id"] = "a\x00b"
    d = rules.evaluate(m, config)
    assert d.action == rules.REJECT and d.message_id.startswith("raw-") and rules.is_storable(d.reason)
    m = human(entity="\udc80")
    d = rules.evaluate(m, config)
    assert d.action == rules.REJECT and d.entity_id == "-" and rules.is_storable(d.reason)
