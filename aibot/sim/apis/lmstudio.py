"""LM Studio's server: native REST v1 (0.4+), legacy REST v0, OpenAI-compatible paths and the greeting.

Shapes follow /work/shared/reference/lmstudio-api.md. Choices where the reference is silent (documented in
docs/simulator.md): a chat for a model that is not loaded with JIT off answers 400 with "No models loaded..."
when nothing is loaded; REST load rejects undocumented fields such as `parallel` (as #2024 reports); a
REST load of an already-loaded model adds another instance (`key:2`) unless `load_duplicates=False`.
"""

from __future__ import annotations

from typing import Any

from aibot.sim.apis.common import Flavour, Timing, Usage, openai_chat
from aibot.sim.engine import EngineError, InsufficientMemory, NotLoaded, UnknownModel
from aibot.sim.http import Reply, Request, Route, json_reply
from aibot.sim.replies import ReplyPlan

LOAD_FIELDS = {"model", "context_length", "eval_batch_size", "flash_attention", "num_experts",
               "offload_kv_cache_to_gpu", "echo_load_config"}
NO_MODELS = "No models loaded. Please load a model in the developer page or use the 'lms load' command."


class LMStudio(Flavour):
    name = "lmstudio"

    def routes(self) -> list[Route]:
        version = self.config.lmstudio_version
        openai = [
            Route("GET", "/v1/models", self.openai_models),
            Route("POST", "/v1/chat/completions", self.chat, chat=True),
        ]
        if version == "openai-only":
            return openai
        v0 = [
            Route("GET", "/lmstudio-greeting", self.greeting, public=True),
            Route("GET", "/api/v0/models", self.v0_models),
            Route("GET", r"/api/v0/models/(?P<model>.+)", self.v0_model),
            Route("POST", "/api/v0/chat/completions", self.v0_chat, chat=True),
        ]
        if version == "0.3":
            return openai + v0
        v1 = [
            Route("GET", "/api/v1/models", self.v1_models),
            Route("POST", "/api/v1/models/load", self.v1_load),
            Route("POST", "/api/v1/models/unload", self.v1_unload),
        ]
        return openai + v0 + v1

    def not_found(self, req: Request) -> Reply:
        return json_reply({"error": f"Unexpected endpoint or method. ({req.method} {req.path})"},
                          self.config.unknown_endpoint_status)

    def model_error(self, exc: EngineError) -> Reply:
        if isinstance(exc, NotLoaded):
            if not exc.loaded:
                return self.error(400, NO_MODELS, param="model")
            return self.error(400, f'Model "{exc.key}" is not loaded. Loaded models: {", ".join(exc.loaded)}. '
                                   "Load it first or enable Just-In-Time model loading.", param="model",
                              code="model_not_loaded")
        if isinstance(exc, UnknownModel):
            return self.error(404, f'Model "{exc.key}" not found. Please specify a valid downloaded model.',
                              param="model", code="model_not_found")
        if isinstance(exc, InsufficientMemory):
            return self.error(500, str(exc), type="server_error", code="model_load_failed")
        return super().model_error(exc)

    # ------------------------------------------------------------------ endpoints

    def greeting(self, req: Request) -> Reply:
        return json_reply({"lmstudio": True, "version": self.config.lmstudio_version, "sim": True})

    def openai_models(self, req: Request) -> Reply:
        """With JIT on, LM Studio lists every downloaded model; without, only loaded instances."""
        loaded = [i for i in self.engine.instances() if i.state == "loaded"]
        ids: list[tuple[str, str]] = []
        if self.config.jit:
            ids = [(k, s.publisher) for k, s in self.engine.catalog.items()]
        seen = {i for i, _ in ids}
        ids += [(i.id, i.spec.publisher) for i in loaded if i.id not in seen]
        return json_reply({"object": "list",
                           "data": [{"id": i, "object": "model", "owned_by": p} for i, p in ids]})

    def _v0_entry(self, key: str) -> dict[str, Any]:
        spec = self.engine.catalog[key]
        loaded = [i for i in self.engine.instances() if i.key == key and i.state == "loaded"]
        out = {"id": key, "object": "model", "type": spec.type, "publisher": spec.publisher, "arch": spec.arch,
               "compatibility_type": spec.format, "quantization": spec.quantization,
               "state": "loaded" if loaded else "not-loaded", "max_context_length": spec.max_context_length,
               "capabilities": []}
        if loaded:
            out["loaded_context_length"] = loaded[0].context_length
        return out

    def v0_models(self, req: Request) -> Reply:
        return json_reply({"object": "list", "data": [self._v0_entry(k) for k in self.engine.catalog]})

    def v0_model(self, req: Request, model: str) -> Reply:
        if model not in self.engine.catalog:
            return self.model_error(UnknownModel(model))
        return json_reply(self._v0_entry(model))

    def v1_models(self, req: Request) -> Reply:
        instances = [i for i in self.engine.instances() if i.state == "loaded"]
        models = []
        for key, spec in self.engine.catalog.items():
            models.append({
                "type": spec.type, "publisher": spec.publisher, "key": key, "display_name": spec.name,
                "architecture": spec.arch,
                "quantization": {"name": spec.quantization, "bits_per_weight": spec.bits_per_weight},
                "size_bytes": spec.size_bytes, "params_string": spec.params_string,
                "loaded_instances": [
                    {"id": i.id, "config": {"context_length": i.context_length, "eval_batch_size": 512,
                                            "parallel": i.parallel, "flash_attention": True,
                                            "offload_kv_cache_to_gpu": True}}
                    for i in instances if i.key == key],
                "max_context_length": spec.max_context_length, "format": spec.format,
                "capabilities": {"vision": False, "trained_for_tool_use": False},
                "description": None,
                "variants": [f"{key}@{spec.quantization.lower()}"],
                "selected_variant": f"{key}@{spec.quantization.lower()}",
            })
        return json_reply({"models": models})

    def v1_load(self, req: Request) -> Reply:
        body = self.body(req)
        unknown = sorted(set(body) - LOAD_FIELDS)
        if unknown:
            return self.error(400, "Unrecognized key(s) in object: " + ", ".join(f"'{k}'" for k in unknown),
                              param=unknown[0])
        model = self.require(body, "model")
        ctx = body.get("context_length")
        try:
            inst = self.engine.load(model, context_length=ctx)
        except EngineError as exc:
            return self.model_error(exc)
        out: dict[str, Any] = {"type": inst.spec.type, "instance_id": inst.id,
                               "load_time_seconds": round(inst.load_seconds, 3), "status": "loaded"}
        if body.get("echo_load_config"):
            out["load_config"] = {"context_length": inst.context_length, "eval_batch_size": 512,
                                  "flash_attention": True, "offload_kv_cache_to_gpu": True, "parallel": inst.parallel}
        return json_reply(out)

    def v1_unload(self, req: Request) -> Reply:
        body = self.body(req)
        instance_id = self.require(body, "instance_id")
        try:
            self.engine.unload(instance_id)
        except EngineError:
            return self.error(404, f"No loaded model instance with instance_id '{instance_id}'",
                              param="instance_id", code="model_not_found")
        return json_reply({"instance_id": instance_id})

    def chat(self, req: Request) -> Reply:
        return openai_chat(self, req, jit=self.config.jit)

    def v0_chat(self, req: Request) -> Reply:
        def extras(plan: ReplyPlan, usage: Usage, timing: Timing) -> dict[str, Any]:
            key = self._requested_model(req)
            spec = self.engine.catalog.get(key)
            gen = max(timing.generation_s, 1e-6)
            return {
                "stats": {"tokens_per_second": round(usage.completion_tokens / gen, 2),
                          "time_to_first_token": round(timing.first_token_s, 3),
                          "generation_time": round(gen, 3),
                          "stop_reason": "eosFound" if plan.finish_reason == "stop" else "maxPredictedTokensReached"},
                "model_info": {"arch": spec.arch if spec else None, "quant": spec.quantization if spec else None,
                               "format": spec.format if spec else None,
                               "context_length": spec.context_length if spec else None},
                "runtime": {"name": "llama.cpp-sim", "version": "0.0.0", "supported_formats": ["gguf"]},
            }
        return openai_chat(self, req, jit=self.config.jit, extras=extras)

    @staticmethod
    def _requested_model(req: Request) -> str:
        return str(req.json_object().get("model", ""))   # openai_chat validated the body already
