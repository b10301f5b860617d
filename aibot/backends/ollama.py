"""Ollama (`kind = "ollama"`): what it has installed, what it holds in memory, and how to pin a model there.

Read against ollama/ollama @fb30760996871fa9460115c753afd2c60d4ab0f7 (v0.33.0-rc2); `routes.go` etc. below
are files of that commit. The facts that shape this backend:

- `GET /api/tags` lists every installed model (`name`, `size` on disk, `details`), `GET /api/ps` the ones
  in memory (`size` in memory, `size_vram`, `expires_at`, `context_length`); both name models in the
  `DisplayShortest` form, tag included (`x-f16:latest`): `server/model_list_cache.go`
  `buildModelListSummary`, `server/routes.go` `PsHandler`, `api/types.go` `ListModelResponse`,
  `ProcessModelResponse`. A model that is still loading is not told apart from a loaded one.
- There is no load endpoint: `POST /api/generate` with an empty prompt loads the model and answers
  `done_reason: "load"` once it is in memory (docs/api.md "Load a model"; `GenerateHandler`), and
  `keep_alive` sets how long it stays after its last request: -1 (any negative) = until told
  otherwise, 0 = unload now (`api/types.go` `Duration.UnmarshalJSON`, docs/faq.mdx "How do I keep a
  model loaded in memory"). Ollama never loads a model twice: a request for a loaded model reuses it.
- The server evicts by itself: past `OLLAMA_MAX_LOADED_MODELS` (default 3 per GPU, 3 on CPU) or when
  a new model does not fit, it unloads the model with the shortest keep-alive first, idle ones before
  busy ones (`server/sched.go` `processPending`, `findRunnerToUnload`, `ByDurationAndName`); it does
  not report that limit over the API, so `Catalogue.max_loaded` comes from the server's config
  (`max_loaded_models`), else None.
- Parallelism is the server-wide `OLLAMA_NUM_PARALLEL` (default 1, `envconfig/config.go`), not
  reported either: instances get the server config's `default_parallel`.
- Chat goes through the OpenAI-compatible path (inherited). A load never sends `options.num_ctx`:
  `/v1/chat/completions` cannot carry it, so the first chat would find the options changed and
  reload the model with the default context and the default 5-minute keep-alive (`sched.go`
  `needsReload`, `routes.go` `usesAutomaticNumCtx`). Set the context on the server
  (`OLLAMA_CONTEXT_LENGTH`, or `PARAMETER num_ctx` in a Modelfile).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from aibot.backends import ollama_names
from aibot.backends.base import (
    BackendError,
    BadResponse,
    Catalogue,
    InsufficientResources,
    LoadedModel,
    LoadFailed,
    ModelUnavailable,
    Offered,
    ServerInfo,
)
from aibot.backends.http import error_text, truncate
from aibot.backends.openai_compat import OpenAICompatBackend, embedded_error

#: An `expires_at` further away than this is "never": keep_alive -1 becomes Go's largest Duration
#: (`api/types.go` `Duration.UnmarshalJSON`: `time.Duration(math.MaxInt64)`, about 292 years), which
#: `ollama ps` prints as "Forever" once it is more than 20 years ahead (`format/time.go` `humanTime`).
FOREVER_AFTER_SECONDS = 20 * 365 * 86400

#: Ollama's own test for an out-of-memory failure (`llm/status.go` `outOfMemorySubstrings`), plus
#: the refusal wording of v0.29 and older ("model requires more system memory (X GiB) than is available
#: (Y GiB)", `llm/server.go` @f63eea3d2, seen as HTTP 500 in ollama/ollama#13556) and
#: `llm.ErrLoadRequiredFull`.
OUT_OF_MEMORY = ("out of memory", "out of device memory", "cudamalloc failed", "hipmalloc failed",
                 "failed to allocate", "allocation failed", "not enough memory", "insufficient memory",
                 "vk_error_out_of_device_memory", "erroroutofmemory", "out-of-memory",
                 "requires more system memory", "unable to load full model")


def out_of_memory(message: str) -> bool:
    low = message.lower()
    return any(p in low for p in OUT_OF_MEMORY)


def _pos_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _name(entry: dict[str, Any]) -> str:
    """`name`, else `model` (Ollama fills both with the same name: `PsHandler`, `buildModelListSummary`)."""
    name = entry.get("name") or entry.get("model")
    return name if isinstance(name, str) else ""


def _ttl(expires_at: Any, now: float) -> float | None:
    """Seconds until Ollama unloads the instance by itself; None for "never" or no readable time."""
    if not isinstance(expires_at, str):
        return None
    try:
        at = datetime.fromisoformat(expires_at).timestamp()
    except ValueError:
        return None
    if at <= 0 or at - now > FOREVER_AFTER_SECONDS:   # Go's zero time (year 1), or keep_alive -1
        return None
    return max(0.0, at - now)


class OllamaBackend(OpenAICompatBackend):
    kind = "ollama"
    can_load = True
    model_id_template = "{base}-{quant}"
    default_port = 11434

    def __init__(self, base_url: str, *, max_loaded_models: int | None = None, **kwargs: Any):
        """`max_loaded_models` is the server's `OLLAMA_MAX_LOADED_MODELS` as the server config states it
        (Ollama does not report it); it becomes `Catalogue.max_loaded`."""
        super().__init__(base_url, **kwargs)
        if max_loaded_models is not None and _pos_int(max_loaded_models) is None:
            raise ValueError(f"max_loaded_models must be None or an integer >= 1, got {max_loaded_models!r}")
        self.max_loaded_models = max_loaded_models

    def health(self) -> ServerInfo:
        try:
            body = self.http.request("GET", "/api/version", profile="probe")
        except BackendError as exc:
            return ServerInfo(healthy=False, detail=f"{type(exc).__name__}: {exc}")
        version = body.get("version") if isinstance(body, dict) else None
        return ServerInfo(healthy=True, version=version if isinstance(version, str) else None)

    # -- listing ----------------------------------------------------------------------------------

    def _models(self, path: str) -> list[dict[str, Any]]:
        where = f"GET {self.http.display}{path}"
        body = self.http.request("GET", path)
        err = embedded_error(body, where)
        if err is not None:
            raise err
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            raise BadResponse(f"{where}: no `models` list in the answer")
        return [m for m in models if isinstance(m, dict) and _name(m)]

    def catalogue(self) -> Catalogue:
        """`/api/tags` joined with `/api/ps` by Ollama's name identity.

        `/api/ps` is required: without it nothing can be said about what is loaded, and guessing
        "nothing" would make the loader drop slots and load again. If only `/api/tags` fails, the
        catalogue is built from `/api/ps` alone and marked incomplete (an unlisted name may still be
        installed), each entry saying why in `detail`.
        """
        ps = self._models("/api/ps")
        tags_error = None
        try:
            tags = self._models("/api/tags")
        except BackendError as exc:
            tags, tags_error = [], f"GET /api/tags failed ({type(exc).__name__}: {truncate(str(exc), 200)})"
        now = time.time()
        running: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for p in ps:
            running.setdefault(self._identity(_name(p)), []).append(p)
        models: list[Offered] = []
        for t in tags:
            models.append(self._offered(_name(t), t, running.pop(self._identity(_name(t)), []), now))
        for group in running.values():      # loaded but not listed as installed (tags failed, or a race)
            models.append(self._offered(_name(group[0]), None, group, now, detail=tags_error))
        return Catalogue(models=tuple(models), complete=tags_error is None, max_loaded=self.max_loaded_models)

    @staticmethod
    def _identity(name: str) -> tuple[str, ...]:
        parsed = ollama_names.parse_request(name)
        return parsed.fold() if parsed is not None else ("", "", name, "")

    def _offered(self, key: str, tag: dict[str, Any] | None, ps: list[dict[str, Any]], now: float,
                 detail: str | None = None) -> Offered:
        instances = tuple(
            LoadedModel(key=_name(p) or key, size_bytes=_pos_int(p.get("size")) or 0,
                        parallel=self.default_parallel, context_length=_pos_int(p.get("context_length")),
                        model=key, ttl_seconds=_ttl(p.get("expires_at"), now))
            for p in ps)
        details = (tag or {}).get("details")
        max_ctx = _pos_int(details.get("context_length")) if isinstance(details, dict) else None
        size = (instances[0].size_bytes if instances else None) or _pos_int((tag or {}).get("size"))
        return Offered(key=key, names=ollama_names.equivalents(key), size_bytes=size, max_context_length=max_ctx,
                       status="loaded" if instances else "unloaded", instances=instances, detail=detail)

    def identify(self, wanted: str, catalogue: Catalogue) -> Offered | None:
        """Ollama's own rule (`types/model/name.go`): `x` = `x:latest` = `library/x` =
        `registry.ollama.ai/library/x:latest`, parts compared case-insensitively; `x:q4` and `sim/x`
        are different models. An exact spelling wins over a case-insensitive one; two entries that
        differ only in case, neither spelled exactly as asked, match nothing."""
        for m in catalogue.models:
            if wanted in m.all_names():
                return m
        target = ollama_names.parse_request(wanted)
        if target is None:
            return None
        same = [m for m in catalogue.models if self._identity(m.key) == target.fold()]
        exact = [m for m in same if ollama_names.parse_request(m.key) == target]
        if len(exact) == 1:
            return exact[0]
        return same[0] if len(same) == 1 else None

    def list_loaded(self) -> list[LoadedModel]:
        return self.catalogue().instances()

    # -- load control -----------------------------------------------------------------------------

    def _generate(self, model: str, keep_alive: int) -> dict[str, Any]:
        """An empty-prompt generate: only (un)loads, answering one JSON object (`GenerateHandler`)."""
        where = f"POST {self.http.display}/api/generate"
        body = {"model": model, "keep_alive": keep_alive, "stream": False}
        answer = self.http.request("POST", "/api/generate", json_body=body, profile="load" if keep_alive else "control")
        err = embedded_error(answer, where)
        if err is not None:
            raise err
        return answer if isinstance(answer, dict) else {}

    def load(self, model: str, *, context_length: int | None = None, parallel: int | None = None) -> LoadedModel:
        """Loads and pins `model` (`keep_alive: -1`) and returns its instance from `/api/ps`.

        An instance already pinned is adopted without a request; one loaded by a plain request (default
        keep-alive) is pinned by the same call, which Ollama answers at once. `context_length` and
        `parallel` are server settings here and are not sent (see the module docstring).
        """
        entry = self.identify(model, self.catalogue())
        pinned = [i for i in entry.instances if i.ttl_seconds is None] if entry else []
        if pinned:
            return pinned[0]
        key = entry.key if entry else model
        try:
            self._generate(key, -1)
        except BackendError as exc:
            raise self._load_error(exc, key) from exc
        entry = self.identify(key, self.catalogue())
        if entry is not None and entry.instances:
            return entry.instances[0]
        # Loaded, and gone again before we looked (evicted at once by a full server): say so.
        raise LoadFailed(f"POST {self.http.display}/api/generate: Ollama answered the load of {key!r}, "
                         f"but /api/ps does not list it (evicted at once?)")

    def _load_error(self, exc: BackendError, key: str) -> BackendError:
        """Types a refused load by Ollama's answer: 404 = not installed, 400 = a name or model it will
        never serve, out-of-memory wording = no room, any other 500 = this model failed to load."""
        if exc.status is None:
            return exc                                     # transport: Unreachable, Timeout
        where = f"POST {self.http.display}/api/generate"
        message = _message(exc)
        if out_of_memory(message):
            return InsufficientResources(f"{where}: Ollama has no room for {key!r}: {message}",
                                         status=exc.status, body=exc.body)
        if exc.status == 404:
            return ModelUnavailable(f"{where}: Ollama has no model {key!r} installed ({message}); "
                                    f"installed: {self._installed_listing()}", status=404, body=exc.body)
        if exc.status == 400:
            return ModelUnavailable(f"{where}: Ollama refuses to load {key!r} ({message}); "
                                    f"installed: {self._installed_listing()}", status=400, body=exc.body)
        if exc.status == 500:
            return LoadFailed(f"{where}: Ollama failed to load {key!r}: {message}", status=500, body=exc.body)
        return exc                                         # 401/403, 429, 502, 503 "server busy": the server's

    def _installed_listing(self) -> str:
        try:
            names = sorted(_name(m) for m in self._models("/api/tags"))
        except BackendError as exc:
            return f"unknown (GET /api/tags failed: {type(exc).__name__})"
        return ", ".join(names[:20]) + (f" (+{len(names) - 20} more)" if len(names) > 20 else "") or "nothing"

    def unload(self, model: str) -> None:
        """`keep_alive: 0` for exactly that model. Ollama answers at once and unloads it as soon as its
        requests in flight are done (`Scheduler.expireRunner`); a model it does not have is not loaded."""
        try:
            self._generate(model, 0)
        except BackendError as exc:
            if exc.status != 404:
                raise


def _message(exc: BackendError) -> str:
    body = exc.body or ""
    try:
        return truncate(error_text(json.loads(body)), 300)
    except ValueError:
        return truncate(body or str(exc), 300)
