"""Broken entity configs through `load_config` and the hot-reloading `ConfigStore`.

Operators edit the config live, so any edit (invalid JSON, a wrong type anywhere, unknown keys, an
entity missing its model) must give a `ConfigError` whose issues name the place, never another
exception; and a running process must keep its last good config through any bad edit.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibot.config import ConfigError, ConfigStore, load_config
from aibot.harness import entity, write_config

ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=6)


def good_doc() -> dict:
    return {
        "version": "t", "botSettings": {"pollingInterval": 200},
        "queueSettings": {"defaultPriority": 50, "maxRetries": 3},
        "clusterSettings": {"keepModelsLoaded": True},
        "globalSettings": {"globalStopSequences": ["\\nHuman:"]},
        "lmStudioServers": [{"name": "mac", "ip": "127.0.0.1", "port": 1234, "enabled": True,
                             "capabilities": {"maxMemory": 128}}],
        "entities": [entity("alice", "m-1", rate_limits={"maxPostsPerMinute": 10}), entity("bob", "m-2", rate_limits={"maxPostsPerMinute": 3})],
    }


def paths(doc, prefix=()):
    """Every (path to a value) in a JSON document, for mutation."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, prefix + (i,))


def mutate(doc, path, action, value):
    if not path:
        return value if action != "delete" else {}
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "unknown" and isinstance(parent, dict):
        parent["zzUnknown" + str(last)] = value
    else:
        parent[last] = value
    return doc


ALL_PATHS = list(paths(good_doc()))


@st.composite
def broken_doc(draw):
    doc = copy.deepcopy(good_doc())
    for _ in range(draw(st.integers(1, 3))):
        live = list(paths(doc))
        path = draw(st.sampled_from(live))
        doc = mutate(doc, path, draw(st.sampled_from(["replace", "delete", "unknown"])), draw(ANY))
    return doc


def test_the_baseline_is_valid(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(good_doc()))
    cfg = load_config(p)
    assert [e.id for e in cfg.entities] == ["alice", "bob"] and not cfg.warnings


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=broken_doc())
def test_any_edit_loads_or_fails_with_located_issues(tmp_path, doc):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    try:
        cfg = load_config(p)
    except ConfigError as exc:
        assert exc.issues, "a ConfigError must list at least one issue"
        for issue in exc.issues:
            assert isinstance(issue.path, str) and issue.message, issue
        assert str(exc).startswith("invalid configuration")
        return
    # Loaded: every entity is usable as far as the worker is concerned.
    for e in cfg.entities:
        assert isinstance(e.id, str) and e.id


@pytest.mark.parametrize("text, where", [
    ("", "c.json"), ("{", "c.json"), ("[]", "c.json"), ("null", "c.json"), ('{"entities": 5}', "entities"),
    ("\x00\x01garbage", "c.json"), ('{"entities": [{"id": "x"}]}', "entities[0]"),
])
def test_unreadable_documents_name_where(tmp_path, text, where):
    p = tmp_path / "c.json"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert any(where in i.path or where in str(err.value) for i in err.value.issues), str(err.value)


@pytest.mark.parametrize("change, field", [
    (lambda d: d["entities"][0].update(temperature="hot"), "entities[0].temperature"),
    (lambda d: d["entities"][0].update(maxTokens=-5), "entities[0].maxTokens"),
    (lambda d: d["entities"][0].update(color="red"), "entities[0].color"),
    (lambda d: d["entities"][0].update(defaultPriority=500), "entities[0].defaultPriority"),
    (lambda d: d["entities"][1].update(rateLimits={"maxPostsPerMinute": "lots"}), "entities[1].rateLimits"),
    (lambda d: d["lmStudioServers"][0].update(port="http"), "lmStudioServers[0].port"),
    (lambda d: d["entities"].append(copy.deepcopy(d["entities"][0])), "entities"),
])
def test_wrong_types_and_values_are_named(tmp_path, change, field):
    doc = good_doc()
    change(doc)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert any(i.path.startswith(field) for i in err.value.issues), str(err.value)


def test_unknown_keys_are_warnings_not_errors(tmp_path):
    doc = good_doc()
    doc["entities"][0]["favouriteColour"] = "blue"
    doc["mysterySection"] = {"a": 1}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    cfg = load_config(p)
    text = " ".join(str(w) for w in cfg.warnings)
    assert "favouriteColour" in text and "mysterySection" in text


def _bump(path: Path) -> None:
    """Moves the mtime forward so the store notices an edit made within the same clock tick."""
    st_ = path.stat()
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10_000_000))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=broken_doc() | st.text(max_size=30))
def test_store_keeps_the_last_good_config_through_any_edit(tmp_path, doc):
    p = tmp_path / "store.json"
    write_config(p, servers=good_doc()["lmStudioServers"], entities=good_doc()["entities"])
    store = ConfigStore(p)
    good = store.get()
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    _bump(p)
    got = store.get()                      # never raises once a good config was loaded
    if store.last_error is not None:
        assert got is good
    p.unlink()
    assert store.get() in (good, got)      # a deleted file keeps the last good config too
    write_config(p, servers=good_doc()["lmStudioServers"], entities=[entity("carol", "m-3")])
    _bump(p)
    assert [e.id for e in store.get().entities] == ["carol"], "a fixed config is picked up again"


def test_store_without_any_good_config_raises_config_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError):
        ConfigStore(p).get()
    with pytest.raises(ConfigError):
        ConfigStore(tmp_path / "missing.json").get()
