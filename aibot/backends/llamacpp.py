"""llama.cpp's `llama-server`: single-model (`kind = "llamacpp"`) and router mode (`"llamacpp-router"`).

Single-model: the server holds one model for its lifetime (and ignores the request's `model` field),
so load/unload are not possible: `load` succeeds only for the model it already serves, `unload` raises
`Unsupported`. Parallelism is its slot count (`/props` `total_slots`, else the length of `/slots`), and
`n_ctx` is divided between slots (original-bot.md §4.8: `--parallel N` divides the context), so
`context_length` here is per slot.

Router mode: one endpoint for several models. `/v1/models` carries `status.value`
(`loaded | loading | unloaded | failed`); `POST /models/load` only starts a load, so `load` polls the
list until the model is loaded, failed, or the load timeout passes. Slots come from `/slots?model=`.
"""

from __future__ import annotations

import time
from typing import Any

from aibot.backends.base import (
    BackendError,
    BadResponse,
    LoadedModel,
    RequestFault,
    ServerFault,
    ServerInfo,
    Timeout,
)
from aibot.backends.http import Unsupported
from aibot.backends.openai_compat import OpenAICompatBackend, embedded_error, models_data


def _pos_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class LlamaCppBackend(OpenAICompatBackend):
    kind = "llamacpp"

    def health(self) -> ServerInfo:
        """`/health`: 200 when ready, 503 while the model loads. Never raises."""
        try:
            self.http.request("GET", "/health", profile="probe")
        except BackendError as exc:
            detail = f"{type(exc).__name__}: {exc}"
            if exc.status == 503:
                detail = f"loading: {exc}"
            return ServerInfo(healthy=False, detail=detail)
        return ServerInfo(healthy=True)

    def _slots(self, params: dict[str, Any] | None = None) -> int | None:
        """Number of slots from `/slots`, or None when the endpoint is disabled (501) or absent."""
        try:
            body = self.http.request("GET", "/slots", params=params)
        except RequestFault:
            return None
        except ServerFault as exc:
            if exc.status == 501:
                return None
            raise
        return len(body) if isinstance(body, list) and body else None

    def _props(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            body = self.http.request("GET", "/props", params=params)
        except RequestFault:
            return {}
        return body if isinstance(body, dict) else {}

    def list_loaded(self) -> list[LoadedModel]:
        where = f"GET {self.http.display}/v1/models"
        data = models_data(self.http.request("GET", "/v1/models"), where)
        props = self._props()
        parallel = _pos_int(props.get("total_slots")) or self._slots() or self.default_parallel
        settings = props.get("default_generation_settings")
        n_ctx = _pos_int(settings.get("n_ctx")) if isinstance(settings, dict) else None
        out = []
        for m in data:
            meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
            out.append(LoadedModel(key=m["id"], size_bytes=_pos_int(meta.get("size")) or 0, parallel=parallel,
                                   context_length=n_ctx))
        return out

    def load(self, model: str, *, context_length: int | None = None, parallel: int | None = None) -> LoadedModel:
        for m in self.list_loaded():
            if m.key == model:
                return m
        raise Unsupported(f"llama-server at {self.http.display} runs a single model and cannot load {model!r}; "
                          "start a llama-server for it, or use router mode (kind llamacpp-router)")

    def unload(self, model: str) -> None:
        raise Unsupported(f"llama-server at {self.http.display} runs a single model and cannot unload it; "
                          "stop the process instead, or use router mode (kind llamacpp-router)")

    def tokenize(self, model: str, text: str) -> int | None:
        """Token count from the server's own tokenizer (`POST /tokenize`), None if it has none."""
        body: dict[str, Any] = {"content": text}
        if self.kind == "llamacpp-router":
            body["model"] = model
        try:
            answer = self.http.request("POST", "/tokenize", json_body=body)
        except RequestFault as exc:
            if exc.status in (404, 405, 501):
                return None
            raise
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            raise BadResponse(f"POST {self.http.display}/tokenize: no `tokens` list in the answer")
        return len(tokens)


class LlamaCppRouterBackend(LlamaCppBackend):
    kind = "llamacpp-router"
    poll_interval = 0.25     # seconds between status polls while a load runs (grows to 2 s)

    def health(self) -> ServerInfo:
        try:
            self.http.request("GET", "/health", profile="probe")
        except RequestFault as exc:
            if exc.status not in (404, 405):
                return ServerInfo(healthy=False, detail=f"{type(exc).__name__}: {exc}")
            return super(LlamaCppBackend, self).health()   # /v1/models probe
        except BackendError as exc:
            return ServerInfo(healthy=False, detail=f"{type(exc).__name__}: {exc}")
        return ServerInfo(healthy=True)

    def _statuses(self) -> list[tuple[dict[str, Any], str]]:
        where = f"GET {self.http.display}/v1/models"
        data = models_data(self.http.request("GET", "/v1/models"), where)
        out = []
        for m in data:
            status = m.get("status")
            value = status.get("value") if isinstance(status, dict) else status
            out.append((m, value if isinstance(value, str) else "unknown"))
        return out

    def _loaded_model(self, m: dict[str, Any], state: str) -> LoadedModel:
        key = m["id"]
        slots = self._slots({"model": key}) if state == "loaded" else None
        props = self._props({"model": key}) if state == "loaded" else {}
        settings = props.get("default_generation_settings")
        meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
        return LoadedModel(
            key=key,
            size_bytes=_pos_int(meta.get("size")) or 0,
            parallel=_pos_int(props.get("total_slots")) or slots or self.default_parallel,
            context_length=_pos_int(settings.get("n_ctx")) if isinstance(settings, dict) else None,
            state=state,
        )

    def list_loaded(self) -> list[LoadedModel]:
        """Loaded and loading models (state says which); unloaded/failed ones are left out."""
        return [self._loaded_model(m, state) for m, state in self._statuses() if state in ("loaded", "loading")]

    def _state_of(self, model: str) -> tuple[dict[str, Any] | None, str | None]:
        for m, state in self._statuses():
            if m["id"] == model:
                return m, state
        return None, None

    def load(self, model: str, *, context_length: int | None = None, parallel: int | None = None) -> LoadedModel:
        """Starts the load and waits (up to the load timeout) until the router reports it loaded.

        `context_length`/`parallel` are fixed by the router's presets, not per request.
        """
        entry, state = self._state_of(model)
        if entry is not None and state == "loaded":
            return self._loaded_model(entry, state)
        where = f"POST {self.http.display}/models/load"
        if state != "loading":
            answer = self.http.request("POST", "/models/load", json_body={"model": model}, profile="load")
            err = embedded_error(answer, where)
            if err is not None:
                raise err
        deadline = time.monotonic() + self.http.timeouts.load
        interval = self.poll_interval
        while True:
            entry, state = self._state_of(model)
            if entry is not None and state == "loaded":
                return self._loaded_model(entry, state)
            if entry is None:
                raise RequestFault(f"{where}: router does not know model {model!r}")
            if state in ("failed", "error"):
                raise ServerFault(f"{where}: router failed to load {model!r} (status {state})")
            if time.monotonic() >= deadline:
                raise Timeout(f"{where}: {model!r} still {state} after {self.http.timeouts.load:g}s")
            time.sleep(interval)  # waiting on a remote process; no event to wait on
            interval = min(interval * 2, 2.0)

    def unload(self, model: str) -> None:
        """Unloads `model`; no-op if it is not loaded."""
        entry, state = self._state_of(model)
        if entry is None or state in ("unloaded", "failed", "error"):
            return
        where = f"POST {self.http.display}/models/unload"
        answer = self.http.request("POST", "/models/unload", json_body={"model": model})
        err = embedded_error(answer, where)
        if err is not None:
            raise err
