"""llama.cpp's `llama-server`: single-model mode (ignores the `model` field) and router mode (many models,
routed by `model`, with explicit `/models/load|unload` and per-model status), as real-llm.md describes.
"""

from __future__ import annotations

from typing import Any

from aibot.sim.apis.common import Flavour, Timing, Usage, openai_chat
from aibot.sim.engine import EngineError, InsufficientMemory, InstanceInfo, NotLoaded, UnknownModel
from aibot.sim.http import HttpError, Reply, Request, Route, json_reply
from aibot.sim.replies import ReplyPlan, token_ids

CHAT_TEMPLATE = "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{% endfor %}"
BUILD = "b0000-sim"


def _timings(plan: ReplyPlan, usage: Usage, timing: Timing) -> dict[str, Any]:
    gen_ms = max(timing.generation_s * 1000, 1e-3)
    return {"timings": {"prompt_n": usage.prompt_tokens, "prompt_ms": round(timing.first_token_s * 1000, 3),
                        "predicted_n": usage.completion_tokens, "predicted_ms": round(gen_ms, 3),
                        "predicted_per_second": round(usage.completion_tokens / gen_ms * 1000, 2)}}


class LlamaCppBase(Flavour):
    def error(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
              param: str | None = None) -> Reply:
        return json_reply({"error": {"code": status, "message": message, "type": type}}, status)

    def not_found(self, req: Request) -> Reply:
        return self.error(404, "File Not Found", type="not_found_error")

    def unauthorized(self) -> Reply:
        return self.error(401, "Invalid API Key", type="authentication_error")

    def unavailable(self, message: str) -> Reply:
        return self.error(503, message, type="unavailable_error")

    def server_error(self, message: str, status: int = 500) -> Reply:
        return self.error(status, message, type="server_error")

    def model_error(self, exc: EngineError) -> Reply:
        if isinstance(exc, UnknownModel):
            return self.error(400, f"model '{exc.key}' not found")
        if isinstance(exc, NotLoaded):
            return self.error(400, f"model '{exc.key}' is not loaded")
        if isinstance(exc, InsufficientMemory):
            return self.error(500, f"failed to load model '{exc.key}': insufficient memory "
                                   f"({exc.size} bytes needed, {max(0, exc.budget - exc.used)} free)",
                              type="server_error")
        return super().model_error(exc)

    def _slots(self, inst: InstanceInfo) -> list[dict[str, Any]]:
        return [{"id": n, "id_task": -1, "n_ctx": inst.context_length, "speculative": False,
                 "is_processing": n in inst.busy_slots,
                 "params": {"n_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.95}}
                for n in range(inst.parallel)]

    def _props(self, inst: InstanceInfo) -> dict[str, Any]:
        return {"default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": inst.context_length,
                                                "speculative": False, "is_processing": bool(inst.busy_slots),
                                                "params": {"n_predict": -1, "temperature": 0.8}},
                "total_slots": inst.parallel, "model_path": f"/models/{inst.key}.gguf",
                "chat_template": CHAT_TEMPLATE, "modalities": {"vision": False, "audio": False},
                "build_info": BUILD}

    def tokenize(self, req: Request) -> Reply:
        body = self.body(req)
        content = body.get("content")
        if not isinstance(content, str):
            return self.error(400, "'content' must be a string")
        return json_reply({"tokens": token_ids(content)})

    def health(self, req: Request) -> Reply:
        return json_reply({"status": "ok"})

    def _instance(self, key: str) -> InstanceInfo | None:
        return next((i for i in self.engine.instances() if i.key == key and i.state == "loaded"), None)


class LlamaCpp(LlamaCppBase):
    """`llama-server -m model.gguf --parallel N`: one model, always loaded, `model` ignored."""

    name = "llamacpp"

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/health", self.health, public=True),
            Route("GET", "/v1/health", self.health, public=True),
            Route("GET", "/slots", self.slots),
            Route("GET", "/props", self.props),
            Route("GET", "/v1/models", self.models),
            Route("GET", "/models", self.models),
            Route("POST", "/v1/chat/completions", self.chat, chat=True),
            Route("POST", "/chat/completions", self.chat, chat=True),
            Route("POST", "/tokenize", self.tokenize),
        ]

    @property
    def key(self) -> str:
        return self.engine.single_model()

    def _loaded(self) -> InstanceInfo:
        inst = self._instance(self.key)
        if inst is None:
            raise HttpError(self.unavailable("Loading model"))
        return inst

    def slots(self, req: Request) -> Reply:
        return json_reply(self._slots(self._loaded()))

    def props(self, req: Request) -> Reply:
        return json_reply(self._props(self._loaded()))

    def models(self, req: Request) -> Reply:
        spec = self.engine.catalog[self.key]
        meta = {"vocab_type": 2, "n_vocab": 32000, "n_ctx_train": spec.max_context_length, "n_embd": 4096,
                "n_params": 0, "size": spec.size_bytes}
        return json_reply({
            "models": [{"name": self.key, "model": self.key, "modified_at": "", "size": "", "digest": "",
                        "type": "model", "description": "", "tags": [""], "capabilities": ["completion"],
                        "parameters": "", "details": {}}],
            "object": "list",
            "data": [{"id": self.key, "object": "model", "created": 1700000000, "owned_by": "llamacpp",
                      "meta": meta}]})

    def chat(self, req: Request) -> Reply:
        return openai_chat(self, req, jit=False, model_key=self.key, response_model=self.key, extras=_timings)


class LlamaCppRouter(LlamaCppBase):
    """`llama-server --models-preset ...` (router mode): per-model status, explicit loads, autoload on chat."""

    name = "llamacpp-router"

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/health", self.health, public=True),
            Route("GET", "/v1/health", self.health, public=True),
            Route("GET", "/v1/models", self.models),
            Route("GET", "/models", self.models),
            Route("POST", "/models/load", self.load),
            Route("POST", "/models/unload", self.unload),
            Route("GET", "/slots", self.slots),
            Route("GET", "/props", self.props),
            Route("POST", "/v1/chat/completions", self.chat, chat=True),
            Route("POST", "/chat/completions", self.chat, chat=True),
            Route("POST", "/tokenize", self.tokenize),
        ]

    def models(self, req: Request) -> Reply:
        states: dict[str, str] = {}
        for i in self.engine.instances():
            if states.get(i.key) != "loaded":
                states[i.key] = i.state
        data = []
        for key, spec in self.engine.catalog.items():
            path = f"/models/{key}.gguf"
            data.append({"id": key, "object": "model", "created": 1700000000, "owned_by": "llamacpp",
                         "in_cache": True, "path": path,
                         "status": {"value": states.get(key, "unloaded"),
                                    "args": ["llama-server", "-m", path, "--parallel",
                                             str(self.config.parallel_for(spec))]}})
        return json_reply({"object": "list", "data": data})

    def _model_param(self, req: Request) -> str:
        key = req.query.get("model")
        if not key:
            raise HttpError(self.error(400, "query parameter 'model' is required in router mode"))
        if key not in self.engine.catalog:
            raise HttpError(self.model_error(UnknownModel(key)))
        inst = self._instance(key)
        if inst is None:
            raise HttpError(self.model_error(NotLoaded(key, [])))
        return key

    def slots(self, req: Request) -> Reply:
        key = self._model_param(req)
        inst = self._instance(key)
        return json_reply(self._slots(inst)) if inst else self.model_error(NotLoaded(key, []))

    def props(self, req: Request) -> Reply:
        key = self._model_param(req)
        inst = self._instance(key)
        return json_reply(self._props(inst)) if inst else self.model_error(NotLoaded(key, []))

    def load(self, req: Request) -> Reply:
        body = self.body(req)
        key = self.require(body, "model")
        try:
            self.engine.start_load(key)
        except EngineError as exc:
            return self.model_error(exc)
        return json_reply({"success": True})

    def unload(self, req: Request) -> Reply:
        body = self.body(req)
        key = self.require(body, "model")
        try:
            if not self.engine.unload_model(key):
                return self.model_error(NotLoaded(key, []))
        except EngineError as exc:
            return self.model_error(exc)
        return json_reply({"success": True})

    def chat(self, req: Request) -> Reply:
        return openai_chat(self, req, jit=self.config.jit, extras=_timings)
