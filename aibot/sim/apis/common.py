"""What every API flavour shares: error mapping, and one generation path with pluggable wire formats.

`run_chat` is the single place where a request takes a slot, is paced by the engine and is turned into
either one JSON body or a stream; the flavour only supplies a `ChatFormat` (OpenAI SSE chunks, Ollama
NDJSON lines) and its error shapes. Body-shape faults (malformed, empty choices, truncated, slow) are
applied here so they look the same in every flavour.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aibot.sim.engine import (BadLoadRequest, EngineError, InsufficientMemory, NoSuchInstance, NotLoaded, Stopped,
                              UnknownModel)
from aibot.sim.http import AbortStream, BadBody, HttpError, Reply, Request, Route, json_reply
from aibot.sim.replies import ReplyPlan, plan_reply, prompt_tokens

if TYPE_CHECKING:
    from aibot.sim.server import SimServer


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def openai(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass
class Timing:
    queued_s: float = 0.0      # waiting for a slot or a JIT load
    first_token_s: float = 0.0
    generation_s: float = 0.0


class ChatFormat:
    """Turns a planned reply into the flavour's body or stream frames."""

    stream_content_type = "text/event-stream"

    def body(self, plan: ReplyPlan, usage: Usage, timing: Timing) -> dict[str, Any]:
        raise NotImplementedError

    def empty_body(self, usage: Usage) -> dict[str, Any]:
        raise NotImplementedError

    def stream_start(self) -> bytes:
        return b""

    def stream_piece(self, piece: str) -> bytes:
        raise NotImplementedError

    def stream_end(self, plan: ReplyPlan, usage: Usage, timing: Timing) -> bytes:
        raise NotImplementedError

    def stream_empty(self, usage: Usage) -> bytes:
        raise NotImplementedError

    def malformed(self) -> bytes:
        return b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"index": 0, "message": {"role"'


class Flavour:
    """Base for one API dialect: routes plus the dialect's error bodies."""

    name = "base"

    def __init__(self, sim: SimServer):
        self.sim = sim
        self.engine = sim.engine
        self.config = sim.config

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def error(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
              param: str | None = None) -> Reply:
        return json_reply({"error": {"message": message, "type": type, "param": param, "code": code}}, status)

    def not_found(self, req: Request) -> Reply:
        return self.error(404, f"Invalid URL ({req.method} {req.path})", code="not_found")

    def unauthorized(self) -> Reply:
        return self.error(401, "Invalid or missing API token. Send 'Authorization: Bearer <token>'.",
                          type="invalid_request_error", code="invalid_api_key")

    def unavailable(self, message: str) -> Reply:
        return self.error(503, message, type="server_error", code="service_unavailable")

    def server_error(self, message: str, status: int = 500) -> Reply:
        return self.error(status, message, type="server_error", code="internal_error")

    def model_error(self, exc: EngineError) -> Reply:
        """Maps engine refusals to this flavour's status and body."""
        if isinstance(exc, UnknownModel):
            return self.error(404, f"The model `{exc.key}` does not exist or you do not have access to it.",
                              code="model_not_found", param="model")
        if isinstance(exc, NotLoaded):
            return self.error(404, f"The model `{exc.key}` is not loaded.", code="model_not_found", param="model")
        if isinstance(exc, InsufficientMemory):
            return self.error(500, str(exc), type="server_error", code="model_load_failed")
        if isinstance(exc, (BadLoadRequest, NoSuchInstance)):
            return self.error(400, str(exc))
        return self.server_error(str(exc))

    # -------------------------------------------------------------- request helpers

    def body(self, req: Request) -> dict[str, Any]:
        try:
            return req.json_object()
        except BadBody as exc:
            raise HttpError(self.error(400, str(exc))) from None

    def require(self, body: Mapping[str, Any], name: str, kind: type | tuple[type, ...] = str) -> Any:
        value = body.get(name)
        if value is None:
            raise HttpError(self.error(400, f"'{name}' is required", param=name))
        if not isinstance(value, kind) or (kind is str and not value):
            raise HttpError(self.error(400, f"'{name}': {value!r} has the wrong type", param=name))
        return value

    def messages(self, body: Mapping[str, Any], name: str = "messages", allow_empty: bool = False) -> list[dict]:
        msgs = body.get(name, [] if allow_empty else None)
        if msgs is None:
            raise HttpError(self.error(400, f"'{name}' is required", param=name))
        if not isinstance(msgs, list) or any(not isinstance(m, dict) for m in msgs):
            raise HttpError(self.error(400, f"'{name}' must be a list of objects", param=name))
        if not msgs and not allow_empty:
            raise HttpError(self.error(400, f"'{name}' must not be empty", param=name))
        for i, m in enumerate(msgs):
            if not isinstance(m.get("role"), str):
                raise HttpError(self.error(400, f"'{name}[{i}].role' is required", param=f"{name}[{i}].role"))
        return msgs

    def max_tokens(self, body: Mapping[str, Any], *names: str) -> int | None:
        for n in names:
            v = body.get(n)
            if v is None or v == -1:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise HttpError(self.error(400, f"'{n}': {v!r} must be a non-negative integer", param=n))
            return v
        return None

    def stop(self, body: Mapping[str, Any], name: str = "stop") -> list[str]:
        v = body.get(name)
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return v
        raise HttpError(self.error(400, f"'{name}': {v!r} must be a string or a list of strings", param=name))


def run_chat(flavour: Flavour, req: Request, *, model_key: str, messages: list[dict], max_tokens: int | None,
             stop: list[str], stream: bool, jit: bool, make_format: Callable[[int], ChatFormat],
             on_lease: Callable[[Any], None] | None = None) -> Reply:
    """Takes a slot (maybe JIT-loading), paces the generation and renders it, applying body-shape faults."""
    sim = flavour.sim
    engine = flavour.engine
    fault = req.fault
    t0 = time.monotonic()
    try:
        lease = engine.acquire(model_key, jit=jit)
    except Stopped:
        return Reply(abort=True)
    except EngineError as exc:
        return flavour.model_error(exc)
    if on_lease is not None:
        on_lease(lease)
    queued_s = time.monotonic() - t0
    counter = sim.next_counter()
    skip, human = sim.draw_reply_options()
    plan = plan_reply(model_key, messages, counter, reply_tokens=sim.config.reply_tokens, max_tokens=max_tokens,
                      stop=stop, skip=skip, human_tail=human)
    usage = Usage(prompt_tokens(messages), plan.completion_tokens)
    fmt = make_format(counter)
    extra = sim.faults.config.slow_seconds if fault == "slow" else 0.0
    timing = Timing(queued_s=queued_s)

    if not stream:
        ok = False
        try:
            t1 = time.monotonic()
            first = True
            for _ in lease.generate(plan.completion_tokens, usage.prompt_tokens, extra):
                if first:
                    timing.first_token_s, first = time.monotonic() - t1, False
            timing.generation_s = time.monotonic() - t1
            ok = True
        except Stopped:
            return Reply(abort=True)
        finally:
            lease.release(ok)
        if fault == "malformed":
            return Reply(200, fmt.malformed())
        if fault == "empty_choices":
            return json_reply(fmt.empty_body(usage))
        reply = json_reply(fmt.body(plan, usage, timing))
        reply.truncate = fault == "truncated"
        return reply

    def frames() -> Iterator[bytes]:
        ok = False
        try:
            if fault == "malformed":
                for _ in lease.generate(plan.completion_tokens, usage.prompt_tokens, extra):
                    pass
                yield b"data: " + fmt.malformed() + b"\n\n"
                ok = True
                return
            yield fmt.stream_start()
            sent = 0
            half = max(1, plan.completion_tokens // 2)
            t1 = time.monotonic()
            for n in lease.generate(plan.completion_tokens, usage.prompt_tokens, extra):
                if sent == 0:
                    timing.first_token_s = time.monotonic() - t1
                if fault != "empty_choices":
                    for piece in plan.pieces[sent:sent + n]:
                        yield fmt.stream_piece(piece)
                sent += n
                if fault == "truncated" and sent >= half:
                    raise AbortStream()
            if fault == "truncated":
                raise AbortStream()
            timing.generation_s = time.monotonic() - t1
            yield fmt.stream_empty(usage) if fault == "empty_choices" else fmt.stream_end(plan, usage, timing)
            ok = True
        finally:
            lease.release(ok)

    return Reply(200, content_type=fmt.stream_content_type, stream=frames(),
                 headers={"Cache-Control": "no-cache"})


# ------------------------------------------------------------------ OpenAI chat completions


class OpenAIFormat(ChatFormat):
    """`/v1/chat/completions` bodies and SSE chunks; `extras` adds flavour fields (LM Studio stats,
    llama.cpp timings)."""

    stream_content_type = "text/event-stream"

    def __init__(self, model_id: str, counter: int, *, include_usage: bool = False,
                 extras: Callable[[ReplyPlan, Usage, Timing], dict[str, Any]] | None = None,
                 fingerprint: str | None = None):
        self.model_id = model_id
        self.id = f"chatcmpl-sim{counter:06d}"
        self.created = int(time.time())
        self.include_usage = include_usage
        self.extras = extras
        self.fingerprint = fingerprint or model_id

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
                "system_fingerprint": self.fingerprint}

    def body(self, plan: ReplyPlan, usage: Usage, timing: Timing) -> dict[str, Any]:
        out = self._base("chat.completion")
        out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": plan.text},
                           "logprobs": None, "finish_reason": plan.finish_reason}]
        out["usage"] = usage.openai()
        if self.extras:
            out.update(self.extras(plan, usage, timing))
        return out

    def empty_body(self, usage: Usage) -> dict[str, Any]:
        out = self._base("chat.completion")
        out["choices"] = []
        out["usage"] = Usage(usage.prompt_tokens, 0).openai()
        return out

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, **more: Any) -> bytes:
        c = self._base("chat.completion.chunk")
        c["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish}]
        c.update(more)
        return b"data: " + json.dumps(c).encode() + b"\n\n"

    def stream_start(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def stream_piece(self, piece: str) -> bytes:
        return self._chunk({"content": piece})

    def stream_end(self, plan: ReplyPlan, usage: Usage, timing: Timing) -> bytes:
        out = self._chunk({}, plan.finish_reason)
        if self.include_usage:
            out += self._chunk(None, usage=usage.openai())
        return out + b"data: [DONE]\n\n"

    def stream_empty(self, usage: Usage) -> bytes:
        return self._chunk(None) + b"data: [DONE]\n\n"


def openai_chat(flavour: Flavour, req: Request, *, jit: bool, model_key: str | None = None,
                response_model: str | None = None,
                extras: Callable[[ReplyPlan, Usage, Timing], dict[str, Any]] | None = None,
                on_lease: Callable[[Any], None] | None = None) -> Reply:
    """The OpenAI-compatible chat endpoint; `model_key` forces a model (llama-server ignores the field).
    `on_lease(lease)` runs once a slot is taken; it may refuse the request (`lease.reject()`, then raise
    HttpError)."""
    body = flavour.body(req)
    requested = body.get("model")
    if model_key is None:
        model_key = flavour.require(body, "model")
    elif requested is not None and not isinstance(requested, str):
        raise HttpError(flavour.error(400, f"'model': {requested!r} must be a string", param="model"))
    messages = flavour.messages(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HttpError(flavour.error(400, f"'stream': {stream!r} must be a boolean", param="stream"))
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    return run_chat(flavour, req, model_key=model_key, messages=messages,
                    max_tokens=flavour.max_tokens(body, "max_tokens", "max_completion_tokens"),
                    stop=flavour.stop(body), stream=stream, jit=jit, on_lease=on_lease,
                    make_format=lambda n: OpenAIFormat(response_model or model_key, n, include_usage=include_usage,
                                                       extras=extras))
