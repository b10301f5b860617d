"""The one interface every LLM server kind implements.

Errors are typed by whose fault they are, because that decides what the queue does: a server fault
(connection refused, timeout, 5xx, LM Studio's "insufficient system resources") backs the server off
and re-queues the job without burning its attempts; a request fault (4xx) is the job's own problem
and counts against `max_attempts`.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol


class BackendError(Exception):
    """Base class; `server_fault` says whether the server (True) or the request (False) is to blame.

    `scope` says what a fault should back off: "server" (connection-level: nothing on that server can
    be reached), "model" (only the (server, model) pair: a failed load, a model's cut streams, its
    per-model endpoint failing) or "request" (the job's own fault; nothing is backed off).
    `permanent` marks errors that retrying cannot fix.
    """

    server_fault: bool = True
    scope: str = "server"
    permanent: bool = False

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
    scope = "request"


class ModelNotLoaded(RequestFault):
    """The model is not loaded (and the server will not JIT-load it)."""


class ModelUnavailable(RequestFault):
    """This server will never serve this model as asked, however often we retry: the name is unknown
    to it (the message lists the names it does offer), or it refused the load for a reason that only
    a change of configuration or of the server's model list can fix (LM Studio's `model_not_found`,
    the llama.cpp router's 404, a load the server kind cannot do).

    Permanent for the (server, model) pair: the loader marks the pair unloadable with this message and
    does not try again until the configuration or the server's catalogue changes.
    """

    permanent = True


class LoadFailed(BackendError):
    """The server tried to load this model and failed (llama.cpp router `failed: true` with its exit
    code, LM Studio's generic `model_load_failed`). The fault belongs to the (server, model) pair, not
    to the server (its other models are fine) and not to a job: the pair is backed off, with the
    server's reason, and the load is tried again after the backoff.
    """

    server_fault = False
    scope = "model"


class ContextOverflow(RequestFault):
    """The request does not fit the serving instance's context (HTTP 400 "exceeds the available context
    size" and the like). Deterministic: retrying the same prompt fails the same way, so the job is
    rejected at once (or its prompt trimmed first) instead of burning its attempts."""


class BadResponse(ServerFault):
    """The server answered 2xx with something that is not a valid completion (garbage, no choices), or
    cut a stream short. The server is reachable, so this is the model's fault (scope "model")."""

    scope = "model"


@dataclass(frozen=True)
class LoadedModel:
    """One loaded (or loading) instance as the server names it."""

    key: str                       # the server's id of this instance: send it as `model`, unload by it
    size_bytes: int = 0
    parallel: int = 1              # concurrent predictions this instance serves
    context_length: int | None = None   # tokens ONE request may use (llama.cpp: per slot, n_ctx / parallel)
    state: str = "loaded"          # loaded | loading | sleeping (resident but paused; wakes on a request)
    model: str | None = None       # the catalogue entry (`Offered.key`) this is an instance of; None = key
    ttl_seconds: float | None = None   # the server unloads it by itself after this long idle (LM Studio JIT)


#: What `Offered.status` may say. `failed` carries the server's reason in `Offered.failure`.
OFFERED_STATUSES = ("unloaded", "loading", "loaded", "sleeping", "failed")


@dataclass(frozen=True)
class Offered:
    """One model a server can serve, loaded or not: an LM Studio downloaded model (with its variants),
    an Ollama tag, a router preset, the one model of a single-model llama-server.

    `key` is the name the server accepts for a load; `names` are the other names that denote the same
    model on this server (LM Studio `key@variant` for the selected variant, Ollama's `name` and
    `name:latest`, a router alias, a publisher-prefixed form). Matching a configured name against
    these is each backend's `identify`.
    """

    key: str
    names: tuple[str, ...] = ()
    size_bytes: int | None = None            # from the server; None when it does not say
    max_context_length: int | None = None
    status: str = "unloaded"                 # one of OFFERED_STATUSES
    failure: str | None = None               # the server's reason when status == "failed"
    instances: tuple[LoadedModel, ...] = ()  # loaded/loading/sleeping instances of this model
    detail: str | None = None                # e.g. "per-model /slots failed: ..." (the entry is still usable)

    def all_names(self) -> tuple[str, ...]:
        return (self.key, *self.names)


@dataclass(frozen=True)
class Catalogue:
    """Everything a server says it can serve, from one listing.

    `complete` is False when the server lists only what is loaded (a plain OpenAI-compatible server,
    LM Studio before 0.3.6): a name missing from such a list may still be servable, so it is not an
    unknown name.
    """

    models: tuple[Offered, ...]
    complete: bool = True
    #: How many models the server keeps loaded before it evicts the least recently used one by itself
    #: (llama.cpp router `--models-max`, Ollama `OLLAMA_MAX_LOADED_MODELS`, LM Studio's JIT Auto-Evict = 1),
    #: when the server says; None = it does not evict on its own, or does not say.
    max_loaded: int | None = None

    def names(self) -> list[str]:
        return sorted({n for m in self.models for n in m.all_names()})

    def instances(self) -> list[LoadedModel]:
        return [i for m in self.models for i in m.instances]

    def fingerprint(self) -> str:
        """Changes when the set of offered names changes: a permanent refusal is retried only then."""
        import hashlib

        return hashlib.sha256("\n".join(self.names()).encode()).hexdigest()[:16]


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
    """What aibot needs of a server. Class attributes declare the kind (the registry derives config
    validation, model-id templates and the database's list of kinds from them)."""

    kind: str
    can_load: bool               # whether aibot can load and unload models on this kind of server
    model_id_template: str       # how a configured base + quantization becomes a model id here
    default_port: int            # the port the server listens on when the config gives only an ip
    base_url: str

    def health(self) -> ServerInfo: ...

    def catalogue(self) -> Catalogue:
        """One listing of every model the server offers, with its loaded instances. A per-model
        sub-request that fails (a model's /slots answering 500) degrades that entry (`detail`), never
        the whole catalogue; only a failure of the listing itself raises."""
        ...

    def identify(self, wanted: str, catalogue: Catalogue) -> Offered | None:
        """The catalogue entry that a configured model name denotes on this kind of server, or None.
        Pure: the naming rules of this kind (exact; LM Studio key vs key@variant; Ollama name:tag;
        router aliases; a publisher prefix). Never matches two different models."""
        ...

    def list_loaded(self) -> list[LoadedModel]:
        """`catalogue().instances()`."""
        ...

    def load(self, model: str, *, context_length: int | None = None, parallel: int | None = None) -> LoadedModel:
        """Loads the catalogue entry `model` (an `Offered.key`) and returns the instance, once loaded.
        A failed load raises LoadFailed with the server's reason (within seconds, not at a timeout);
        a name the server refuses for good raises ModelUnavailable. An entry that already has a loaded
        instance is adopted, never loaded twice."""
        ...

    def unload(self, model: str) -> None:
        """Unloads the instance named `model` (a `LoadedModel.key`), and only that instance."""
        ...

    def chat(self, request: ChatRequest) -> ChatResult: ...

    def chat_stream(self, request: ChatRequest) -> Generator[str, None, int | None]:
        """The reply's text deltas; the generator's return value is the completion's token count as the
        server reported it (None if it did not): what adaptive concurrency measures throughput in."""
        ...

    def tokenize(self, model: str, text: str) -> int | None:
        """Token count from the server's tokenizer, or None if it has none."""
        ...

    def close(self) -> None: ...


def find(backend: Backend, wanted: str, catalogue: Catalogue, where: str) -> Offered:
    """The entry `wanted` denotes, or ModelUnavailable naming what the server does offer.

    On an incomplete catalogue (the server lists only what is loaded) an unmatched name is not known
    to be unknown, so the caller gets a plain `Offered(wanted)` to try.
    """
    found = backend.identify(wanted, catalogue)
    if found is not None:
        return found
    if not catalogue.complete:
        return Offered(wanted)
    raise unknown_model(wanted, catalogue, where)


def unknown_model(wanted: str, catalogue: Catalogue, where: str) -> ModelUnavailable:
    """The error for a name the server does not offer, listing (the first 20 of) the names it does."""
    offered = catalogue.names()
    listing = ", ".join(offered[:20]) + (f" (+{len(offered) - 20} more)" if len(offered) > 20 else "")
    return ModelUnavailable(f"{where}: the server offers no model named {wanted!r}; "
                            f"it offers: {listing or 'nothing'}")
