"""The small request/reply vocabulary shared by the HTTP server and the API flavours.

Handlers return a `Reply` instead of writing to the socket, so one writer (in `server.py`) owns the wire
details: Content-Length vs chunked streams, and the deliberate breakage faults need (a stream cut without
its terminating chunk, a body shorter than its Content-Length, a connection dropped with no answer).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs


class AbortStream(Exception):
    """Raised inside a stream generator: the writer drops the connection without finishing the body."""


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]
    body: bytes
    fault: str | None = None   # the body-shape fault drawn for this request, if any

    @classmethod
    def parse(cls, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Request:
        path, _, qs = target.partition("?")
        query = {k: v[-1] for k, v in parse_qs(qs).items()}
        return cls(method.upper(), path or "/", query, headers, body)

    def json(self) -> Any:
        """The JSON body (an empty body is `{}`); raises BadBody with the parser's complaint."""
        if not self.body.strip():
            return {}
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadBody(f"request body is not valid JSON: {exc}") from None

    def json_object(self) -> dict[str, Any]:
        data = self.json()
        if not isinstance(data, dict):
            raise BadBody(f"request body must be a JSON object, got {type(data).__name__}")
        return data


class BadBody(ValueError):
    pass


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: Iterator[bytes] | None = None   # chunked body; AbortStream inside cuts the connection
    truncate: bool = False                  # send Content-Length of the whole body, then half of it, then close
    abort: bool = False                     # close the connection without any response
    close: bool = False                     # "Connection: close" after this reply
    after: Callable[[], None] | None = None  # runs once the reply has been written (e.g. start an outage)


def json_reply(data: Any, status: int = 200, **kw: Any) -> Reply:
    return Reply(status=status, body=json.dumps(data).encode(), content_type="application/json", **kw)


def text_reply(text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8") -> Reply:
    return Reply(status=status, body=text.encode(), content_type=content_type)


HTML_502 = ("<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
            "</center>\r\n<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n")


def html_502() -> Reply:
    return text_reply(HTML_502, 502, "text/html")


class HttpError(Exception):
    """Raised by handlers: carries the finished error reply in the flavour's shape."""

    def __init__(self, reply: Reply):
        super().__init__(f"HTTP {reply.status}")
        self.reply = reply


@dataclass
class Route:
    method: str
    pattern: str          # a full-match regex on the path; named groups become keyword arguments
    handler: Callable[..., Reply]
    chat: bool = False    # a generation endpoint (faults with scope "chat" apply)
    public: bool = False  # no bearer token needed

    def __post_init__(self) -> None:
        self._re = re.compile(self.pattern)

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if method != self.method and not (method == "HEAD" and self.method == "GET"):
            return None
        m = self._re.fullmatch(path)
        return None if m is None else m.groupdict()
