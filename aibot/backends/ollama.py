"""Ollama (`kind = "ollama"`): `/api/ps` for what is loaded, `keep_alive` for residency.

Ollama has no load endpoint; a generate call with no prompt loads the model, and `keep_alive`
decides how long it stays: -1 keeps it until told otherwise (we own residency), 0 unloads it now.
It does not report per-model parallelism (`OLLAMA_NUM_PARALLEL` is a server setting), so parallel
comes from the server's config (`default_parallel`). Chat goes through its OpenAI-compatible path.
"""

from __future__ import annotations

from typing import Any

from aibot.backends.base import BackendError, BadResponse, LoadedModel, ServerInfo
from aibot.backends.openai_compat import OpenAICompatBackend, embedded_error


def _pos_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class OllamaBackend(OpenAICompatBackend):
    kind = "ollama"

    def health(self) -> ServerInfo:
        try:
            body = self.http.request("GET", "/api/version", profile="probe")
        except BackendError as exc:
            return ServerInfo(healthy=False, detail=f"{type(exc).__name__}: {exc}")
        version = body.get("version") if isinstance(body, dict) else None
        return ServerInfo(healthy=True, version=version if isinstance(version, str) else None)

    def _ps(self) -> list[dict[str, Any]]:
        where = f"GET {self.http.display}/api/ps"
        body = self.http.request("GET", "/api/ps")
        err = embedded_error(body, where)
        if err is not None:
            raise err
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            raise BadResponse(f"{where}: no `models` list in the answer")
        return [m for m in models if isinstance(m, dict) and isinstance(m.get("name") or m.get("model"), str)]

    def list_loaded(self) -> list[LoadedModel]:
        return [LoadedModel(key=m.get("name") or m["model"], size_bytes=_pos_int(m.get("size")) or 0,
                            parallel=self.default_parallel, context_length=_pos_int(m.get("context_length")))
                for m in self._ps()]

    def available(self) -> list[str]:
        """Model names installed on the server (`/api/tags`), loaded or not."""
        where = f"GET {self.http.display}/api/tags"
        body = self.http.request("GET", "/api/tags")
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            raise BadResponse(f"{where}: no `models` list in the answer")
        return [m.get("name") or m.get("model") for m in models
                if isinstance(m, dict) and isinstance(m.get("name") or m.get("model"), str)]

    def _generate(self, model: str, keep_alive: int, options: dict[str, Any] | None, profile: str) -> None:
        where = f"POST {self.http.display}/api/generate"
        body: dict[str, Any] = {"model": model, "keep_alive": keep_alive, "stream": False}
        if options:
            body["options"] = options
        answer = self.http.request("POST", "/api/generate", json_body=body, profile=profile)
        err = embedded_error(answer, where)
        if err is not None:
            raise err

    def load(self, model: str, *, context_length: int | None = None, parallel: int | None = None) -> LoadedModel:
        """Loads and pins `model` (`keep_alive: -1`). `parallel` is a server setting and is ignored."""
        self._generate(model, -1, {"num_ctx": context_length} if context_length else None, "load")
        for m in self.list_loaded():
            if m.key == model or m.key == f"{model}:latest":
                return m
        return LoadedModel(key=model, parallel=self.default_parallel, context_length=context_length)

    def unload(self, model: str) -> None:
        self._generate(model, 0, None, "control")
