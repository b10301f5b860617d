"""HTTP plumbing (aibot.backends.http) and error typing, over real loopback HTTP.

A tiny scripted server answers each path with whatever misbehaviour a test needs (HTML, garbage,
cut-off bodies, resets, stalls), so the mapping to typed errors is checked against real sockets.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aibot.backends import (
    BadResponse,
    ChatRequest,
    InsufficientResources,
    ModelNotLoaded,
    RequestFault,
    ServerFault,
    Timeout,
    Timeouts,
    Unauthorized,
    Unreachable,
    Unsupported,
    make_backend,
)
from aibot.backends.http import normalize_base_url, redact_url

TOKEN = "sk-lm-SECRET12:abcdefghijklmnopqrst"
REQ = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
FAST = Timeouts(connect=1, read=1, total=2, control=2, probe_connect=0.5, probe_total=1)


class Scripted:
    """A loopback HTTP server; `routes[(method, path)] = fn(handler)` writes the response."""

    def __init__(self, tls_context: ssl.SSLContext | None = None):
        self.routes: dict[tuple[str, str], object] = {}
        self.seen: list[dict] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _dispatch(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                outer.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                   "body": json.loads(body) if body else None})
                fn = outer.routes.get((self.command, path))
                if fn is None:
                    return send(self, 404, {"error": f"no route {self.command} {path}"})
                fn(self)

            do_GET = do_POST = _dispatch

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        scheme = "https" if tls_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def send(h, status, body, content_type="application/json", headers=()):
    raw = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(raw)))
    for k, v in headers:
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(raw)


def completion(text="hello", finish="stop"):
    return {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def sse(h, events, done=True):
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Connection", "close")
    h.end_headers()
    for e in events:
        h.wfile.write(f"data: {json.dumps(e)}\n\n".encode())
        h.wfile.flush()
    if done:
        h.wfile.write(b"data: [DONE]\n\n")
    h.close_connection = True


def chunk(text=None, finish=None):
    delta = {"content": text} if text is not None else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@pytest.fixture
def srv():
    s = Scripted()
    yield s
    s.stop()


@pytest.fixture
def backend(srv):
    b = make_backend("openai", srv.url, token=TOKEN, timeouts=FAST)
    yield b
    b.close()


def route(srv, method, path):
    def deco(fn):
        srv.routes[(method, path)] = fn
        return fn
    return deco


# ---------------------------------------------------------------- success and auth

def test_chat_sends_bearer_token_and_parses_reply(srv, backend):
    route(srv, "POST", "/v1/chat/completions")(lambda h: send(h, 200, completion("hi there")))
    req = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], params={"temperature": 0.5},
                      stop=["\n"])
    result = backend.chat(req)
    assert (result.text, result.finish_reason) == ("hi there", "stop")
    assert (result.prompt_tokens, result.completion_tokens, result.model) == (5, 2, "m")
    seen = srv.seen[-1]
    assert seen["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert seen["body"] == {"model": "m", "messages": req.messages, "temperature": 0.5, "stop": ["\n"],
                            "stream": False}


def test_no_authorization_header_without_token(srv):
    route(srv, "GET", "/v1/models")(lambda h: send(h, 200, {"data": [{"id": "a"}]}))
    b = make_backend("openai", srv.url + "/v1/", timeouts=FAST, default_parallel=3)
    assert [(m.key, m.parallel) for m in b.list_loaded()] == [("a", 3)]
    assert "Authorization" not in srv.seen[-1]["headers"]
    b.close()


def test_401_is_unauthorized_server_fault_and_never_shows_the_token(srv, backend, caplog):
    # A server that echoes the Authorization header back in its error body.
    route(srv, "POST", "/v1/chat/completions")(
        lambda h: send(h, 401, {"error": f"bad token {h.headers['Authorization']}"}))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Unauthorized) as info:
        backend.chat(REQ)
    exc = info.value
    assert exc.server_fault and exc.status == 401
    for text in (str(exc), repr(exc), exc.body or "", caplog.text, repr(backend)):
        assert TOKEN not in text and "SECRET12" not in text


# ---------------------------------------------------------------- status mapping

@pytest.mark.parametrize("status,body,cls,server_fault", [
    (500, {"error": "boom"}, ServerFault, True),
    (503, "Service Unavailable", ServerFault, True),
    (429, {"error": "queue full"}, ServerFault, True),
    (400, {"error": {"message": "Model loading was stopped due to insufficient system resources."}},
     InsufficientResources, True),
    (500, {"error": "This model requires approximately 40 GB of memory"}, InsufficientResources, True),
    (404, {"error": {"message": "No models loaded. Please load a model in the developer page.",
                     "type": "invalid_request_error"}}, ModelNotLoaded, False),
    (400, {"error": {"message": "model 'zzz' not found"}}, ModelNotLoaded, False),
    (400, {"error": {"message": "the request exceeds the available context size", "type": "exceed_context_size_error"}},
     RequestFault, False),
    (408, "slow", Timeout, True),
])
def test_status_mapping(srv, backend, status, body, cls, server_fault):
    route(srv, "POST", "/v1/chat/completions")(lambda h: send(h, status, body))
    with pytest.raises(cls) as info:
        backend.chat(REQ)
    assert type(info.value) is cls
    assert info.value.server_fault is server_fault
    assert info.value.status == status


def test_5xx_body_is_truncated_on_the_error(srv, backend):
    route(srv, "POST", "/v1/chat/completions")(lambda h: send(h, 500, "E" * 20000, "text/plain"))
    with pytest.raises(ServerFault) as info:
        backend.chat(REQ)
    assert info.value.status == 500
    assert info.value.body.startswith("EEEE") and len(info.value.body) < 600
    assert len(str(info.value)) < 600


# ---------------------------------------------------------------- bad 2xx answers

@pytest.mark.parametrize("body,content_type,match", [
    ("{not json", "application/json", "invalid JSON"),
    ("<html><body>proxy login</body></html>", "text/html", "HTML"),
    ("plain words", "text/plain", "content type"),
    ("", "application/json", "empty body"),
    (json.dumps({"choices": []}), "application/json", "no choices"),
    (json.dumps({"id": "x"}), "application/json", "no choices"),
    (json.dumps({"choices": [{"index": 0}]}), "application/json", "content missing"),
    (json.dumps([1, 2]), "application/json", "expected a JSON object"),
    (json.dumps({"error": "Unexpected endpoint or method."}), "application/json", "error in a 2xx"),
])
def test_bad_2xx_answers_are_bad_response(srv, backend, body, content_type, match):
    route(srv, "POST", "/v1/chat/completions")(lambda h: send(h, 200, body, content_type))
    with pytest.raises(BadResponse, match=match) as info:
        backend.chat(REQ)
    assert info.value.server_fault


def test_2xx_error_mentioning_resources_is_insufficient_resources(srv, backend):
    route(srv, "POST", "/v1/chat/completions")(
        lambda h: send(h, 200, {"error": "Loading would overload your system"}))
    with pytest.raises(InsufficientResources):
        backend.chat(REQ)


def test_null_content_is_empty_text(srv, backend):
    route(srv, "POST", "/v1/chat/completions")(lambda h: send(h, 200, completion(None, "length")))
    assert backend.chat(REQ).text == ""


# ---------------------------------------------------------------- transport failures

def test_connection_refused_is_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = make_backend("openai", f"http://127.0.0.1:{port}", timeouts=FAST)
    with pytest.raises(Unreachable, match="cannot reach"):
        b.chat(REQ)
    info = b.health()
    assert not info.healthy and info.detail.startswith("Unreachable")


def test_dns_failure_is_unreachable():
    b = make_backend("openai", "http://no-such-host.invalid:1234", timeouts=FAST)
    with pytest.raises(Unreachable):
        b.list_loaded()


def test_reset_before_answer_is_unreachable_after_one_more_try_on_a_new_connection(srv, backend):
    ports: list[int] = []

    def reset(h):
        ports.append(h.client_address[1])
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        h.connection.close()
        h.close_connection = True
    route(srv, "POST", "/v1/chat/completions")(reset)
    with pytest.raises(Unreachable):
        backend.chat(REQ)
    assert len(ports) == 2 and len(set(ports)) == 2


def test_a_keep_alive_connection_the_server_closes_as_the_request_goes_out_is_retried_once(srv, backend):
    """cpp-httplib (llama.cpp) closes an idle keep-alive connection after 5 s; a request sent on it at that
    moment reaches a closing socket and gets no answer (CI against xllamacpp: RemoteProtocolError, a server
    fault, a retried job). The client sends it once more, on a new connection, and the server is fine."""
    served: dict[int, int] = {}

    def answer_once_per_connection(h):
        port = h.client_address[1]
        served[port] = served.get(port, 0) + 1
        if served[port] > 1:             # the server's idle timeout fires as this request arrives
            h.connection.close()
            h.close_connection = True
            return
        send(h, 200, completion("ok"))
    route(srv, "POST", "/v1/chat/completions")(answer_once_per_connection)
    assert [backend.chat(REQ).text for _ in range(3)] == ["ok"] * 3
    assert len(served) == 3 and sorted(served.values()) == [1, 2, 2]   # two stale reuses, each retried


def test_closing_the_client_breaks_off_a_request_in_flight_and_never_resends_it(srv, backend):
    """A worker's shutdown past its timeout closes its clients to stop the generations in flight. The
    broken connection fails before any response byte, like a stale keep-alive one, but must not be sent
    again: CI saw a worker that resent a 30 s generation at shutdown, and outlived its 60 s."""
    arrived = threading.Event()
    seen: list[int] = []

    def slow(h):
        seen.append(1)
        arrived.set()
        srv.release.wait(10)
        h.close_connection = True       # the client is gone: nothing more to read on this connection
    route(srv, "POST", "/v1/chat/completions")(slow)
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(Unreachable, backend.chat, REQ).value))
    t.start()
    assert arrived.wait(5)
    backend.close()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1
    assert len(seen) == 1, "the broken-off request was sent again"
    with pytest.raises(Unreachable, match="closed"):
        backend.chat(REQ)
    assert len(seen) == 1


def test_idle_connections_expire_before_the_servers_keep_alive_timeout():
    from aibot.backends.http import KEEPALIVE_EXPIRY, HttpClient

    client = HttpClient("http://127.0.0.1:1")
    try:
        assert KEEPALIVE_EXPIRY < 5        # cpp-httplib, uvicorn and Node close idle connections at 5 s
        assert client._transport._pool._keepalive_expiry == KEEPALIVE_EXPIRY
    finally:
        client.close()


def test_body_cut_off_after_headers_is_bad_response(srv, backend):
    def cut(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b'{"choices": [')
        h.wfile.flush()
        h.close_connection = True
    route(srv, "POST", "/v1/chat/completions")(cut)
    with pytest.raises(BadResponse, match="cut off"):
        backend.chat(REQ)


def test_read_timeout_is_timeout(srv):
    route(srv, "POST", "/v1/chat/completions")(lambda h: srv.release.wait(10))
    b = make_backend("openai", srv.url, timeouts=Timeouts(read=0.3, total=5))
    with pytest.raises(Timeout, match="timed out"):
        b.chat(REQ)
    b.close()


def test_total_deadline_bounds_a_trickling_answer(srv):
    def trickle(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "100000")
        h.end_headers()
        while not srv.release.wait(0.05):   # a byte every 50 ms: never a read timeout
            try:
                h.wfile.write(b" ")
                h.wfile.flush()
            except OSError:
                return
    route(srv, "POST", "/v1/chat/completions")(trickle)
    b = make_backend("openai", srv.url, timeouts=Timeouts(read=1, total=0.5))
    with pytest.raises(Timeout, match="deadline"):
        b.chat(REQ)
    b.close()


def test_health_probe_uses_short_timeout(srv):
    route(srv, "GET", "/v1/models")(lambda h: srv.release.wait(10))
    b = make_backend("openai", srv.url, timeouts=Timeouts(probe_connect=0.2, probe_total=0.3))
    info = b.health()
    assert not info.healthy and info.detail.startswith("Timeout")
    b.close()


# ---------------------------------------------------------------- streaming

def test_stream_yields_deltas(srv, backend):
    route(srv, "POST", "/v1/chat/completions")(
        lambda h: sse(h, [chunk("Hel"), chunk("lo"), chunk(None, "stop")]))
    assert "".join(backend.chat_stream(REQ)) == "Hello"
    assert srv.seen[-1]["body"]["stream"] is True


def test_stream_with_finish_reason_but_no_done_is_complete(srv, backend):
    route(srv, "POST", "/v1/chat/completions")(lambda h: sse(h, [chunk("a"), chunk("b", "stop")], done=False))
    assert list(backend.chat_stream(REQ)) == ["a", "b"]


def test_truncated_stream_is_bad_response(srv, backend):
    route(srv, "POST", "/v1/chat/completions")(lambda h: sse(h, [chunk("Hel"), chunk("lo")], done=False))
    got = []
    with pytest.raises(BadResponse, match="truncated"):
        for piece in backend.chat_stream(REQ):
            got.append(piece)
    assert got == ["Hel", "lo"]


def test_stream_error_status_and_garbage_chunk(srv, backend):
    route(srv, "POST", "/v1/chat/completions")(lambda h: send(h, 503, {"error": "loading"}))
    with pytest.raises(ServerFault) as info:
        list(backend.chat_stream(REQ))
    assert info.value.status == 503

    def garbage(h):
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()
        h.wfile.write(b"data: {oops\n\n")
        h.close_connection = True
    route(srv, "POST", "/v1/chat/completions")(garbage)
    with pytest.raises(BadResponse, match="malformed"):
        list(backend.chat_stream(REQ))


def test_stream_error_event_is_typed(srv, backend):
    route(srv, "POST", "/v1/chat/completions")(
        lambda h: sse(h, [chunk("x"), {"error": {"message": "insufficient system resources"}}]))
    with pytest.raises(InsufficientResources):
        list(backend.chat_stream(REQ))


def test_stream_answered_with_plain_json_still_works(srv, backend):
    route(srv, "POST", "/v1/chat/completions")(lambda h: send(h, 200, completion("whole")))
    assert list(backend.chat_stream(REQ)) == ["whole"]


# ---------------------------------------------------------------- no load control, TLS, config

def test_openai_backend_has_no_load_control(srv, backend):
    route(srv, "GET", "/v1/models")(lambda h: send(h, 200, {"data": [{"id": "a"}]}))
    assert backend.load("a").key == "a"
    with pytest.raises(Unsupported, match="cannot load"):
        backend.load("b")
    with pytest.raises(Unsupported, match="cannot unload"):
        backend.unload("a")
    assert backend.tokenize("a", "text") is None


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"openssl unavailable: {exc}")
    return d / "cert.pem", d / "key.pem"


def test_tls_is_verified_by_default(tls_files):
    cert, key = tls_files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    s = Scripted(tls_context=ctx)
    route(s, "GET", "/v1/models")(lambda h: send(h, 200, {"data": [{"id": "a"}]}))
    try:
        with pytest.raises(Unreachable):
            make_backend("openai", s.url, timeouts=FAST).list_loaded()
        trusted = make_backend("openai", s.url, timeouts=FAST, verify=str(cert))
        assert [m.key for m in trusted.list_loaded()] == ["a"]
    finally:
        s.stop()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="Timeouts.read"):
        Timeouts(read=0)
    with pytest.raises(ValueError, match="unknown server kind 'vllm'"):
        make_backend("vllm", "http://x:1")
    with pytest.raises(ValueError, match="default_parallel"):
        make_backend("openai", "http://x:1", default_parallel=0)
    with pytest.raises(ValueError, match="base_url"):
        make_backend("openai", "ftp://x")


def test_url_helpers():
    assert normalize_base_url("http://h:1234/v1/") == "http://h:1234"
    assert redact_url("http://user:pw@h:1/p?token=x") == "http://h:1/p"


def test_backend_for_server_reads_token_from_env(srv):
    from types import SimpleNamespace

    from aibot.backends import backend_for_server
    route(srv, "GET", "/v1/models")(lambda h: send(h, 200, {"data": []}))
    server = SimpleNamespace(name="s1", kind="openai", url=srv.url, token_env="S1_TOKEN", default_parallel=2)
    with pytest.raises(ValueError, match="S1_TOKEN"):
        backend_for_server(server, environ={})
    b = backend_for_server(server, environ={"S1_TOKEN": "tok"})
    b.list_loaded()
    assert srv.seen[-1]["headers"]["Authorization"] == "Bearer tok"


def test_backend_for_real_server_config(srv):
    config = pytest.importorskip("aibot.config")
    route(srv, "GET", "/v1/models")(lambda h: send(h, 200, {"data": [{"id": "a"}]}))
    from aibot.backends import backend_for_server
    server = config.ServerConfig.model_validate({"url": srv.url, "kind": "openai", "tokenEnv": "T",
                                                  "defaultParallel": 3})
    b = backend_for_server(server, environ={"T": "tok2"})
    assert [(m.key, m.parallel) for m in b.list_loaded()] == [("a", 3)]
    assert srv.seen[-1]["headers"]["Authorization"] == "Bearer tok2"


def chunked_sse(h, body: bytes, pieces: int = 3, seen_ports: list | None = None):
    """An SSE reply as a keep-alive server sends it: chunked, split at arbitrary byte offsets."""
    if seen_ports is not None:
        seen_ports.append(h.client_address[1])
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    step = max(1, len(body) // pieces)
    for i in range(0, len(body), step):
        part = body[i:i + step]
        h.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        h.wfile.flush()
    h.wfile.write(b"0\r\n\r\n")


def sse_body(events, done=True, newline=b"\n") -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + newline + newline for e in events)
    return out + (b"data: [DONE]" + newline + newline if done else b"")


def test_streamed_generations_reuse_one_connection(srv, backend):
    """A stream read to [DONE] must leave its connection in the pool: closing it unread made every
    generation open a new TCP connection (and, against https, a new TLS handshake)."""
    ports: list[int] = []
    body = sse_body([chunk("Hel"), chunk("lo"), chunk(None, "stop")])
    route(srv, "POST", "/v1/chat/completions")(lambda h: chunked_sse(h, body, seen_ports=ports))
    for _ in range(5):
        assert "".join(backend.chat_stream(REQ)) == "Hello"
    assert len(ports) == 5
    assert len(set(ports)) == 1, f"each streamed generation used a new connection: client ports {ports}"


def test_stream_split_mid_line_with_crlf_and_comments(srv, backend):
    """Lines split across chunks, CRLF endings, comments and `event:` lines parse as before."""
    body = (b": keep-alive\r\n\r\nevent: message\r\n"
            + sse_body([chunk("Hel"), chunk("lo wor"), chunk("ld", "stop")], newline=b"\r\n"))
    route(srv, "POST", "/v1/chat/completions")(lambda h: chunked_sse(h, body, pieces=len(body) // 3))
    assert "".join(backend.chat_stream(REQ)) == "Hello world"


def test_stream_with_invalid_utf8_is_malformed(srv, backend):
    body = b"data: {\"choices\": [{\"delta\": {\"content\": \"\xff\"}}]}\n\n"
    route(srv, "POST", "/v1/chat/completions")(lambda h: chunked_sse(h, body))
    with pytest.raises(BadResponse, match="malformed"):
        list(backend.chat_stream(REQ))


def test_stream_with_trailing_garbage_after_json_is_malformed(srv, backend):
    body = b'data: {"choices": []} trailing\n\n'
    route(srv, "POST", "/v1/chat/completions")(lambda h: chunked_sse(h, body))
    with pytest.raises(BadResponse, match="malformed"):
        list(backend.chat_stream(REQ))


def test_connection_cut_after_done_still_returns_the_whole_reply(srv, backend):
    """Reading past [DONE] (to keep the connection) must not turn a complete reply into an error when
    the server drops the connection before the chunked terminator."""
    def cut_after_done(h):
        body = sse_body([chunk("whole"), chunk(None, "stop")])
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
        h.wfile.flush()
        h.connection.shutdown(socket.SHUT_RDWR)    # no terminating chunk
        h.close_connection = True
    route(srv, "POST", "/v1/chat/completions")(cut_after_done)
    assert "".join(backend.chat_stream(REQ)) == "whole"
    route(srv, "POST", "/v1/chat/completions")(lambda h: chunked_sse(h, sse_body([chunk("next", "stop")])))
    assert "".join(backend.chat_stream(REQ)) == "next"     # the pool recovers with a fresh connection
