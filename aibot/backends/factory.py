"""Builds the backend for a server, so callers never import a concrete backend class.

`backend_for_server` is the one builder for both a configured server (`ServerConfig`) and an
`aibot.servers` row: the kind picks the class from `aibot.backends.registry`, the token comes from the
variable the server names. This module owns construction; it keeps no list of kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aibot.backends import registry
from aibot.backends.base import Backend
from aibot.backends.http import Timeouts

__all__ = ["Timeouts", "make_backend", "backend_for_server"]


def make_backend(kind: str, base_url: str, *, token: str | None = None, timeouts: Timeouts | None = None,
                 default_parallel: int = 1, verify: bool | str = True, transport: Any = None) -> Backend:
    """A ready backend. `verify` is httpx's: True (system CAs), a CA bundle path, or False (not advised).

    `transport` is for tests that want an in-process httpx transport; production leaves it None.
    """
    cls = registry.get(kind)
    return cls(base_url, token=token, timeouts=timeouts or Timeouts(), default_parallel=default_parallel,
               verify=verify, transport=transport)


def backend_for_server(server: Any, *, timeouts: Timeouts | None = None,
                       environ: Mapping[str, str] | None = None) -> Backend:
    """The backend for a configured server: an `aibot.config.ServerConfig` or an `aibot.servers` row.

    Its token comes from the variable named in `token_env`, or the file named by `<token_env>_FILE`;
    a named but unset variable is an error (a silently missing token shows up later as 401s). Its
    timeouts are the caller's, else the deployment's (`deployment_timeouts`), for every process alike:
    a worker's generations, the scheduler's refreshes and every demand load.
    """
    from aibot.settings import token_from_env

    def get(key: str) -> Any:
        return server.get(key) if isinstance(server, Mapping) else getattr(server, key, None)

    token = None
    token_env = get("token_env")
    if token_env:
        token = token_from_env(token_env, environ)
        if not token:
            raise ValueError(f"server {get('name')!r}: token_env {token_env!r} is not set in the environment "
                             f"(set {token_env} or {token_env}_FILE)")
    return make_backend(get("kind"), get("url"), token=token, timeouts=timeouts or deployment_timeouts(),
                        default_parallel=get("default_parallel") or 1)


def deployment_timeouts(settings: Any = None) -> Timeouts:
    """The backend timeouts of this deployment: AIBOT_BACKEND_<NAME>_TIMEOUT over the defaults. The
    default read timeout (120 s) suits a real cold model load; a chaos run or a cluster of fast servers
    wants a hung server to cost seconds, so the deployment may lower it."""
    from aibot.settings import get_settings

    return Timeouts(**(settings or get_settings()).backend_timeouts())
