"""`aibot serve`: the original monitor's HTTP API, a WebSocket feed, /metrics and the dashboard.

Stdlib `ThreadingHTTPServer`, one thread per request (a WebSocket keeps its thread). It binds to
loopback by default; bound anywhere else it refuses to start without a token, and whenever a token is
configured every request must carry it (`Authorization: Bearer …` or `?token=…`, the latter because
browsers cannot set headers on a WebSocket). Without a token, only loopback Host headers are accepted
(a DNS-rebinding page cannot reach the API) and state-changing requests must come from the same origin
(a foreign page cannot POST /queue-clear to 127.0.0.1).
"""

from __future__ import annotations

import datetime as dt
import decimal
import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg

from aibot import db, inspection
from aibot.web import events, metrics, websocket

log = logging.getLogger("aibot.web")

STATIC = Path(__file__).resolve().parent
STATIC_FILES = {
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


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


def bearer_token(headers, query: dict[str, list[str]]) -> str | None:
    auth = headers.get("Authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    values = query.get("token")
    return values[0] if values else None


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


# --- the app -----------------------------------------------------------------------------------------

Route = tuple[str, re.Pattern, Callable[..., Any]]


class App:
    """Request handling that does not depend on the socket layer: routes map to JSON producers."""

    def __init__(self, database: db.Database, hub: events.EventHub | None, token: str | None):
        self.database = database
        self.hub = hub
        self.token = token
        self.routes: list[Route] = [
            ("GET", re.compile(r"/queue-stats"), self.queue_stats),
            ("POST", re.compile(r"/queue-delete/([^/]+)"), self.queue_delete),
            ("POST", re.compile(r"/queue-clear"), self.queue_clear),
            ("GET", re.compile(r"/health"), self.health),
            ("GET", re.compile(r"/api/status"), self.api_status),
            ("GET", re.compile(r"/api/servers"), self.api_servers),
            ("GET", re.compile(r"/api/models"), self.api_models),
            ("GET", re.compile(r"/api/jobs"), self.api_jobs),
            ("GET", re.compile(r"/api/jobs/([^/]+)"), self.api_job),
            ("POST", re.compile(r"/api/jobs/([^/]+)/retry"), self.api_retry),
            ("POST", re.compile(r"/api/jobs/([^/]+)/cancel"), self.api_cancel),
            ("GET", re.compile(r"/api/replies-per-minute"), self.api_rpm),
        ]

    def route(self, method: str, path: str) -> tuple[Callable[..., Any], tuple[str, ...]]:
        allowed = []
        for m, pattern, fn in self.routes:
            match = pattern.fullmatch(path)
            if match:
                if m == method:
                    return fn, match.groups()
                allowed.append(m)
        if allowed:
            raise HttpError(405, f"{method} is not allowed on {path} (use {', '.join(allowed)})")
        raise HttpError(404, f"no such endpoint: {path}")

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
        state = (query.get("state") or [None])[0]
        entity = (query.get("entity") or [None])[0]
        with self._conn() as conn:
            return {"jobs": inspection.list_jobs(conn, state=state, entity=entity, limit=_limit(query, 100))}

    def api_job(self, query, job_id: str) -> dict:
        with self._conn() as conn:
            return {"job": inspection.get_job(conn, job_id_param(job_id))}

    def api_retry(self, query, job_id: str) -> dict:
        with self._conn() as conn:
            row = inspection.requeue_job(conn, job_id_param(job_id))
        return {"success": True, "job": row}

    def api_cancel(self, query, job_id: str) -> dict:
        reason = (query.get("reason") or ["cancelled from the dashboard"])[0]
        with self._conn() as conn:
            row = inspection.discard_job(conn, job_id_param(job_id), reason)
        return {"success": True, "job": row}

    def api_rpm(self, query) -> dict:
        minutes = (query.get("minutes") or ["60"])[0]
        with self._conn() as conn:
            return {"series": inspection.replies_per_minute(conn, inspection.validate_limit(minutes, maximum=1440))}

    def metrics_text(self) -> str:
        with self._conn() as conn:
            return metrics.exposition(conn)

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


def _limit(query, default: int) -> int:
    return inspection.validate_limit((query.get("limit") or [default])[0])


class Handler(BaseHTTPRequestHandler):
    server_version = "aibot"
    protocol_version = "HTTP/1.1"
    app: App  # set on the subclass made by AppServer

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), fmt % tuple(redact_path(str(a)) for a in args))

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
        self._send(status, to_json(obj), "application/json", extra)

    def _error(self, status: int, message: str, **extra: Any) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        self._json(status, {"success": False, "error": message, **extra}, headers)

    def _admit(self, parsed, query, *, changes_state: bool) -> bool:
        app = self.app
        if not host_header_ok(self.headers.get("Host"), app.token):
            self._error(403, "Host: only loopback names are served without a token")
            return False
        if not token_ok(app.token, bearer_token(self.headers, query)):
            self._error(401, "unauthorized: send 'Authorization: Bearer <token>' or ?token=<token>")
            return False
        if changes_state and not origin_ok(self.headers.get("Origin"), self.headers.get("Host")):
            self._error(403, "Origin: cross-site requests may not change state")
            return False
        return True

    def _drain_body(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if 0 < n <= 1 << 16:
            self.rfile.read(n)
        elif n:
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._drain_body()
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parsed.query)
        path = parsed.path.rstrip("/") or "/"
        is_ws = path == "/ws"
        if not self._admit(parsed, query, changes_state=(method == "POST" or is_ws)):
            return
        try:
            if is_ws:
                self._websocket()
                return
            if method == "GET" and path in STATIC_FILES:
                name, ctype = STATIC_FILES[path]
                self._send(200, (STATIC / name).read_bytes(), ctype)
                return
            if method == "GET" and path == "/metrics":
                self._send(200, self.app.metrics_text().encode("utf-8"), metrics.CONTENT_TYPE)
                return
            fn, args = self.app.route(method, path)
            self._json(200, fn(query, *args))
        except HttpError as exc:
            self._error(exc.status, str(exc), **exc.extra)
        except inspection.JobNotFound as exc:
            self._error(404, str(exc))
        except inspection.ServerNotFound as exc:
            self._error(404, str(exc))
        except inspection.JobActionError as exc:
            self._error(409, str(exc))
        except ValueError as exc:
            self._error(400, str(exc))
        except (psycopg.OperationalError, TimeoutError) as exc:
            log.warning("database unavailable for %s %s: %s", method, path, type(exc).__name__)
            if path == "/health":
                self._json(503, {"status": "error", "error": "database unavailable", "timestamp": events.now_ms()})
            else:
                self._error(503, "database unavailable")
        except Exception:
            log.exception("error serving %s %s", method, path)
            self._error(500, "internal error (see the serve log)")

    # WebSocket

    def _websocket(self) -> None:
        problem = websocket.handshake_problem(self.command, self.headers)
        if problem:
            self._error(400, problem)
            return
        hub = self.app.hub
        if hub is None:
            self._error(503, "live events are disabled on this server")
            return
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", websocket.accept_key(self.headers["Sec-WebSocket-Key"]))
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        sock: socket.socket = self.connection
        sock.settimeout(None)
        ep = websocket.Endpoint(sock, is_client=False)
        sub = events.Subscriber(ep.send_json, name=self.address_string())
        hub.subscribe(sub)  # before the snapshot, so no event falls between the two
        try:
            with self.app.database.transaction() as conn:
                sub.offer(events.frame("snapshot", events.snapshot_data(conn)))
            self._ws_loop(ep, sub)
        finally:
            hub.unsubscribe(sub)
            ep.close()

    def _ws_loop(self, ep: websocket.Endpoint, sub: events.Subscriber) -> None:
        ping_every = 20.0
        self.connection.settimeout(ping_every)
        missed = 0
        while not sub.dropped.is_set():
            try:
                text = ep.recv()
                missed = 0
            except TimeoutError:
                missed += 1
                if missed > 2:
                    return
                ep.ping(str(time.time()).encode())
                continue
            except (websocket.WebSocketError, OSError, UnicodeDecodeError):
                return
            try:
                msg = json.loads(text)
            except ValueError:
                sub.offer(events.frame("error", {"message": "frames must be JSON"}))
                continue
            reply = self.app.ws_command(msg)
            if reply is not None:
                sub.offer(reply)


class AppServer:
    """The HTTP server plus its event hub; `start()` serves in background threads (tests, `aibot serve`)."""

    def __init__(self, database_url: str, *, host: str = "127.0.0.1", port: int = 4001, token: str | None = None,
                 stats_interval: float = 3.0, live_events: bool = True):
        check_bind(host, token)
        self.database_url = database_url
        self.database = db.Database(database_url)
        self.hub = events.EventHub(database_url, self.database, stats_interval=stats_interval) if live_events else None
        self.app = App(self.database, self.hub, token)
        handler = type("BoundHandler", (Handler,), {"app": self.app})
        server_cls = type("AibotHTTPServer", (ThreadingHTTPServer,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "daemon_threads": True})
        self.httpd = server_cls((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
        return f"http://{host}:{self.port}"

    def start(self) -> AppServer:
        if self.hub:
            self.hub.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="aibot-serve", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        if self.hub:
            self.hub.start()
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.hub:
            self.hub.stop()
        self.database.close()
        if self._thread:
            self._thread.join(5)
