"""`aibot serve`: the original monitor's HTTP API, a WebSocket feed, /metrics and the dashboard.

A Starlette app on uvicorn: HTTP/1.1 (h11) and the WebSocket protocol (RFC 6455: handshake, framing,
ping/pong, close) are the libraries'. uvicorn drives `wsproto` for WebSockets because its wsproto
protocol completes a refused upgrade (the Denial Response extension) cleanly; its `websockets-sansio`
protocol logs "ASGI callable returned without completing handshake" after every 401/403
(uvicorn/protocols/websockets/websockets_sansio_impl.py:416 vs wsproto_impl.py:432, uvicorn 0.54.0).
Endpoints that read Postgres are plain functions, which Starlette runs in its
thread pool, so a slow query never blocks the event loop that carries the WebSocket frames.

The server binds to loopback by default; bound anywhere else it refuses to start without a token, and
whenever a token is configured every request must carry it (`Authorization: Bearer …` or `?token=…`,
the latter because browsers cannot set headers on a WebSocket). Without a token, only loopback Host
headers are accepted (a DNS-rebinding page cannot reach the API) and state-changing requests must come
from the same origin (a foreign page cannot POST /queue-clear to 127.0.0.1). A WebSocket upgrade counts
as state-changing (its client commands delete and clear jobs).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import decimal
import hmac
import ipaddress
import json
import logging
import re
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psycopg
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from aibot import db
from aibot.asgi import ThreadedServer
from aibot.ops import inspection
from aibot.settings import get_settings
from aibot.web import events, metrics

log = logging.getLogger("aibot.web")

STATIC = Path(__file__).resolve().parent
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
MAX_MESSAGE = 1 << 20          # largest WebSocket message a client may send (uvicorn's ws_max_size)
PING_INTERVAL = 20.0           # WebSocket keep-alive ping; a client that misses it for PING_TIMEOUT is closed
PING_TIMEOUT = 40.0
COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


class ServeError(Exception):
    """Configuration that must not start a server (e.g. a public bind without a token)."""


# --- pure policy -------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise ServeError(
            f"host: refusing to bind {host!r} without a token; set AIBOT_SERVE_TOKEN (or AIBOT_SERVE_TOKEN_FILE) "
            "or bind 127.0.0.1")


def bearer_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return query.get("token")


def token_ok(expected: str | None, presented: str | None) -> bool:
    if not expected:
        return True
    return presented is not None and hmac.compare_digest(expected.encode(), presented.encode())


def host_of(host_header: str | None) -> str:
    h = (host_header or "").strip()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def host_header_ok(host_header: str | None, token: str | None) -> bool:
    """Without a token only loopback names are served: defeats DNS rebinding to 127.0.0.1."""
    return bool(token) or is_loopback(host_of(host_header))


def origin_ok(origin: str | None, host_header: str | None) -> bool:
    """A browser request that changes state must come from the page this server served."""
    if not origin:
        return True  # not a browser (curl, scripts); they cannot be tricked by a foreign page
    return urllib.parse.urlsplit(origin).netloc.lower() == (host_header or "").lower()


def admission_problem(conn: HTTPConnection, token: str | None) -> tuple[int, str] | None:
    """(status, message) when the request must be refused, else None. The order matters: a foreign
    Host is refused before the token is looked at, and the token before the Origin."""
    host = conn.headers.get("host")
    if not host_header_ok(host, token):
        return 403, "Host: only loopback names are served without a token"
    if not token_ok(token, bearer_token(conn.headers, conn.query_params)):
        return 401, "unauthorized: send 'Authorization: Bearer <token>' or ?token=<token>"
    changes_state = conn.scope["type"] == "websocket" or conn.scope.get("method") == "POST"
    if changes_state and not origin_ok(conn.headers.get("origin"), host):
        return 403, "Origin: cross-site requests may not change state"
    return None


def websocket_key_problem(key: str | None) -> str | None:
    """RFC 6455 §4.2.1 item 5: the key must decode to 16 bytes, and a server must answer 400 otherwise.
    wsproto (1.2) accepts any key, so this one rule of the handshake is checked here."""
    try:
        if len(base64.b64decode(key or "", validate=True)) == 16:
            return None
    except ValueError:
        pass
    return "Sec-WebSocket-Key is not 16 base64-encoded bytes"


def to_json(obj: Any) -> bytes:
    def default(o):
        if isinstance(o, (dt.datetime, dt.date)):
            return o.isoformat()
        if isinstance(o, dt.timedelta):
            return o.total_seconds()
        if isinstance(o, decimal.Decimal):
            return float(o)
        if isinstance(o, uuid.UUID):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    return json.dumps(obj, default=default, separators=(",", ":")).encode("utf-8")


def redact_path(path: str) -> str:
    return re.sub(r"(token=)[^&]*", r"\1***", path)


class HttpError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.extra = extra


def job_id_param(text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise HttpError(400, f"id: {text!r} is not a job id")
    return int(text)


def json_response(status: int, obj: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(to_json(obj), status_code=status, media_type="application/json", headers=dict(headers or {}))


def error_response(status: int, message: str, **extra: Any) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return json_response(status, {"success": False, "error": message, **extra}, headers)


# --- what the endpoints do (no HTTP in here) ---------------------------------------------------------

class Api:
    """The monitor's operations as functions of query parameters and path ids, returning JSON objects."""

    def __init__(self, database: db.Database, hub: events.EventHub | None):
        self.database = database
        self.hub = hub

    def _conn(self):
        return self.database.transaction()

    # original monitor

    def queue_stats(self, query) -> dict:
        with self._conn() as conn:
            items = inspection.queue_items(conn, _limit(query, 500))
            stats = inspection.monitor_stats(conn)
        return {"items": items, "stats": stats}

    def queue_delete(self, query, job_id: str) -> dict:
        jid = job_id_param(job_id)
        with self._conn() as conn:
            inspection.discard_job(conn, jid, "deleted from the dashboard")
        return {"success": True, "itemId": jid}

    def queue_clear(self, query) -> dict:
        with self._conn() as conn:
            cleared = inspection.clear_queue(conn, "cleared from the dashboard")
        if self.hub:
            self.hub.broadcast_snapshot()
        return {"success": True, "cleared": cleared}

    def health(self, query) -> dict:
        with self._conn() as conn:
            size = inspection.queue_size(conn)
        return {"status": "ok", "queueSize": size, "timestamp": events.now_ms()}

    # aibot API

    def api_status(self, query) -> dict:
        with self._conn() as conn:
            return inspection.status_snapshot(conn)

    def api_servers(self, query) -> dict:
        with self._conn() as conn:
            return {"servers": inspection.server_health(conn)}

    def api_models(self, query) -> dict:
        with self._conn() as conn:
            return {"models": inspection.slot_usage(conn)}

    def api_jobs(self, query) -> dict:
        with self._conn() as conn:
            return {"jobs": inspection.list_jobs(conn, state=query.get("state"), entity=query.get("entity"),
                                                 limit=_limit(query, 100))}

    def api_job(self, query, job_id: str) -> dict:
        with self._conn() as conn:
            return {"job": inspection.get_job(conn, job_id_param(job_id))}

    def api_retry(self, query, job_id: str) -> dict:
        with self._conn() as conn:
            row = inspection.requeue_job(conn, job_id_param(job_id))
        return {"success": True, "job": row}

    def api_cancel(self, query, job_id: str) -> dict:
        reason = query.get("reason") or "cancelled from the dashboard"
        with self._conn() as conn:
            row = inspection.discard_job(conn, job_id_param(job_id), reason)
        return {"success": True, "job": row}

    def api_rpm(self, query) -> dict:
        minutes = query.get("minutes") or "60"
        with self._conn() as conn:
            return {"series": inspection.replies_per_minute(conn, inspection.validate_limit(minutes, maximum=1440))}

    def api_model_queue(self, query) -> dict:
        with self._conn() as conn:
            return {"models": inspection.model_queue(conn)}

    def api_entity_wait(self, query) -> dict:
        with self._conn() as conn:
            return {"entities": inspection.entity_wait(conn)}

    def api_loads(self, query) -> dict:
        minutes = query.get("minutes") or "60"
        with self._conn() as conn:
            return {"series": inspection.load_timeline(conn, inspection.validate_limit(minutes, maximum=1440))}

    def api_workers(self, query) -> dict:
        with self._conn() as conn:
            return {"workers": inspection.worker_status(conn), "fresh_seconds": get_settings().heartbeat_fresh_seconds()}

    # WebSocket client commands (as the original: delete, clear)

    def ws_command(self, msg: Any) -> dict | None:
        """Runs one client command; returns a frame for that client only (errors), or None."""
        if not isinstance(msg, dict) or not isinstance(msg.get("action"), str):
            return events.frame("error", {"message": "expected {\"action\": ...}"})
        action = msg["action"]
        try:
            if action == "delete":
                item = msg.get("itemId")
                if not isinstance(item, int) and not (isinstance(item, str) and item.isdigit()):
                    return events.frame("error", {"message": f"itemId: {item!r} is not a job id"})
                with self._conn() as conn:
                    inspection.discard_job(conn, int(item), "deleted from the dashboard")
                return None  # the trigger broadcasts `deleted`
            if action == "clear":
                with self._conn() as conn:
                    inspection.clear_queue(conn, "cleared from the dashboard")
                if self.hub:
                    self.hub.broadcast_snapshot()
                return None
        except inspection.InspectionError as exc:
            return events.frame("error", {"message": str(exc), "action": action, "itemId": msg.get("itemId")})
        return events.frame("error", {"message": f"action: {action!r} is not one of delete, clear"})

    def snapshot(self) -> dict:
        with self._conn() as conn:
            return events.frame("snapshot", events.snapshot_data(conn))


def _limit(query, default: int) -> int:
    return inspection.validate_limit(query.get("limit") or default)


# --- HTTP and WebSocket glue -------------------------------------------------------------------------

def _errors_as_json(path: str, call: Callable[[], Any]) -> Response:
    """Maps the operator-facing errors to statuses; anything unexpected is a 500 without details."""
    try:
        return call()
    except HttpError as exc:
        return error_response(exc.status, str(exc), **exc.extra)
    except (inspection.JobNotFound, inspection.ServerNotFound) as exc:
        return error_response(404, str(exc))
    except inspection.JobActionError as exc:
        return error_response(409, str(exc))
    except ValueError as exc:
        return error_response(400, str(exc))
    except (psycopg.OperationalError, TimeoutError) as exc:
        log.warning("database unavailable for %s: %s", path, type(exc).__name__)
        if path == "/health":
            return json_response(503, {"status": "error", "error": "database unavailable", "timestamp": events.now_ms()})
        return error_response(503, "database unavailable")
    except Exception:
        log.exception("error serving %s", path)
        return error_response(500, "internal error (see the serve log)")


def _json_endpoint(fn: Callable[..., dict]) -> Callable[[Request], Response]:
    """A sync Starlette endpoint (run in the thread pool) around an `Api` method."""
    def endpoint(request: Request) -> Response:
        return _errors_as_json(request.url.path,
                               lambda: json_response(200, fn(request.query_params, **request.path_params)))
    return endpoint


def _static(name: str, media_type: str) -> Callable[[Request], Response]:
    def endpoint(request: Request) -> Response:
        return Response((STATIC / name).read_bytes(), media_type=media_type)
    return endpoint


class Admission:
    """ASGI middleware: Host, token and Origin checks before any route runs, plus the common headers.

    A refused WebSocket gets a real HTTP response (the ASGI WebSocket Denial Response extension, which
    uvicorn implements), so a client sees 401/403 instead of a dropped connection.
    """

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        log.debug("%s %s", scope.get("method", "WS"), redact_path(str(conn.url.path) + "?" + conn.url.query))
        problem = admission_problem(conn, self.token)
        if problem is not None:
            response = error_response(*problem)
            if scope["type"] == "websocket":
                await WebSocket(scope, receive, send).send_denial_response(response)
            else:
                await response(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (k.lower().encode(), v.encode()) for k, v in COMMON_HEADERS.items()]
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404/405 as the JSON errors the monitor's clients expect."""
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        allowed = ", ".join(m for m in allow.split(", ") if m != "HEAD")
        return error_response(405, f"{request.method} is not allowed on {request.url.path} (use {allowed})")
    if exc.status_code == 404:
        return error_response(404, f"no such endpoint: {request.url.path}")
    return error_response(exc.status_code, str(exc.detail))


def build_app(database: db.Database, hub: events.EventHub | None, token: str | None) -> ASGIApp:
    api = Api(database, hub)

    async def ws_endpoint(websocket: WebSocket) -> None:
        problem = websocket_key_problem(websocket.headers.get("sec-websocket-key"))
        if problem:
            await websocket.send_denial_response(error_response(400, problem))
            return
        if hub is None:
            await websocket.send_denial_response(error_response(503, "live events are disabled on this server"))
            return
        await websocket.accept()
        client = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "ws"
        sub = events.Subscriber(asyncio.get_running_loop(), name=client)
        # Before the snapshot, so no event falls between the two; the first subscriber registers the hub
        # with the database (the triggers send events only then), so off the event loop.
        await run_in_threadpool(hub.subscribe, sub)
        sender = asyncio.create_task(_send_frames(websocket, sub))
        try:
            sub.offer(await run_in_threadpool(api.snapshot))
            await _receive_commands(websocket, sub, api)
        except WebSocketDisconnect:
            pass
        finally:
            hub.unsubscribe(sub)   # the last one unregisters the hub: a short write, and it must happen
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    def ws_over_http(request: Request) -> Response:
        return error_response(400, "/ws is a WebSocket endpoint: send 'Upgrade: websocket'")

    routes = [
        Route("/", _static("dashboard.html", "text/html; charset=utf-8")),
        Route("/dashboard.js", _static("dashboard.js", "text/javascript; charset=utf-8")),
        Route("/dashboard.css", _static("dashboard.css", "text/css; charset=utf-8")),
        Route("/metrics", lambda request: _errors_as_json("/metrics", lambda: metrics.response(database))),
        WebSocketRoute("/ws", ws_endpoint),
        Route("/ws", ws_over_http),
        Route("/queue-stats", _json_endpoint(api.queue_stats)),
        Route("/queue-delete/{job_id}", _json_endpoint(api.queue_delete), methods=["POST"]),
        Route("/queue-clear", _json_endpoint(api.queue_clear), methods=["POST"]),
        Route("/health", _json_endpoint(api.health)),
        Route("/api/status", _json_endpoint(api.api_status)),
        Route("/api/servers", _json_endpoint(api.api_servers)),
        Route("/api/models", _json_endpoint(api.api_models)),
        Route("/api/jobs", _json_endpoint(api.api_jobs)),
        Route("/api/jobs/{job_id}", _json_endpoint(api.api_job)),
        Route("/api/jobs/{job_id}/retry", _json_endpoint(api.api_retry), methods=["POST"]),
        Route("/api/jobs/{job_id}/cancel", _json_endpoint(api.api_cancel), methods=["POST"]),
        Route("/api/replies-per-minute", _json_endpoint(api.api_rpm)),
        Route("/api/model-queue", _json_endpoint(api.api_model_queue)),
        Route("/api/entity-wait", _json_endpoint(api.api_entity_wait)),
        Route("/api/loads-per-minute", _json_endpoint(api.api_loads)),
        Route("/api/workers", _json_endpoint(api.api_workers)),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
    return Admission(app, token)


async def _send_frames(websocket: WebSocket, sub: events.Subscriber) -> None:
    """Writes the subscriber's frames until it is stopped or dropped, then closes the connection."""
    while (f := await sub.next()) is not None:
        await websocket.send_text(to_json(f).decode("utf-8"))
    with contextlib.suppress(Exception):
        await websocket.close(1008 if sub.dropped.is_set() else 1000)


async def _receive_commands(websocket: WebSocket, sub: events.Subscriber, api: Api) -> None:
    while True:
        text = await websocket.receive_text()
        try:
            msg = json.loads(text)
        except ValueError:
            sub.offer(events.frame("error", {"message": "frames must be JSON"}))
            continue
        reply = await run_in_threadpool(api.ws_command, msg)
        if reply is not None:
            sub.offer(reply)


# --- the server --------------------------------------------------------------------------------------

class AppServer:
    """The app, its event hub and a uvicorn server (aibot.asgi.ThreadedServer) on a socket bound at
    construction (so a port in use fails here, and port 0 is known at once). `start()` serves in a
    background thread (tests); `serve_forever()` serves in the calling thread, where uvicorn handles
    SIGINT/SIGTERM."""

    def __init__(self, database_url: str, *, host: str = "127.0.0.1", port: int = 4001, token: str | None = None,
                 stats_interval: float = 3.0, live_events: bool = True):
        check_bind(host, token)
        self.database_url = database_url
        self.database = db.Database(database_url)
        self.hub = events.EventHub(database_url, self.database, stats_interval=stats_interval) if live_events else None
        self.app = build_app(self.database, self.hub, token)
        # log_config=None (ThreadedServer's): our logging setup stays; the access log is off because it would
        # print ?token=. Keep-alive pings every PING_INTERVAL; a client that does not answer within
        # PING_TIMEOUT is closed. HTTP keep-alive and proxy headers as uvicorn's defaults for a service.
        self.server = ThreadedServer(self.app, host, port, name="aibot-serve", ws="wsproto", ws_max_size=MAX_MESSAGE,
                                     ws_ping_interval=PING_INTERVAL, ws_ping_timeout=PING_TIMEOUT,
                                     timeout_graceful_shutdown=5, timeout_keep_alive=5, proxy_headers=True)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    def start(self, timeout: float = 10.0) -> AppServer:
        if self.hub:
            self.hub.start()
        try:
            self.server.start(timeout)
        except OSError:
            raise ServeError(f"the HTTP server did not start on {self.url}") from None
        return self

    def serve_forever(self) -> None:
        if self.hub:
            self.hub.start()
        self.server.serve_forever()

    def stop(self) -> None:
        self.server.stop(graceful=True, timeout=10)
        if self.hub:
            self.hub.stop()
        self.database.close()
