"""Ollama, as ollama/ollama v0.33.0-rc2 answers (@fb30760996871fa9460115c753afd2c60d4ab0f7; the paths below
are files of that commit): `/api/tags`, `/api/ps`, `/api/version`, `/api/generate`, `/api/chat`, `/v1/...`.

- Names: each catalogue key is presented as Ollama lists it, `DisplayShortest` with the tag
  (`sim/tiny-1` → `sim/tiny-1:latest`, `m-a` → `m-a:latest`), and requests are resolved by Ollama's
  name rules (`aibot.backends.ollama_names`, a port of `types/model/name.go`): `m-a`, `M-A:latest`
  and `library/m-a` all reach `m-a:latest`.
- Residency is Ollama's scheduler (`aibot.sim.apis.ollama_sched`): keep-alive expiry (default
  `ollama_keep_alive`, as OLLAMA_KEEP_ALIVE), at most `ollama_max_loaded_models` loaded (0 = 3),
  eviction by shortest keep-alive then digest, idle first; `parallel` is OLLAMA_NUM_PARALLEL
  (default 1). Preloaded models are pinned (keep-alive forever).
- An empty prompt (`/api/generate`) or empty `messages` (`/api/chat`) only loads (`done_reason:
  "load"`), or with `keep_alive: 0` only unloads (`"unload"`), answering at once while the model goes
  when its requests are done (`GenerateHandler`, `ChatHandler`, `Scheduler.expireRunner`).
- Errors are `{"error": "<message>"}` with Ollama's statuses (`server/routes.go`): an unknown model
  404 `model '<name>' not found`, an invalid name 400 `invalid model name`, a bad keep_alive 400 with
  Go's duration error, a load that does not fit 500 with `llama-server reported out-of-memory during
  startup: ...` (`llm/llama_server.go` `WaitUntilRunning`, `handleScheduleError`). Behind `/v1` the
  middleware rewrites them as `{"error": {"message", "type", "param", "code"}}` (`middleware/openai.go`
  `writeError`, `openai/openai.go` `NewError`).
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from aibot.backends import ollama_names
from aibot.sim.apis.common import ChatFormat, Flavour, Timing, Usage, openai_chat, run_chat
from aibot.sim.apis.ollama_sched import FOREVER_SECONDS, Scheduler, digest
from aibot.sim.config import SimConfigError
from aibot.sim.engine import BadLoadRequest, EngineError, InsufficientMemory, NotLoaded, UnknownModel
from aibot.sim.http import HttpError, Reply, Request, Route, json_reply, text_reply
from aibot.sim.replies import ReplyPlan

SOURCE = "ollama/ollama@fb30760996871fa9460115c753afd2c60d4ab0f7"
VERSION = "0.33.0-rc2"
#: `modified_at` of the first catalogue model; later ones are a minute older each, so /api/tags' order
#: (newest first, `sortListModelResponses`) is the catalogue's.
MODIFIED_AT = datetime(2025, 5, 10, 15, 6, 48, tzinfo=timezone.utc)

# ------------------------------------------------------------------ durations (Go's, as Ollama parses them)

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PIECE = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]*)")


def go_duration(s: str) -> float:
    """Go's `time.ParseDuration`, in seconds, with its error messages."""
    orig, total = s, 0.0
    sign = -1.0 if s[:1] == "-" else 1.0
    s = s[1:] if s[:1] in "+-" else s
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f'time: invalid duration "{orig}"')
    while s:
        m = _PIECE.match(s)
        whole, frac, unit = m.group(1), m.group(2), m.group(3)
        if not whole and not frac:
            raise ValueError(f'time: invalid duration "{orig}"')
        if not unit:
            raise ValueError(f'time: missing unit in duration "{orig}"')
        if unit not in _UNITS:
            raise ValueError(f'time: unknown unit "{unit}" in duration "{orig}"')
        total += float(f"{whole or 0}.{frac or 0}") * _UNITS[unit]
        s = s[m.end():]
    return sign * total


def parse_keep_alive(value: Any) -> float | None:
    """A request's `keep_alive` in seconds; None = forever (`api/types.go` `Duration.UnmarshalJSON`:
    a number is seconds, a string a Go duration, anything negative forever). Raises ValueError with
    the message Ollama answers (HTTP 400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        go_type = {bool: "bool", list: "[]interface {}", dict: "map[string]interface {}"}.get(type(value), "?")
        raise ValueError(f"Unsupported type: '{go_type}'")
    seconds = float(value) if not isinstance(value, str) else go_duration(value)
    return None if seconds < 0 else seconds


def env_keep_alive(value: str) -> float:
    """OLLAMA_KEEP_ALIVE (`envconfig.KeepAlive`): a Go duration or whole seconds, negative = forever
    (inf), unparsable = the default 5m."""
    try:
        seconds = go_duration(value)
    except ValueError:
        try:
            seconds = float(int(value))
        except ValueError:
            seconds = 300.0
    return math.inf if seconds < 0 else seconds


def _iso(ts: float) -> str:
    """Go's RFC 3339 with nanoseconds, trailing zeros dropped (`time.Time.MarshalJSON`), in UTC."""
    when = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=ts)
    frac = f"{when.microsecond:06d}".rstrip("0")
    return when.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


# ------------------------------------------------------------------ replies


class OllamaFormat(ChatFormat):
    """NDJSON lines of `/api/chat` (`message.content`) or `/api/generate` (`response`); `model` is the
    name the request used, as Ollama echoes it."""

    stream_content_type = "application/x-ndjson"

    def __init__(self, model: str, generate: bool):
        self.model = model
        self.generate = generate

    def line(self, content: str, done: bool, **more: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": _iso(time.time())}
        if self.generate:
            out["response"] = content
        else:
            out["message"] = {"role": "assistant", "content": content}
        out["done"] = done
        out.update(more)
        return out

    def _stats(self, plan: ReplyPlan, usage: Usage, timing: Timing) -> dict[str, Any]:
        ns = 1_000_000_000
        return {"done_reason": plan.finish_reason,
                "total_duration": int((timing.queued_s + timing.generation_s) * ns),
                "load_duration": int(timing.queued_s * ns), "prompt_eval_count": usage.prompt_tokens,
                "prompt_eval_duration": int(timing.first_token_s * ns), "eval_count": usage.completion_tokens,
                "eval_duration": int(timing.generation_s * ns)}

    def body(self, plan: ReplyPlan, usage: Usage, timing: Timing) -> dict[str, Any]:
        return self.line(plan.text, True, **self._stats(plan, usage, timing))

    def empty_body(self, usage: Usage) -> dict[str, Any]:
        return self.line("", True, done_reason="stop", eval_count=0)

    def stream_piece(self, piece: str) -> bytes:
        return json.dumps(self.line(piece, False)).encode() + b"\n"

    def stream_end(self, plan: ReplyPlan, usage: Usage, timing: Timing) -> bytes:
        return json.dumps(self.line("", True, **self._stats(plan, usage, timing))).encode() + b"\n"

    def stream_empty(self, usage: Usage) -> bytes:
        return json.dumps(self.empty_body(usage)).encode() + b"\n"

    def malformed(self) -> bytes:
        return b'{"model": "' + self.model.encode() + b'", "message": {"role": "assistant", "content": "unterm'


# ------------------------------------------------------------------ the flavour


class Ollama(Flavour):
    name = "ollama"

    def __init__(self, sim: Any):
        super().__init__(sim)
        self.listed = _listed_names(self.engine.catalog)          # catalogue key -> name as Ollama lists it
        self.sched = Scheduler(self.engine, self.config, env_keep_alive(self.config.ollama_keep_alive))
        self.v1 = OllamaOpenAI(self)

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/", self.root, public=True),
            Route("HEAD", "/", self.root, public=True),
            Route("GET", "/api/version", self.version, public=True),
            Route("GET", "/api/tags", self.tags),
            Route("GET", "/api/ps", self.ps),
            Route("POST", "/api/chat", self.chat, chat=True),
            Route("POST", "/api/generate", self.generate, chat=True),
            Route("GET", "/v1/models", self.openai_models),
            Route("POST", "/v1/chat/completions", self.openai_chat, chat=True),
        ]

    # ------------------------------------------------------------------ errors

    def error(self, status: int, message: str, **_: Any) -> Reply:
        return json_reply({"error": message}, status)

    def not_found(self, req: Request) -> Reply:
        return text_reply("404 page not found", 404)          # gin's default for an unknown route

    def unauthorized(self) -> Reply:
        return self.error(401, "unauthorized")

    def model_error(self, exc: EngineError) -> Reply:
        if isinstance(exc, (UnknownModel, NotLoaded)):
            return self.error(404, f"model '{self.listed.get(exc.key, exc.key)}' not found")
        if isinstance(exc, InsufficientMemory):
            # llm/llama_server.go:1250,1375 with the health body of llm/llama_server_test.go:66; HTTP 500
            # from handleScheduleError.
            return self.error(500, 'llama-server reported out-of-memory during startup: llama-server error: '
                                   '{"status":"error","message":"out of memory"}')
        if isinstance(exc, BadLoadRequest):
            return self.error(400, str(exc))
        return self.error(500, str(exc))

    # ------------------------------------------------------------------ request helpers

    def resolve(self, raw: Any, *, generate: bool) -> str:
        """The catalogue key a request's `model` names (`parseAndValidateModelRef`, `getExistingName`)."""
        if not isinstance(raw, str):
            struct = "GenerateRequest" if generate else "ChatRequest"
            raise HttpError(self.error(400, f"json: cannot unmarshal {_go_type(raw)} into Go struct field "
                                            f"{struct}.model of type string"))
        if not raw.strip():
            # errModelRequired falls through writeModelRefParseError to each handler's fallback
            raise HttpError(self.error(404, "model '' not found") if generate else self.error(400, "model is required"))
        wanted = ollama_names.parse_request(raw)
        if wanted is None:
            raise HttpError(self.error(400, "invalid model name"))
        for key, listed in self.listed.items():
            if ollama_names.parse(listed).fold() == wanted.fold():
                return key
        raise HttpError(self.error(404, f"model '{raw}' not found"))

    def keep_alive(self, body: dict[str, Any]) -> float | None:
        """Seconds, inf = forever, None = not sent (JSON null leaves Go's *Duration nil too)."""
        raw = body.get("keep_alive")
        if raw is None:
            return None
        try:
            seconds = parse_keep_alive(raw)
        except ValueError as exc:
            raise HttpError(self.error(400, str(exc))) from None
        return math.inf if seconds is None else seconds

    def _details(self, key: str, *, with_context: bool) -> dict[str, Any]:
        spec = self.engine.catalog[key]
        out = {"parent_model": "", "format": spec.format, "family": spec.arch, "families": [spec.arch],
               "parameter_size": spec.params_string, "quantization_level": spec.quantization}
        if with_context:        # /api/tags: the trained context (model_list_cache.go `cfg.ContextLen`)
            out["context_length"] = spec.max_context_length
        return out

    # ------------------------------------------------------------------ endpoints

    def root(self, req: Request) -> Reply:
        return text_reply("Ollama is running")

    def version(self, req: Request) -> Reply:
        return json_reply({"version": VERSION})

    def tags(self, req: Request) -> Reply:
        """`ListHandler`: every installed model, newest first."""
        return json_reply({"models": [
            {"name": self.listed[k], "model": self.listed[k], "modified_at": _iso(self._modified(i)),
             "size": s.size_bytes, "digest": digest(k), "details": self._details(k, with_context=True),
             "capabilities": ["completion"]}
            for i, (k, s) in enumerate(self.engine.catalog.items())]})

    @staticmethod
    def _modified(index: int) -> float:
        return MODIFIED_AT.timestamp() - 60 * index

    def ps(self, req: Request) -> Reply:
        """`PsHandler`: loaded runners (a loading one is not listed yet: it joins the scheduler's list
        once `llama.Load` returns), longest time to expiry first."""
        self.sched.expire()
        now = time.time()
        rows = []
        for i in self.engine.instances():
            if i.state != "loaded":
                continue
            expires = self.sched.expires_at(i)
            rows.append((expires, {
                "name": self.listed[i.key], "model": self.listed[i.key], "size": i.spec.size_bytes,
                "digest": digest(i.key), "details": self._details(i.key, with_context=False),
                "expires_at": _iso(min(expires, now + FOREVER_SECONDS)),
                "size_vram": i.spec.size_bytes,     # unified memory (Apple silicon) counts as VRAM: "100% GPU"
                "context_length": i.context_length}))
        rows.sort(key=lambda r: -r[0])
        return json_reply({"models": [r for _, r in rows]})

    def openai_models(self, req: Request) -> Reply:
        """`ListMiddleware` + `openai.ToListCompletion`."""
        return json_reply({"object": "list", "data": [
            {"id": self.listed[k], "object": "model", "created": int(self._modified(i)),
             "owned_by": ollama_names.parse(self.listed[k]).namespace}
            for i, k in enumerate(self.engine.catalog)]})

    def _native(self, req: Request, *, generate: bool) -> Reply:
        self.sched.expire()
        body = self.body(req)
        keep = self.keep_alive(body)
        requested = body.get("model")
        key = self.resolve(requested, generate=generate)
        if generate:
            prompt = body.get("prompt", "")
            if not isinstance(prompt, str):
                return self.error(400, f"json: cannot unmarshal {_go_type(prompt)} into Go struct field "
                                       f"GenerateRequest.prompt of type string")
            messages = [{"role": "user", "content": prompt}] if prompt else []
        else:
            messages = self.messages(body, allow_empty=True)
        fmt = OllamaFormat(requested, generate)
        if not messages and keep == 0:
            self.sched.expire_model(key)
            return json_reply(fmt.line("", True, done_reason="unload"))
        options = body.get("options") or {}
        if not isinstance(options, dict):
            return self.error(400, "options must be an object")
        num_ctx = options.get("num_ctx")
        if num_ctx is not None and (not isinstance(num_ctx, int) or isinstance(num_ctx, bool)):
            return self.error(400, f"invalid int option \"num_ctx\": {num_ctx!r}")
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            return self.error(400, f"json: cannot unmarshal {_go_type(stream)} into Go struct field stream of type bool")
        try:
            self.sched.runner(key, keep_alive=keep, num_ctx=num_ctx)
        except EngineError as exc:
            return self.model_error(exc)
        if not messages:
            return json_reply(fmt.line("", True, done_reason="load"))
        return run_chat(self, req, model_key=key, messages=messages,
                        max_tokens=self.max_tokens(options, "num_predict"), stop=self.stop(options),
                        stream=stream, jit=True, make_format=lambda n: fmt)

    def chat(self, req: Request) -> Reply:
        return self._native(req, generate=False)

    def generate(self, req: Request) -> Reply:
        return self._native(req, generate=True)

    def openai_chat(self, req: Request) -> Reply:
        """`ChatMiddleware` then `ChatHandler`: no keep_alive and no num_ctx can be sent this way, so a
        runner keeps its keep-alive and a new one gets the default (OLLAMA_KEEP_ALIVE)."""
        v1 = self.v1
        self.sched.expire()
        requested = v1.body(req).get("model")
        key = v1.resolve(requested, generate=False)
        try:
            self.sched.runner(key, keep_alive=None, num_ctx=None)
        except EngineError as exc:
            return v1.model_error(exc)
        return openai_chat(v1, req, jit=True, model_key=key, response_model=requested)


class OllamaOpenAI(Ollama):
    """The same server seen through `/v1`: errors in OpenAI's shape, typed by status
    (`openai.NewError`: 400 `invalid_request_error`, 404 `not_found_error`, else `api_error`)."""

    def __init__(self, native: Ollama):   # shares the native flavour's state; no second scheduler
        Flavour.__init__(self, native.sim)
        self.listed, self.sched, self.v1 = native.listed, native.sched, self

    def error(self, status: int, message: str, **_: Any) -> Reply:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        return json_reply({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


def installed_name(key: str) -> str:
    """A key in LM Studio's `<base>@<quant>` form is installed on Ollama under the name the team used
    when it moved there, `<base>-<quant>` (aibot/config/modelid.py; original-bot.md §2.3)."""
    base, at, quant = key.rpartition("@")
    return f"{base}-{quant}" if at and base and quant else key


def _listed_names(catalog: dict[str, Any]) -> dict[str, str]:
    """Each key as Ollama lists it; keys Ollama would refuse, or two keys naming one model, are
    configuration errors."""
    out: dict[str, str] = {}
    seen: dict[tuple[str, ...], str] = {}
    for key in catalog:
        name = ollama_names.parse(installed_name(key))
        if not name.is_valid():
            raise SimConfigError(f"SimConfig.models: key {key!r} is not a valid Ollama model name "
                                 f"({SOURCE} types/model/name.go)")
        if name.fold() in seen:
            raise SimConfigError(f"SimConfig.models: keys {seen[name.fold()]!r} and {key!r} name the same "
                                 f"Ollama model {name.display_shortest()!r}")
        seen[name.fold()] = key
        out[key] = name.display_shortest()
    return out


def _go_type(value: Any) -> str:
    return {bool: "bool", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), "null")
