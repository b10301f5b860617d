"""HTTP backends to LLM servers. Import from here: `from aibot.backends import make_backend, Timeouts`.

One module per server kind; `registry` derives the list of kinds from their classes, `factory` builds
them, `base` is the interface and its errors, `identity` matches configured names to what a server
offers. Nothing in this package touches the database or the queue.
"""

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
from aibot.backends.factory import backend_for_server, make_backend
from aibot.backends.http import Timeouts, Unauthorized, Unsupported

__all__ = [
    "Backend", "BackendError", "BadResponse", "ChatRequest", "ChatResult", "InsufficientResources",
    "LoadedModel", "ModelNotLoaded", "RequestFault", "ServerFault", "ServerInfo", "Timeout", "Timeouts",
    "Unauthorized", "Unreachable", "Unsupported", "backend_for_server", "make_backend",
]
