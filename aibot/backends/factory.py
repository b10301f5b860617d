"""Builds the backend for a server kind, so callers never import a concrete backend class."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aibot.backends.base import Backend
from aibot.backends.http import Timeouts
from aibot.backends.llamacpp import LlamaCppBackend, LlamaCppRouterBackend
from aibot.backends.lmstudio import LMStudioBackend
from aibot.backends.ollama import OllamaBackend
from aibot.backends.openai_compat import OpenAICompatBackend

__all__ = ["BACKENDS", "Timeouts", "make_backend", "backend_for_server"]

BACKENDS: dict[str, type] = {
    "lmstudio": LMStudioBackend,
    "llamacpp": LlamaCppBackend,
    "llamacpp-router": LlamaCppRouterBackend,
    "ollama": OllamaBackend,
    "openai": OpenAICompatBackend,
}


def make_backend(kind: str, base_url: str, *, token: str | None = None, timeouts: Timeouts | None = None,
                 default_parallel: int = 1, verify: bool | str = True, transport: Any = None) -> Backend:
    """A ready backend. `verify` is httpx's: True (system CAs), a CA bundle path, or False (not advised).

    `transport` is for tests that want an in-process httpx transport; production leaves it None.
    """
    try:
        cls = BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown server kind {kind!r}; expected one of {', '.join(BACKENDS)}") from None
    return cls(base_url, token=token, timeouts=timeouts or Timeouts(), default_parallel=default_parallel,
               verify=verify, transport=transport)


def backend_for_server(server: Any, *, timeouts: Timeouts | None = None,
                       environ: Mapping[str, str] | None = None) -> Backend:
    """The backend for a configured server: an `aibot.config.ServerConfig` or an `aibot.servers` row.

    Its token comes from the variable named in `token_env`, or the file named by `<token_env>_FILE`;
    a named but unset variable is an error (a silently missing token shows up later as 401s).
    """
    from types import SimpleNamespace

    from aibot.settings import server_token

    def get(key: str) -> Any:
        return server.get(key) if isinstance(server, Mapping) else getattr(server, key, None)

    token = None
    token_env = get("token_env")
    if token_env:
        token = server_token(SimpleNamespace(token_env=token_env), environ)
        if not token:
            raise ValueError(f"server {get('name')!r}: token_env {token_env!r} is not set in the environment "
                             f"(set {token_env} or {token_env}_FILE)")
    return make_backend(get("kind"), get("url"), token=token, timeouts=timeouts,
                        default_parallel=get("default_parallel") or 1)
