"""LM Studio 0.4's server: native REST v1, legacy REST v0, OpenAI-compatible paths and the greeting.

Facts and their sources are collected in /work/shared/reference/lmstudio-0.4-rest.md; each behaviour below
cites its source. "docs:" is a path in the `lmstudio-ai/docs` repository (rendered at lmstudio.ai/docs).

Names (see `aibot.sim.catalog` for how specs map to them): one model entry per LM Studio `key`, with
`variants` `key@quant` and a `selected_variant`; instances are named after the key (`key`, then `key:2`,
...), never after the variant. The REST load takes keys only; a `key@variant` is `model_not_found`
(lmstudio-bug-tracker #1462). Chat takes an instance id, a key or a variant (JIT-loading it).

Choices where the record is silent (docs/simulator.md lists them):
- HTTP status of a REST `model_not_found`: 404 (one secondary field report of 0.4.21);
- status of a failed REST load (`model_load_failed`): 500; its envelope is the REST error envelope of #1462;
- a chat naming a variant other than the loaded one JIT-loads that variant as another instance (`key:2`);
- a request generating on an instance that is unloaded (REST unload, Auto-Evict) is cut: the connection is
  reset (the real server logs "Model is unloaded.", #1492; what the client receives is not documented);
- the idle TTL of JIT-loaded models is checked lazily, on the next request to this server.
"""

from __future__ import annotations

from typing import Any

from aibot.sim.apis.common import Flavour, Timing, Usage, openai_chat
from aibot.sim.catalog import GB, VariantGroup, lmstudio_key, lmstudio_quantization, lmstudio_variant, variant_groups
from aibot.sim.engine import EngineError, InsufficientMemory, NotLoaded, UnknownModel
from aibot.sim.http import HttpError, Reply, Request, Route, json_reply
from aibot.sim.replies import ReplyPlan

# docs:1_developer/2_rest/load.md: the documented request fields. Anything else is rejected "as
# unrecognized" (lmstudio-bug-tracker #2024, 0.4.16): no `parallel`, no `ttl`.
LOAD_FIELDS = {"model", "context_length", "eval_batch_size", "flash_attention", "num_experts",
               "offload_kv_cache_to_gpu", "echo_load_config"}
# lmstudio-bug-tracker #1730 (0.4.8).
NO_MODELS = "No models loaded. Please load a model in the developer page or use the 'lms load' command."
# The generic load failure's text in LM Studio's own words (lmstudio-bug-tracker #2056, 0.4.16); #2295
# (0.4.21) reports that an out-of-memory REST load comes back only as such a `model_load_failed`.
LOAD_FAILED = "Error loading model. (Exit code: null). Please check settings and try loading the model again."
# docs:1_developer/0_core/authentication.mdx; body as quoted from LM Studio's log (secondary: agustif/opencode-lmstudio #41).
TOKEN_REQUIRED = ("An LM Studio API token is required to make requests to this server, but none was provided using "
                  "the Authorization header using the 'Bearer' scheme (i.e., 'Authorization: Bearer $LM_API_TOKEN'). "
                  "Learn more at: https://lmstudio.ai/docs/developer/core/authentication.")
OWNED_BY = "organization_owner"   # /v1/models entries (lmstudio-js #180)


def guardrail_message(size_bytes: int) -> str:
    """The memory guardrail's refusal, word for word (lmstudio-bug-tracker #1202, #1038)."""
    return ("Model loading was stopped due to insufficient system resources. Under the current settings, this model "
            f"requires approximately {size_bytes / GB:.2f} GB of memory, and continuing to load it would likely "
            "overload your system and cause it to freeze. If you think this is incorrect, you can adjust the model "
            "loading guardrails in settings.")


def rest_error(status: int, type_: str, message: str, **more: Any) -> Reply:
    """The v1 REST error envelope: `{"error": {"type", "message"}}` (lmstudio-bug-tracker #1462;
    docs:1_developer/2_rest/streaming-events.md adds `code` and `param` where they apply)."""
    return json_reply({"error": {"type": type_, "message": message, **more}}, status)


class LMStudio(Flavour):
    name = "lmstudio"

    def __init__(self, sim: Any):
        super().__init__(sim)
        self.groups: dict[str, VariantGroup] = variant_groups(self.engine.catalog)
        self.variants = {lmstudio_variant(s): s for g in self.groups.values() for s in g.specs}
        # Instances are named after the model key: `key`, `key:2`, ... (lmstudio-bug-tracker #168, #1582, #2108;
        # docs list.md example: a loaded instance's `id` equals the key).
        self.engine.instance_name = lmstudio_key
        # Auto-Evict, default on: "At most 1 model is kept loaded in memory at a time (when loaded via JIT)",
        # "Non-JIT loaded models are not affected" (docs:1_developer/0_core/ttl-and-auto-evict.md); a JIT load
        # evicts the previous JIT model even while it generates (lmstudio-bug-tracker #671).
        self.engine.jit_keep_last = self.config.lmstudio_auto_evict
        # "Model is unloaded." for work on an unloaded instance (lmstudio-bug-tracker #1492 logs).
        self.engine.cut_on_unload = True

    def routes(self) -> list[Route]:
        version = self.config.lmstudio_version
        openai = [
            Route("GET", "/v1/models", self.openai_models),
            Route("POST", "/v1/chat/completions", self.chat, chat=True),
        ]
        if version == "openai-only":
            return self._expiring(openai)
        v0 = [
            # lmstudio-js packages/lms-client/src/LMStudioClient.ts:214-221; lms src/createClient.ts:21.
            Route("GET", "/lmstudio-greeting", self.greeting, public=True),
            Route("GET", "/api/v0/models", self.v0_models),
            Route("GET", r"/api/v0/models/(?P<model>.+)", self.v0_model),
            Route("POST", "/api/v0/chat/completions", self.v0_chat, chat=True),
        ]
        if version == "0.3":
            return self._expiring(openai + v0)
        v1 = [   # docs:1_developer/2_rest/index.mdx, since 0.4.0
            Route("GET", "/api/v1/models", self.v1_models),
            Route("POST", "/api/v1/models/load", self.v1_load),
            Route("POST", "/api/v1/models/unload", self.v1_unload),
        ]
        return self._expiring(openai + v0 + v1)

    # ------------------------------------------------------------------ JIT idle TTL

    def _expiring(self, routes: list[Route]) -> list[Route]:
        """Every API request first unloads JIT-loaded instances idle past the TTL, so a listing shows them gone."""
        def wrap(handler: Any) -> Any:
            def handle(req: Request, **params: str) -> Reply:
                self.expire_idle_jit()
                return handler(req, **params)
            return handle
        return [Route(r.method, r.pattern, wrap(r.handler), chat=r.chat, public=r.public) for r in routes]

    def expire_idle_jit(self) -> int:
        """JIT-loaded models get an idle TTL (60 min by default); "A model is considered idle if it's not doing
        any work" and the timer resets on every request; models loaded with `lms load` or REST have none
        (docs:1_developer/0_core/ttl-and-auto-evict.md). The engine keeps `last_used` at each start and end of
        a generation, so expiry = last_used + TTL, and `expire_idle` never takes a busy instance."""
        ttl = self.config.lmstudio_jit_ttl_seconds
        if ttl is None:
            return 0
        for inst in self.engine.instances():
            if inst.jit and inst.state == "loaded":
                self.engine.set_expiry(inst.id, inst.last_used + ttl)
        return self.engine.expire_idle()

    # ------------------------------------------------------------------ names

    def _loaded(self) -> list[Any]:
        return [i for i in self.engine.instances() if i.state == "loaded"]

    def resolve(self, name: str) -> tuple[str, str]:
        """(spec key, the id the reply names) for a chat's `model`: an instance id serves on that model;
        a key means its selected variant; a variant name means that variant (JIT-loads it: secondary reports
        QwenLM/qwen-code #10065, lmstudio-bug-tracker #1730). Unknown names: 400 `model_not_found`."""
        for inst in self._loaded():
            if inst.id == name:
                return inst.key, inst.id
        group = self.groups.get(name)
        if group is not None:
            return group.selected.key, name
        spec = self.variants.get(name)
        if spec is not None:
            return spec.key, name
        raise HttpError(self.invalid_identifier(name))

    def invalid_identifier(self, name: str) -> Reply:
        """Secondary (gpt-researcher #1556 quoting LM Studio; 0.4.23 suggests variant ids too, qwen-code #10065)."""
        suggestions = ", ".join(list(self.groups)[:3])
        return self.error(400, f'Invalid model identifier "{name}". Please specify a valid downloaded model '
                               f"(e.g., {suggestions}).", param="model", code="model_not_found")

    # ------------------------------------------------------------------ errors

    def not_found(self, req: Request) -> Reply:
        """Unknown path or method: HTTP 200 by default, "... Returning 200 anyway" (lmstudio-bug-tracker #618,
        #1323, #2085)."""
        return json_reply({"error": f"Unexpected endpoint or method. ({req.method} {req.path})"},
                          self.config.unknown_endpoint_status)

    def unauthorized(self) -> Reply:
        """Status 401 (secondary: DesktopCommanderMCP #482); body quoted in agustif/opencode-lmstudio #41."""
        return rest_error(401, "invalid_request", TOKEN_REQUIRED, code="invalid_api_key")

    def model_error(self, exc: EngineError) -> Reply:
        if isinstance(exc, NotLoaded):
            if not exc.loaded:
                return self.error(400, NO_MODELS, param="model")   # #1730; 400 as in gpt-researcher #1556
            loaded = sorted({lmstudio_key(self.engine.catalog[k]) for k in exc.loaded})
            return self.error(400, f'Model "{exc.key}" is not loaded. Loaded models: {", ".join(loaded)}. '
                                   "Load it first or enable Just-In-Time model loading.", param="model",
                              code="model_not_loaded")
        if isinstance(exc, UnknownModel):
            return self.invalid_identifier(exc.key)
        if isinstance(exc, InsufficientMemory):
            return self.load_failure(exc)
        return super().model_error(exc)

    def load_failure(self, exc: InsufficientMemory) -> Reply:
        """An out-of-memory load: the generic `model_load_failed` (#2295) unless configured to answer with the
        guardrail's refusal (#1202), which is then also typed `model_load_failed` (its type is not documented)."""
        if self.config.lmstudio_load_failure == "guardrail":
            message = guardrail_message(exc.size)
        else:
            message = f'Failed to load model "{lmstudio_key(self.engine.catalog[exc.key])}". {LOAD_FAILED}'
        return rest_error(500, "model_load_failed", message)

    # ------------------------------------------------------------------ endpoints

    def greeting(self, req: Request) -> Reply:
        return json_reply({"lmstudio": True, "version": self.config.lmstudio_version, "sim": True})

    def openai_models(self, req: Request) -> Reply:
        """Loaded instances by id (`key`, `key:2`: lmstudio-js #180); with JIT on, every downloaded model too:
        "The list may include all downloaded models when Just-In-Time loading is enabled"
        (docs:1_developer/3_openai-compat/models.md)."""
        ids = list(self.groups) if self.config.jit else []
        ids += sorted({i.id for i in self._loaded()} - set(ids))
        return json_reply({"object": "list", "data": [{"id": i, "object": "model", "owned_by": OWNED_BY} for i in ids]})

    def _v0_entry(self, group: VariantGroup) -> dict[str, Any]:
        """docs:1_developer/2_rest/endpoints.mdx; `loaded_context_length` when loaded (#1666)."""
        spec = group.selected
        loaded = [i for i in self._loaded() if lmstudio_key(i.spec) == group.key]
        out = {"id": group.key, "object": "model", "type": spec.type, "publisher": spec.publisher, "arch": spec.arch,
               "compatibility_type": spec.format, "quantization": lmstudio_quantization(spec),
               "state": "loaded" if loaded else "not-loaded", "max_context_length": spec.max_context_length,
               "capabilities": []}
        if loaded:
            out["loaded_context_length"] = loaded[0].context_length
        return out

    def v0_models(self, req: Request) -> Reply:
        """Only loaded models unless JIT is on (lmstudio-bug-tracker #816, #726)."""
        entries = [self._v0_entry(g) for g in self.groups.values()]
        if not self.config.jit:
            entries = [e for e in entries if e["state"] == "loaded"]
        return json_reply({"object": "list", "data": entries})

    def v0_model(self, req: Request, model: str) -> Reply:
        group = self.groups.get(model)
        if group is None:
            return self.error(404, f'Model "{model}" not found. Please specify a valid downloaded model.',
                              param="model", code="model_not_found")
        return json_reply(self._v0_entry(group))

    def v1_models(self, req: Request) -> Reply:
        """docs:1_developer/2_rest/list.md: one entry per key, `variants` + `selected_variant`, and
        `loaded_instances[]` named by key (never by variant), each with its `config`."""
        loaded = self._loaded()
        models = []
        for key, group in self.groups.items():
            spec = group.selected
            models.append({
                "type": spec.type, "publisher": spec.publisher, "key": key, "display_name": spec.display_name or
                key.split("/")[-1], "architecture": spec.arch,
                "quantization": {"name": lmstudio_quantization(spec), "bits_per_weight": spec.bits_per_weight},
                "size_bytes": spec.size_bytes, "params_string": spec.params_string,
                "loaded_instances": [
                    {"id": i.id, "config": {"context_length": i.context_length, "eval_batch_size": 512,
                                            "parallel": i.parallel, "flash_attention": True,
                                            "offload_kv_cache_to_gpu": True}}
                    for i in loaded if lmstudio_key(i.spec) == key],
                "max_context_length": spec.max_context_length, "format": spec.format,
                "capabilities": {"vision": False, "trained_for_tool_use": False},
                "description": None,
                "variants": group.variant_names(),
                "selected_variant": lmstudio_variant(spec),
            })
        return json_reply({"models": models})

    def v1_load(self, req: Request) -> Reply:
        """docs:1_developer/2_rest/load.md. Keys only: `key@variant` is `model_not_found` (#1462); a model
        already loaded gets another instance `key:2` (#168, #1582; `load_duplicates`); returns once loaded."""
        body = self.body(req)
        unknown = sorted(set(body) - LOAD_FIELDS)
        if unknown:
            return rest_error(400, "invalid_request",
                              "Unrecognized key(s) in object: " + ", ".join(f"'{k}'" for k in unknown),
                              param=unknown[0])
        model = self.require(body, "model")
        group = self.groups.get(model)
        if group is None:
            return rest_error(404, "model_not_found", f"Model {model} not found in downloaded models")
        try:
            inst = self.engine.load(group.selected.key, context_length=body.get("context_length"))
        except EngineError as exc:
            return self.model_error(exc)
        out: dict[str, Any] = {"type": inst.spec.type, "instance_id": inst.id,
                               "load_time_seconds": round(inst.load_seconds, 3), "status": "loaded"}
        if body.get("echo_load_config"):
            out["load_config"] = {"context_length": inst.context_length, "eval_batch_size": 512,
                                  "flash_attention": True, "offload_kv_cache_to_gpu": True}
        return json_reply(out)

    def v1_unload(self, req: Request) -> Reply:
        """docs:1_developer/2_rest/unload.md: `{"instance_id"}` -> `{"instance_id"}`; exactly that instance."""
        body = self.body(req)
        instance_id = self.require(body, "instance_id")
        try:
            self.engine.unload(instance_id)
        except EngineError:
            return rest_error(404, "model_not_found", f"No loaded model instance with instance_id '{instance_id}'",
                              param="instance_id")
        return json_reply({"instance_id": instance_id})

    def _openai_chat(self, req: Request, extras: Any = None) -> Reply:
        name = self.body(req).get("model")
        if not isinstance(name, str) or not name:
            return openai_chat(self, req, jit=self.config.jit)   # answers the missing/mistyped `model`
        spec_key, shown = self.resolve(name)

        def reply_extras(plan: ReplyPlan, usage: Usage, timing: Timing) -> dict[str, Any]:
            out = extras(spec_key, plan, usage, timing) if extras else {}
            return {**out, "model": self.serving_id(spec_key, shown)}

        # The reply's `model` is the serving instance's id (`"model": "gemma-3-1b-it-qat:2"`, #619). A streamed
        # reply's chunks are formatted before the generation starts, so they name the requested id.
        return openai_chat(self, req, jit=self.config.jit, model_key=spec_key, response_model=shown,
                           extras=reply_extras)

    def serving_id(self, spec_key: str, requested: str) -> str:
        ids = [i.id for i in self._loaded() if i.key == spec_key]
        return requested if requested in ids or not ids else ids[0]

    def chat(self, req: Request) -> Reply:
        return self._openai_chat(req)

    def v0_chat(self, req: Request) -> Reply:
        """docs:1_developer/2_rest/endpoints.mdx: the OpenAI reply plus `stats`, `model_info`, `runtime`."""
        def extras(spec_key: str, plan: ReplyPlan, usage: Usage, timing: Timing) -> dict[str, Any]:
            spec = self.engine.catalog[spec_key]
            gen = max(timing.generation_s, 1e-6)
            return {
                "stats": {"tokens_per_second": round(usage.completion_tokens / gen, 2),
                          "time_to_first_token": round(timing.first_token_s, 3),
                          "generation_time": round(gen, 3),
                          "stop_reason": "eosFound" if plan.finish_reason == "stop" else "maxPredictedTokensReached"},
                "model_info": {"arch": spec.arch, "quant": lmstudio_quantization(spec), "format": spec.format,
                               "context_length": spec.context_length},
                "runtime": {"name": "llama.cpp-sim", "version": "0.0.0", "supported_formats": ["gguf"]},
            }
        return self._openai_chat(req, extras)
