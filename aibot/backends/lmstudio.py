"""LM Studio (`kind = "lmstudio"`): native REST for residency, OpenAI paths for chat.

API levels, newest first (lmstudio-api.md):
- `v1` (0.4.0+): `GET /api/v1/models` tells loaded instances apart (`loaded_instances`), with
  `size_bytes`, `config.parallel` and `config.context_length`; `POST /api/v1/models/load|unload`.
- `v0` (0.3.6+): `GET /api/v0/models` with `state == "loaded"`; no parallel (one request at a time
  before 0.4.0, so `default_parallel`), no size. Load by JIT: a one-token chat completion.
- `openai`: only `/v1/models`; every listed model counts as loaded (JIT may list everything;
  original-bot.md §4.7), parallel = `default_parallel`. Load by JIT as for v0.

The working level is found on first use and remembered per instance, because probing three paths
on every refresh would triple the traffic. A server fault never downgrades the level (a 500 says
nothing about the API version); only 404/405 or an answer without the expected list does, which
covers LM Studio's habit of answering unknown paths with 200 `{"error": "Unexpected endpoint..."}`.
"""

from __future__ import annotations

import logging
from typing import Any

from aibot.backends.base import BackendError, BadResponse, LoadedModel, RequestFault, ServerInfo
from aibot.backends.http import Unsupported
from aibot.backends.openai_compat import CHAT_PATH, OpenAICompatBackend, embedded_error, models_data

log = logging.getLogger("aibot.backends.lmstudio")

LEVELS = ("v1", "v0", "openai")
_PATHS = {"v1": "/api/v1/models", "v0": "/api/v0/models", "openai": "/v1/models"}


class _LevelMissing(Exception):
    """This API level is not served here (404/405 or an unexpected answer)."""


class LMStudioBackend(OpenAICompatBackend):
    kind = "lmstudio"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.api_level: str | None = None

    # -- API level --------------------------------------------------------------------------------

    def _fetch(self, level: str, profile: str = "control") -> list[dict[str, Any]]:
        path = _PATHS[level]
        where = f"GET {self.http.display}{path}"
        try:
            body = self.http.request("GET", path, profile=profile)
        except RequestFault as exc:
            if exc.status in (404, 405):
                raise _LevelMissing(str(exc)) from None
            raise
        if level == "v1":
            if isinstance(body, dict) and isinstance(body.get("models"), list):
                return [m for m in body["models"] if isinstance(m, dict)]
        elif isinstance(body, dict) and isinstance(body.get("data"), list):
            return models_data(body, where)
        if isinstance(body, dict) and "error" in body:
            raise _LevelMissing(f"{where}: {body.get('error')!r}")
        raise BadResponse(f"{where}: unexpected models answer (no {'models' if level == 'v1' else 'data'} list)")

    def _models(self, profile: str = "control") -> tuple[str, list[dict[str, Any]]]:
        """(level, raw model list) from the remembered level, detecting it on first use."""
        with self._lock:
            known = self.api_level
        if known is not None:
            return known, self._fetch(known, profile)
        for level in LEVELS:
            try:
                models = self._fetch(level, profile)
            except _LevelMissing as exc:
                log.debug("LM Studio %s API not available at %s: %s", level, self.http.display, exc)
                continue
            with self._lock:
                self.api_level = level
            log.info("LM Studio at %s speaks the %s API", self.http.display, level)
            return level, models
        raise BadResponse(f"{self.http.display} answers none of /api/v1/models, /api/v0/models, /v1/models; "
                          "is this an LM Studio server?")

    # -- health and listing -----------------------------------------------------------------------

    def health(self) -> ServerInfo:
        """Probes the remembered level's list; before detection, `/api/v1/models`, then
        `/lmstudio-greeting` (what `lms` itself pings), then `/v1/models`. Never raises."""
        with self._lock:
            known = self.api_level
        paths = [_PATHS[known]] if known else ["/api/v1/models", "/lmstudio-greeting", "/v1/models"]
        last: Exception | None = None
        for path in paths:
            try:
                body = self.http.request("GET", path, profile="probe")
            except RequestFault as exc:
                last = exc
                if exc.status in (404, 405):
                    continue
                break
            except BackendError as exc:
                return ServerInfo(healthy=False, detail=f"{type(exc).__name__}: {exc}")
            if isinstance(body, dict) and "error" in body and not body.get("lmstudio"):
                last = BadResponse(f"{path}: {body.get('error')!r}")
                continue
            version = body.get("version") if isinstance(body, dict) and isinstance(body.get("version"), str) else None
            return ServerInfo(healthy=True, version=version)
        return ServerInfo(healthy=False, detail=f"{type(last).__name__}: {last}" if last else "no probe answered")

    def list_loaded(self) -> list[LoadedModel]:
        level, models = self._models()
        if level == "v1":
            return self._loaded_v1(models)
        if level == "v0":
            return [LoadedModel(key=m["id"], parallel=self.default_parallel,
                                context_length=_pos_int(m.get("loaded_context_length")))
                    for m in models if m.get("state") == "loaded"]
        return [LoadedModel(key=m["id"], parallel=self.default_parallel) for m in models]

    def _loaded_v1(self, models: list[dict[str, Any]]) -> list[LoadedModel]:
        out: list[LoadedModel] = []
        for m in models:
            instances = m.get("loaded_instances")
            if not isinstance(instances, list):
                continue
            for inst in instances:
                if not isinstance(inst, dict):
                    continue
                key = inst.get("id") or m.get("key")
                if not isinstance(key, str):
                    continue
                config = inst.get("config") if isinstance(inst.get("config"), dict) else {}
                out.append(LoadedModel(
                    key=key,
                    size_bytes=_pos_int(m.get("size_bytes")) or 0,
                    parallel=_pos_int(config.get("parallel")) or self.default_parallel,
                    context_length=_pos_int(config.get("context_length")),
                ))
        return out

    # -- load control -----------------------------------------------------------------------------

    def load(self, model: str, *, context_length: int | None = None, parallel: int | None = None) -> LoadedModel:
        """Loads `model` and returns the loaded instance.

        `parallel` is not sent: LM Studio's REST load rejects it (lmstudio-bug-tracker #2024) and uses
        its default (4); the instance's real value is read back from the listing. Before 0.4 there is
        no REST load, so a one-token chat completion makes LM Studio JIT-load the model.
        """
        level, models = self._models()
        if level != "v1":
            return self._jit_load(model)
        # The REST load of a model that is already loaded adds a second instance (`model:2`). A loader
        # killed mid-load leaves the server finishing that load, so the next one must adopt it.
        for m in self._loaded_v1(models):
            if m.key == model:
                return m
        body: dict[str, Any] = {"model": model, "echo_load_config": True}
        if context_length is not None:
            body["context_length"] = context_length
        if parallel is not None:
            log.debug("LM Studio REST load cannot set parallel=%s for %s; the server default applies", parallel, model)
        where = f"POST {self.http.display}/api/v1/models/load"
        answer = self.http.request("POST", "/api/v1/models/load", json_body=body, profile="load")
        err = embedded_error(answer, where)
        if err is not None:
            raise err
        instance = answer.get("instance_id") if isinstance(answer, dict) else None
        instance = instance if isinstance(instance, str) else model
        for m in self.list_loaded():
            if m.key == instance:
                return m
        config = answer.get("load_config") if isinstance(answer, dict) else None
        config = config if isinstance(config, dict) else {}
        return LoadedModel(key=instance, parallel=self.default_parallel,
                           context_length=_pos_int(config.get("context_length")))

    def _jit_load(self, model: str) -> LoadedModel:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                "stream": False}
        answer = self.http.request("POST", CHAT_PATH, json_body=body, profile="load")
        err = embedded_error(answer, f"POST {self.http.display}{CHAT_PATH}")
        if err is not None:
            raise err
        for m in self.list_loaded():
            if m.key == model:
                return m
        return LoadedModel(key=model, parallel=self.default_parallel)

    def unload(self, model: str) -> None:
        """Unloads every instance of `model` (by instance id or model key); no-op if none is loaded."""
        level, models = self._models()
        if level != "v1":
            raise Unsupported(f"LM Studio at {self.http.display} speaks the {level} API; unloading needs the "
                              "0.4+ REST API (/api/v1/models/unload)")
        instance_ids = []
        for m in models:
            for inst in m.get("loaded_instances") or []:
                if isinstance(inst, dict) and isinstance(inst.get("id"), str) and model in (inst["id"], m.get("key")):
                    instance_ids.append(inst["id"])
        where = f"POST {self.http.display}/api/v1/models/unload"
        for instance_id in instance_ids:
            answer = self.http.request("POST", "/api/v1/models/unload", json_body={"instance_id": instance_id})
            err = embedded_error(answer, where)
            if err is not None:
                raise err


def _pos_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
