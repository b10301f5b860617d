"""Ollama: `/api/chat`, `/api/generate` (NDJSON streams by default), `/api/ps`, `/api/tags`, `keep_alive`.

Ollama manages residency itself: any request loads its model, an idle model unloads when its keep-alive
passes (checked lazily on each request), `keep_alive: 0` unloads, and a load that does not fit the memory
budget first evicts idle models, least recently used first (`Engine(evict_lru=True)`).
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from typing import Any

from aibot.sim.apis.common import ChatFormat, Flavour, Timing, Usage, openai_chat, run_chat
from aibot.sim.engine import EngineError, InsufficientMemory, NotLoaded, UnknownModel
from aibot.sim.http import HttpError, Reply, Request, Route, json_reply, text_reply
from aibot.sim.replies import ReplyPlan

VERSION = "0.12.6"
FOREVER = "2318-01-01T00:00:00Z"
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to keep a model loaded after a request; None = forever (negative), 0 = unload now.

    Accepts numbers (seconds) and Go duration strings ("5m", "1h30m", "-1", "0").
    """
    if isinstance(value, bool):
        raise ValueError(f"keep_alive: {value!r} is not a duration")
    if isinstance(value, (int, float)):
        return None if value < 0 else float(value)
    if isinstance(value, str):
        s = value.strip()
        try:
            n = float(s)
            return None if n < 0 else n
        except ValueError:
            pass
        if s.startswith("-"):
            return None
        parts = _DURATION_RE.findall(s)
        if parts and "".join(a + b for a, b in parts) == s:
            return sum(float(a) * _UNITS[b] for a, b in parts)
    raise ValueError(f'time: invalid duration "{value}"')


def _iso(ts: float | None) -> str:
    if ts is None:
        return FOREVER
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


class OllamaFormat(ChatFormat):
    """NDJSON lines of `/api/chat` (`message.content`) or `/api/generate` (`response`)."""

    stream_content_type = "application/x-ndjson"

    def __init__(self, model: str, generate: bool):
        self.model = model
        self.generate = generate

    def _line(self, content: str, done: bool, **more: Any) -> dict[str, Any]:
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
        return self._line(plan.text, True, **self._stats(plan, usage, timing))

    def empty_body(self, usage: Usage) -> dict[str, Any]:
        return self._line("", True, done_reason="stop", eval_count=0)

    def stream_piece(self, piece: str) -> bytes:
        return json.dumps(self._line(piece, False)).encode() + b"\n"

    def stream_end(self, plan: ReplyPlan, usage: Usage, timing: Timing) -> bytes:
        return json.dumps(self._line("", True, **self._stats(plan, usage, timing))).encode() + b"\n"

    def stream_empty(self, usage: Usage) -> bytes:
        return json.dumps(self.empty_body(usage)).encode() + b"\n"

    def malformed(self) -> bytes:
        return b'{"model": "' + self.model.encode() + b'", "message": {"role": "assistant", "content": "unterm'


class Ollama(Flavour):
    name = "ollama"

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/", self.root, public=True),
            Route("GET", "/api/version", self.version, public=True),
            Route("GET", "/api/tags", self.tags),
            Route("GET", "/api/ps", self.ps),
            Route("POST", "/api/chat", self.chat, chat=True),
            Route("POST", "/api/generate", self.generate, chat=True),
            Route("GET", "/v1/models", self.openai_models),
            Route("POST", "/v1/chat/completions", self.openai_chat, chat=True),
        ]

    def error(self, status: int, message: str, **_: Any) -> Reply:
        return json_reply({"error": message}, status)

    def not_found(self, req: Request) -> Reply:
        return text_reply("404 page not found", 404)

    def unauthorized(self) -> Reply:
        return self.error(401, "unauthorized")

    def model_error(self, exc: EngineError) -> Reply:
        if isinstance(exc, (UnknownModel, NotLoaded)):
            return self.error(404, f'model "{exc.key}" not found, try pulling it first')
        if isinstance(exc, InsufficientMemory):
            free = max(0, exc.budget - exc.used)
            return self.error(500, f"model requires more system memory ({exc.size / 2**30:.1f} GiB) than is "
                                   f"available ({free / 2**30:.1f} GiB)")
        return super().model_error(exc)

    # ------------------------------------------------------------------ helpers

    def resolve(self, name: str) -> str:
        cat = self.engine.catalog
        for candidate in (name, name.removesuffix(":latest"), f"{name}:latest"):
            if candidate in cat:
                return candidate
        raise HttpError(self.model_error(UnknownModel(name)))

    def keep_alive(self, body: dict[str, Any]) -> float | None:
        raw = body.get("keep_alive", self.config.ollama_keep_alive)
        try:
            return parse_keep_alive(raw)
        except ValueError as exc:
            raise HttpError(self.error(400, str(exc))) from None

    @staticmethod
    def _expiry(seconds: float | None) -> float | None:
        return None if seconds is None else time.time() + seconds

    def _details(self, key: str) -> dict[str, Any]:
        spec = self.engine.catalog[key]
        return {"parent_model": "", "format": spec.format, "family": spec.arch, "families": [spec.arch],
                "parameter_size": spec.params_string, "quantization_level": spec.quantization}

    # ------------------------------------------------------------------ endpoints

    def root(self, req: Request) -> Reply:
        return text_reply("Ollama is running")

    def version(self, req: Request) -> Reply:
        return json_reply({"version": VERSION})

    def tags(self, req: Request) -> Reply:
        return json_reply({"models": [
            {"name": k, "model": k, "modified_at": "2025-01-01T00:00:00Z", "size": s.size_bytes,
             "digest": f"{abs(hash(k)) % 16**12:012x}", "details": self._details(k)}
            for k, s in self.engine.catalog.items()]})

    def ps(self, req: Request) -> Reply:
        self.engine.expire_idle()
        return json_reply({"models": [
            {"name": i.key, "model": i.key, "size": i.spec.size_bytes, "digest": f"{abs(hash(i.key)) % 16**12:012x}",
             "details": self._details(i.key), "expires_at": _iso(i.expires_at), "size_vram": i.spec.size_bytes,
             "context_length": i.context_length}
            for i in self.engine.instances() if i.state == "loaded"]})

    def openai_models(self, req: Request) -> Reply:
        return json_reply({"object": "list", "data": [
            {"id": k, "object": "model", "created": 1700000000, "owned_by": "library"} for k in self.engine.catalog]})

    def _residency(self, key: str, keep: float | None, generate: bool) -> Reply:
        """An empty prompt only loads (or, with keep_alive 0, unloads) the model, as Ollama documents."""
        fmt = OllamaFormat(key, generate)
        if keep == 0:
            self.engine.unload_model(key)
            return json_reply(fmt._line("", True, done_reason="unload"))
        try:
            inst = self.engine.load(key, reuse_loaded=True)
        except EngineError as exc:
            return self.model_error(exc)
        self.engine.set_expiry(inst.id, self._expiry(keep))
        return json_reply(fmt._line("", True, done_reason="load"))

    def _generate(self, req: Request, *, generate: bool) -> Reply:
        self.engine.expire_idle()
        body = self.body(req)
        key = self.resolve(self.require(body, "model"))
        keep = self.keep_alive(body)
        if generate:
            prompt = body.get("prompt", "")
            if not isinstance(prompt, str):
                return self.error(400, "'prompt' must be a string")
            messages = [{"role": "user", "content": prompt}] if prompt else []
        else:
            messages = self.messages(body, allow_empty=True)
        if not messages:
            return self._residency(key, keep, generate)
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            return self.error(400, f"'stream': {stream!r} must be a boolean")
        options = body.get("options") or {}
        if not isinstance(options, dict):
            return self.error(400, "'options' must be an object")
        expiry = self._expiry(keep)
        return run_chat(self, req, model_key=key, messages=messages,
                        max_tokens=self.max_tokens(options, "num_predict"), stop=self.stop(options),
                        stream=stream, jit=True, make_format=lambda n: OllamaFormat(key, generate),
                        on_lease=lambda lease: self.engine.set_expiry(lease.instance.id, expiry))

    def chat(self, req: Request) -> Reply:
        return self._generate(req, generate=False)

    def generate(self, req: Request) -> Reply:
        return self._generate(req, generate=True)

    def openai_chat(self, req: Request) -> Reply:
        self.engine.expire_idle()
        return openai_chat(self, req, jit=True)

