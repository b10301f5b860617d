"""HTTP backends to LLM servers. Import from here: `from aibot.backends import make_backend, Timeouts`."""

from aibot.backends.base import (
    Backend,
    BackendError,
    BadResponse,
    ChatRequest,
    ChatResult,
    InsufficientResources,
    LoadedModel,
    ModelNotLoaded,
    RequestFault,
    ServerFault,
    ServerInfo,
    Timeout,
    Unreachable,
)
from aibot.backends.factory import BACKENDS, backend_for_server, make_backend
from aibot.backends.http import Timeouts, Unauthorized, Unsupported

__all__ = [
    "BACKENDS", "Backend", "BackendError", "BadResponse", "ChatRequest", "ChatResult", "InsufficientResources",
    "LoadedModel", "ModelNotLoaded", "RequestFault", "ServerFault", "ServerInfo", "Timeout", "Timeouts",
    "Unauthorized", "Unreachable", "Unsupported", "backend_for_server", "make_backend",
]
