"""Hot reload: edits are seen on the next get(); bad edits keep the last good config, logged once."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from aibot.config import ConfigError, ConfigStore, load_config


def entity(eid: str, **kw) -> dict:
    return {"id": eid, "username": eid.title(), "color": "001002003", "model": "m", "rateLimits": {}, **kw}


def write_json(path: Path, data, *, bump: int = 0) -> None:
    """Writes and moves the mtime forward by `bump` seconds, so the change is visible even on
    filesystems with coarse timestamps (no sleeping)."""
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    if bump:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


class CountingLoader:
    def __init__(self):
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        return load_config(path)


def test_reload_on_change_and_cheap_when_unchanged(tmp_path):
    path = tmp_path / "c.json"
    write_json(path, {"entities": [entity("a", temperature=0.5)]})
    loader = CountingLoader()
    store = ConfigStore(path, loader=loader)
    first = store.get()
    assert first.entity("a").temperature == 0.5
    assert store.get() is first and store.get() is first
    assert loader.calls == 1  # unchanged file: no re-parse

    write_json(path, {"entities": [entity("a", temperature=0.9), entity("b")]}, bump=2)
    second = store.get()
    assert second.entity("a").temperature == 0.9 and second.entity("b") is not None
    assert loader.calls == 2 and store.loads == 2


def test_bad_edit_keeps_last_good_and_logs_once(tmp_path, caplog):
    path = tmp_path / "c.json"
    write_json(path, {"entities": [entity("a", temperature=0.5)]})
    store = ConfigStore(path)
    good = store.get()

    write_json(path, {"entities": [entity("a", temperature="warm")]}, bump=2)
    with caplog.at_level(logging.ERROR, logger="aibot.config"):
        assert store.get() is good
        assert store.get() is good
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "entities[0].temperature" in errors[0].getMessage()
    assert store.last_error is not None and store.last_error.issues[0].value == "warm"

    write_json(path, '{"entities": [', bump=4)  # a different bad version is logged again
    with caplog.at_level(logging.ERROR, logger="aibot.config"):
        assert store.get() is good
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2

    write_json(path, {"entities": [entity("a", temperature=0.7)]}, bump=6)
    assert store.get().entity("a").temperature == 0.7
    assert store.last_error is None


def test_deleted_file_keeps_last_good(tmp_path):
    path = tmp_path / "c.json"
    write_json(path, {"entities": [entity("a")]})
    store = ConfigStore(path)
    good = store.get()
    path.unlink()
    assert store.get() is good
    assert "cannot read" in str(store.last_error)


def test_first_load_of_an_invalid_config_raises(tmp_path):
    path = tmp_path / "c.json"
    write_json(path, {"entities": [entity("a", color="blue")]})
    store = ConfigStore(path)
    with pytest.raises(ConfigError) as info:
        store.get()
    assert info.value.issues[0].path == "entities[0].color"
    with pytest.raises(ConfigError):
        store.get()  # still no good config to fall back on


def test_directory_reload_on_edit_add_and_remove(tmp_path):
    write_json(tmp_path / "a.json", entity("a", temperature=0.1))
    loader = CountingLoader()
    store = ConfigStore(tmp_path, loader=loader)
    assert [e.id for e in store.get().entities] == ["a"]
    store.get()
    assert loader.calls == 1

    write_json(tmp_path / "a.json", entity("a", temperature=0.2), bump=2)
    assert store.get().entity("a").temperature == 0.2

    write_json(tmp_path / "b.json", entity("b"))
    assert [e.id for e in store.get().entities] == ["a", "b"]

    write_json(tmp_path / "global.json", {"queueSettings": {"defaultPriority": 7}})
    assert store.get().queue_settings.default_priority == 7

    (tmp_path / "b.json").unlink()
    assert [e.id for e in store.get().entities] == ["a"]
    assert loader.calls == 5


def test_explicit_reload(tmp_path):
    path = tmp_path / "c.json"
    write_json(path, {"entities": [entity("a")]})
    loader = CountingLoader()
    store = ConfigStore(path, loader=loader)
    store.get()
    store.reload()
    assert loader.calls == 2
