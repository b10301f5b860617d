"""The Ollama backend against Ollama's own payloads (tests/fixtures/ollama/*.json, each citing the docs or
source it was copied from), replayed by a loopback HTTP server: the backend must read what the real
server says, names and errors included."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from aibot.backends import ServerFault, Timeouts, make_backend
from aibot.backends.base import (Catalogue, InsufficientResources, LoadFailed, ModelNotLoaded, ModelUnavailable,
                                 Offered, RequestFault, find)
from aibot.backends import ollama_names
from aibot.backends.ollama import OllamaBackend
from tests.backends.test_http import Scripted, send

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ollama"
FAST = Timeouts(connect=1, read=2, total=3, control=3, load=3, probe_connect=0.5, probe_total=1)


def fixture(name: str):
    doc = json.loads((FIXTURES / f"{name}.json").read_text())
    assert doc["source"] and "payload" in doc
    return doc["payload"]


@pytest.fixture
def server():
    s = Scripted()
    yield s
    s.stop()


def serve(server: Scripted, method: str, path: str, answers: list) -> None:
    """Answers `method path` with each of `answers` in turn (the last one repeats); an answer is a payload
    (HTTP 200) or an error fixture's {"status", "body"}."""
    queue = list(answers)

    def handler(h):
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, dict) and set(answer) == {"status", "body"}:
            send(h, answer["status"], answer["body"])
        else:
            send(h, 200, answer)

    server.routes[(method, path)] = handler


def backend(server: Scripted, **kw) -> OllamaBackend:
    b = make_backend("ollama", server.url, timeouts=FAST, default_parallel=2)
    if kw:
        b = OllamaBackend(server.url, timeouts=FAST, default_parallel=2, **kw)
    return b


def posts(server: Scripted) -> list[dict]:
    return [s["body"] for s in server.seen if s["method"] == "POST"]


def in_years(years: int) -> str:
    return (datetime.now(timezone.utc) + timedelta(days=365 * years)).isoformat()


# ------------------------------------------------------------------ the name grammar itself


def test_names_follow_ollamas_own_test_cases():
    cases = fixture("name_cases")
    for c in cases["parse_name_parts"]:
        n = ollama_names.parse_bare(c["in"])
        assert [n.host, n.namespace, n.model, n.tag] == c["bare"], c["in"]
        assert "/".join(ollama_names.parse(c["in"]).fold()) == c["filepath"].lower(), c["in"]
    for c in cases["is_valid_bare"]:
        assert ollama_names.parse_bare(c["in"]).is_valid() is c["valid"], c["in"]
    for c in cases["display_shortest"]:
        assert ollama_names.parse_bare(c["in"]).display_shortest() == c["want"]
    assert str(ollama_names.parse(cases["default"]["in"])) == cases["default"]["string"]


# ------------------------------------------------------------------ catalogue


def test_catalogue_from_the_documented_tags_and_ps(server):
    serve(server, "GET", "/api/tags", [fixture("tags_docs")])
    serve(server, "GET", "/api/ps", [fixture("ps_docs")])
    cat = backend(server).catalogue()
    assert cat.complete and cat.max_loaded is None      # Ollama does not report OLLAMA_MAX_LOADED_MODELS
    by_key = {m.key: m for m in cat.models}
    assert list(by_key) == ["deepseek-r1:latest", "llama3.2:latest", "mistral:latest"]
    deepseek = by_key["deepseek-r1:latest"]
    assert (deepseek.status, deepseek.size_bytes, deepseek.instances) == ("unloaded", 4683075271, ())
    assert deepseek.names[:3] == ("deepseek-r1", "library/deepseek-r1", "library/deepseek-r1:latest")
    [inst] = cat.instances()      # mistral: loaded, its tag not in this (separately documented) listing
    assert (inst.key, inst.model, inst.size_bytes, inst.parallel, inst.state) == (
        "mistral:latest", "mistral:latest", 5137025024, 2, "loaded")
    assert inst.context_length is None                 # that server version did not report it
    assert inst.ttl_seconds == 0.0                     # its expires_at (2024) has passed
    assert by_key["mistral:latest"].size_bytes == 5137025024


def test_catalogue_joins_tags_and_ps_by_ollamas_identity(server):
    serve(server, "GET", "/api/tags", [fixture("tags_openapi")])     # "gemma4", no tag written
    ps = fixture("ps_openapi")
    ps["models"][0]["name"] = ps["models"][0]["model"] = "gemma4:latest"   # as the server spells it
    serve(server, "GET", "/api/ps", [ps])
    [entry] = backend(server).catalogue().models
    assert (entry.key, entry.status, entry.size_bytes) == ("gemma4", "loaded", 6591830464)   # in memory, not on disk
    [inst] = entry.instances
    assert (inst.key, inst.context_length, inst.size_bytes) == ("gemma4:latest", 4096, 6591830464)


def test_keep_alive_forever_has_no_ttl_and_a_timed_one_has(server):
    ps = fixture("ps_openapi")
    forever = dict(ps["models"][0], name="a:latest", model="a:latest", expires_at=in_years(292))  # keep_alive -1
    timed = dict(ps["models"][0], name="b:latest", model="b:latest",
                 expires_at=(datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat())
    serve(server, "GET", "/api/ps", [{"models": [forever, timed]}])
    serve(server, "GET", "/api/tags", [{"models": []}])
    a, b = backend(server).catalogue().instances()
    assert a.ttl_seconds is None and 290 < b.ttl_seconds <= 300


def test_ps_failing_fails_the_catalogue_but_tags_failing_degrades_it(server):
    serve(server, "GET", "/api/tags", [fixture("tags_docs")])
    serve(server, "GET", "/api/ps", [{"status": 500, "body": {"error": "boom"}}])
    with pytest.raises(ServerFault):
        backend(server).catalogue()
    serve(server, "GET", "/api/ps", [fixture("ps_docs")])
    serve(server, "GET", "/api/tags", [{"status": 500, "body": {"error": "model list cache unavailable"}}])
    cat = backend(server).catalogue()
    assert not cat.complete and [m.key for m in cat.models] == ["mistral:latest"]
    assert "api/tags" in cat.models[0].detail
    b = backend(server)
    assert find(b, "llama3.2", cat, "srv").key == "llama3.2"   # unknown to a partial list: tried as written


def test_max_loaded_comes_from_the_server_config(server):
    serve(server, "GET", "/api/tags", [{"models": []}])
    serve(server, "GET", "/api/ps", [{"models": []}])
    assert backend(server, max_loaded_models=2).catalogue().max_loaded == 2
    with pytest.raises(ValueError, match="max_loaded_models"):
        OllamaBackend(server.url, max_loaded_models=0)


# ------------------------------------------------------------------ identity


def catalogue_of(names: list[str]) -> Catalogue:
    return Catalogue(models=tuple(Offered(key=n, names=ollama_names.equivalents(n)) for n in names))


@pytest.mark.parametrize("wanted,found", [
    ("deepseek-r1", "deepseek-r1:latest"),
    ("deepseek-r1:latest", "deepseek-r1:latest"),
    ("DeepSeek-R1", "deepseek-r1:latest"),                        # parts compare case-insensitively
    ("library/llama3.2", "llama3.2:latest"),
    ("registry.ollama.ai/library/llama3.2:latest", "llama3.2:latest"),
    ("  llama3.2  ", "llama3.2:latest"),                         # ParseRef trims
    ("llama3.2:local", "llama3.2:latest"),                       # explicit local source, same model
    ("llama3.2:3b", None),                                       # another tag is another model
    ("sim/llama3.2", None),                                      # another namespace too
    ("llama3.2:cloud", None),
    ("the-eternal@f16", None),                                   # not a valid Ollama name at all
])
def test_identify_with_the_documented_listing(wanted, found):
    b = OllamaBackend("http://127.0.0.1:9")
    cat = catalogue_of([_name(m) for m in fixture("tags_docs")["models"]])
    got = b.identify(wanted, cat)
    assert (got.key if got else None) == found


def _name(m: dict) -> str:
    return m["name"]


@pytest.mark.parametrize("wanted,found", [
    ("apple/openelm", "apple/OpenELM:latest"),
    ("mynamespace/apeliotes", "mynamespace/apeliotes:latest"),
    ("myhost/mynamespace/lips:code", "myhost/mynamespace/lips:code"),
    ("lips:code", None),
    ("mistral", None),                                           # only mistral:7b-instruct-q4_0 is installed
    ("mistral:7b-instruct-q4_0", "mistral:7b-instruct-q4_0"),
])
def test_identify_with_names_the_server_lists(wanted, found):
    b = OllamaBackend("http://127.0.0.1:9")
    got = b.identify(wanted, catalogue_of(fixture("tags_list_test_names")))
    assert (got.key if got else None) == found


def test_identify_never_picks_between_two_models_that_differ_in_case_only():
    b = OllamaBackend("http://127.0.0.1:9")
    cat = catalogue_of(["x:latest", "X:latest"])
    assert b.identify("x", cat).key == "x:latest" and b.identify("X:latest", cat).key == "X:latest"
    assert b.identify("x:LATEST", cat) is None


# ------------------------------------------------------------------ load and unload


def test_load_sends_an_empty_prompt_with_keep_alive_forever_and_returns_the_instance(server):
    loaded = dict(fixture("ps_openapi")["models"][0], name="llama3.2:latest", model="llama3.2:latest",
                  expires_at=in_years(292))
    serve(server, "GET", "/api/tags", [fixture("tags_docs")])
    serve(server, "GET", "/api/ps", [{"models": []}, {"models": [loaded]}])
    serve(server, "POST", "/api/generate", [dict(fixture("generate_load"), done_reason="load")])
    inst = backend(server).load("llama3.2", context_length=8192, parallel=4)
    assert (inst.key, inst.context_length, inst.ttl_seconds) == ("llama3.2:latest", 4096, None)
    # the name Ollama lists is sent; no num_ctx (a /v1 chat would reload it), no parallel (a server setting)
    assert posts(server) == [{"model": "llama3.2:latest", "keep_alive": -1, "stream": False}]


def test_load_adopts_a_pinned_model_and_pins_one_loaded_by_a_plain_request(server):
    ps = fixture("ps_openapi")["models"][0]
    pinned = dict(ps, name="llama3.2:latest", model="llama3.2:latest", expires_at=in_years(292))
    serve(server, "GET", "/api/tags", [fixture("tags_docs")])
    serve(server, "GET", "/api/ps", [{"models": [pinned]}])
    serve(server, "POST", "/api/generate", [dict(fixture("generate_load"), done_reason="load")])
    b = backend(server)
    assert b.load("llama3.2").key == "llama3.2:latest" and posts(server) == []
    timed = dict(pinned, expires_at=(datetime.now(timezone.utc) + timedelta(minutes=4)).isoformat())
    serve(server, "GET", "/api/ps", [{"models": [timed]}, {"models": [pinned]}])
    assert b.load("llama3.2").ttl_seconds is None
    assert posts(server) == [{"model": "llama3.2:latest", "keep_alive": -1, "stream": False}]


@pytest.mark.parametrize("error,kind", [
    ("error_not_found", ModelUnavailable),
    ("error_not_found_old", ModelUnavailable),
    ("error_invalid_name", ModelUnavailable),
    ("error_oom_v029", InsufficientResources),
    ("error_oom_v033", InsufficientResources),
    ("error_load_failed", LoadFailed),
    ("error_server_busy", ServerFault),
])
def test_load_errors_are_typed_by_ollamas_answer(server, error, kind):
    serve(server, "GET", "/api/tags", [fixture("tags_docs")])
    serve(server, "GET", "/api/ps", [{"models": []}])
    serve(server, "POST", "/api/generate", [fixture(error)])
    with pytest.raises(kind) as info:
        backend(server).load("llama3.2")
    exc = info.value
    assert type(exc) is kind and fixture(error)["body"]["error"][:40] in str(exc)
    if kind is ModelUnavailable:
        assert exc.permanent and "deepseek-r1:latest, llama3.2:latest" in str(exc)
    if kind is LoadFailed:
        assert exc.scope == "model" and not exc.permanent
    if kind is ServerFault:
        assert exc.scope == "server"


def test_unload_is_keep_alive_zero_for_that_model_only(server):
    serve(server, "POST", "/api/generate", [fixture("generate_unload")])
    backend(server).unload("llama3.2:latest")
    assert posts(server) == [{"model": "llama3.2:latest", "keep_alive": 0, "stream": False}]
    serve(server, "POST", "/api/generate", [fixture("error_not_found")])
    backend(server).unload("gone:latest")                 # not installed, so not loaded: nothing to do


def test_health_reads_the_version(server):
    serve(server, "GET", "/api/version", [fixture("version_docs")])
    info = backend(server).health()
    assert info.healthy and info.version == "0.5.1"


def test_chat_for_a_model_ollama_lacks_is_the_requests_fault(server):
    serve(server, "POST", "/v1/chat/completions", [fixture("error_v1_not_found")])
    from aibot.backends import ChatRequest

    with pytest.raises(RequestFault) as info:
        backend(server).chat(ChatRequest(model="nope", messages=[{"role": "user", "content": "hi"}]))
    assert isinstance(info.value, ModelNotLoaded) and not info.value.server_fault
