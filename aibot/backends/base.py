"""The one interface every LLM server kind implements.

Errors are typed by whose fault they are, because that decides what the queue does: a server fault
(connection refused, timeout, 5xx, LM Studio's "insufficient system resources") backs the server off
and re-queues the job without burning its attempts; a request fault (4xx) is the job's own problem
and counts against `max_attempts`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class BackendError(Exception):
    """Base class; `server_fault` says whether the server (True) or the request (False) is to blame."""

    server_fault: bool = True

    def __init__(self, message: str, *, status: int | None = None, body: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = body


class ServerFault(BackendError):
    server_fault = True


class Unreachable(ServerFault):
    """Connection refused/reset or DNS failure: nothing was processed."""


class Timeout(ServerFault):
    pass


class InsufficientResources(ServerFault):
    """The server refused to load a model for lack of memory."""


class RequestFault(BackendError):
    server_fault = False


class ModelNotLoaded(RequestFault):
    """The model is not loaded (and the server will not JIT-load it)."""


class BadResponse(ServerFault):
    """The server answered 2xx with something that is not a valid completion (garbage, no choices)."""


@dataclass(frozen=True)
class LoadedModel:
    key: str                       # the id to send as `model`
    size_bytes: int = 0
    parallel: int = 1              # concurrent predictions this instance serves
    context_length: int | None = None
    state: str = "loaded"          # loaded | loading


@dataclass(frozen=True)
class ServerInfo:
    healthy: bool
    memory_bytes: int | None = None   # total RAM the server reports, if it does
    version: str | None = None
    detail: str | None = None


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    params: dict[str, Any] = field(default_factory=dict)   # temperature, max_tokens, top_p, ... as sent
    stop: list[str] = field(default_factory=list)
    stream: bool = False


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None


class Backend(Protocol):
    kind: str
    base_url: str

    def health(self) -> ServerInfo: ...

    def list_loaded(self) -> list[LoadedModel]: ...

    def load(self, model: str, *, context_length: int | None = None, parallel: int | None = None) -> LoadedModel: ...

    def unload(self, model: str) -> None: ...

    def chat(self, request: ChatRequest) -> ChatResult: ...

    def chat_stream(self, request: ChatRequest) -> Iterator[str]: ...

    def tokenize(self, model: str, text: str) -> int | None:
        """Token count from the server's tokenizer, or None if it has none."""
        ...

    def close(self) -> None: ...
