"""`SimServer`: one simulated LLM server on a loopback port, in a background thread of this process.

Standard library only (ThreadingHTTPServer, one daemon thread per connection, HTTP/1.1 keep-alive).
A "refuse" outage really closes the listening socket and shuts down open connections, so clients see
connection refused/reset exactly as when a Mac Studio reboots; the same port is re-bound when it ends.
`/_sim/*` admin endpoints never need the API token and are left out of the request counts, so tests can
observe a server without disturbing what they measure.
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import logging
import random
import socket
import struct
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aibot.sim.apis import make_flavour
from aibot.sim.config import SimConfig, SimConfigError
from aibot.sim.engine import Engine, EngineError, Stopped
from aibot.sim.faults import FaultConfig, FaultConfigError, FaultSchedule
from aibot.sim.http import AbortStream, HttpError, Reply, Request, html_502, json_reply

log = logging.getLogger("aibot.sim")


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], sim: SimServer):
        self.sim = sim
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):  # type: ignore[override]
        self.sim._track(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # type: ignore[override]
        self.sim._untrack(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):  # type: ignore[override]
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "aibot-sim/1"
    sys_version = ""
    disable_nagle_algorithm = True   # headers and body go out in separate writes; Nagle would add ~40 ms

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def handle(self) -> None:
        sim: SimServer = self.server.sim  # type: ignore[attr-defined]
        me = threading.current_thread()
        sim._threads.add(me)
        try:
            super().handle()
        except OSError:
            self.close_connection = True
        finally:
            sim._threads.discard(me)

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        raw = self.headers.get("Content-Length") or "0"
        try:
            n = int(raw)
        except ValueError:
            return None
        return self.rfile.read(n) if n > 0 else b""

    def _dispatch(self) -> None:
        sim: SimServer = self.server.sim  # type: ignore[attr-defined]
        body = self._body()
        if body is None:
            self.close_connection = True
            self._write(json_reply({"error": "bad Content-Length"}, 400))
            return
        req = Request.parse(self.command, self.path, self.headers, body)
        reply = sim.handle(req)
        try:
            self._write(reply)
        finally:
            if reply.after is not None:
                reply.after()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _hard_close(self) -> None:
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write(self, reply: Reply) -> None:
        if reply.abort:
            self._hard_close()
            return
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            for k, v in reply.headers.items():
                self.send_header(k, v)
            if reply.close or reply.truncate:
                self.send_header("Connection", "close")
                self.close_connection = True
            if reply.stream is not None:
                self._write_stream(reply)
                return
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if reply.truncate:
                self.wfile.write(reply.body[: len(reply.body) // 2])
                self._hard_close()
                return
            self.wfile.write(reply.body)
        except OSError:
            self.close_connection = True

    def _write_stream(self, reply: Reply) -> None:
        assert reply.stream is not None
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in reply.stream:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except AbortStream:
            self._hard_close()
        except (Stopped, OSError):
            self._hard_close()
        finally:
            reply.stream.close()   # type: ignore[attr-defined]  # releases the slot if the client went away


class SimServer:
    """A simulated server. `start()` returns once the socket listens; `stop()` closes it and joins."""

    def __init__(self, config: SimConfig | None = None, **overrides: Any):
        if config is None:
            config = SimConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.stop_event = threading.Event()
        self.engine = Engine(config, stop_event=self.stop_event, evict_lru=config.api == "ollama")
        self.faults = FaultSchedule(dataclasses.replace(config.faults, script=list(config.faults.script)),
                                    seed=config.seed)
        self.flavour = make_flavour(self)
        self._routes = self.flavour.routes()
        self._lock = threading.Lock()
        self._rng = random.Random(config.seed + 1)
        self._counter = itertools.count(1)
        self._httpd: _Listener | None = None
        self._serve_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._listener_lock = threading.Lock()   # outage timers, admin requests and stop() may race
        self._threads: set[threading.Thread] = set()
        self._timers: list[threading.Timer] = []
        self._outage: dict[str, Any] | None = None
        self._outage_timer: threading.Timer | None = None
        self._outages = 0
        self._outage_rejected = 0
        self._requests: Counter[str] = Counter()
        self._statuses: Counter[str] = Counter()
        self._log: deque[dict[str, Any]] = deque(maxlen=500)
        self.port = config.port
        self.started_at: float | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def start(self) -> SimServer:
        preload = list(self.config.preloaded)
        if self.config.api == "openai" and not preload:
            preload = list(self.engine.catalog)
        if self.config.api == "llamacpp":
            preload = [self.engine.single_model()]
        for i, key in enumerate(preload):
            try:
                self.engine.load(key, instant=True, reuse_loaded=True)
            except EngineError as exc:
                raise SimConfigError(f"SimConfig.preloaded[{i}]: cannot preload {key!r}: {exc}") from None
        self.engine.reset_stats()   # counters describe traffic, not set-up: they start at zero
        self._open_listener(self.config.port)
        self.started_at = time.monotonic()
        for start_after, seconds in self.config.faults.outage_windows:
            t = threading.Timer(start_after, self.begin_outage, kwargs={"seconds": seconds})
            t.daemon = True
            t.start()
            self._timers.append(t)
        log.info("simulator %s (%s) listening on %s", self.name, self.config.api, self.url)
        return self

    def stop(self) -> None:
        if self.stop_event.is_set():
            return
        self.stop_event.set()
        for t in self._timers + ([self._outage_timer] if self._outage_timer else []):
            t.cancel()
        with self.engine.lock:
            self.engine.lock.notify_all()
        self._close_listener()
        self._reset_connections()
        deadline = time.monotonic() + 5.0
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> SimServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimServer(name={self.name!r}, api={self.config.api!r}, url={self.url!r})"

    def _open_listener(self, port: int) -> None:
        with self._listener_lock:
            if self._httpd is None and not (self.stop_event.is_set() and self.started_at is not None):
                self._open_listener_locked(port)

    def _open_listener_locked(self, port: int) -> None:
        deadline = time.monotonic() + 5.0
        while True:
            try:
                httpd = _Listener((self.config.host, port), self)
                break
            except OSError:
                # After an outage the old port may linger briefly; a retry, not a synchronisation sleep.
                if port == 0 or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._serve_thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                              daemon=True, name=f"sim-{self.name}-{self.port}")
        self._serve_thread.start()

    def _close_listener(self) -> None:
        with self._listener_lock:
            httpd, thread = self._httpd, self._serve_thread
            self._httpd = self._serve_thread = None
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
            if thread is not None:
                thread.join()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.discard(sock)

    def _reset_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------------ outages

    def begin_outage(self, seconds: float | None = None, mode: str | None = None) -> None:
        """Takes the server down; `seconds=None` lasts until `end_outage()` (not reachable over HTTP in
        "refuse" mode, so give a duration there)."""
        mode = mode or self.faults.config.outage_mode
        if mode not in ("refuse", "503"):
            raise FaultConfigError(f"outage mode: {mode!r} must be 'refuse' or '503'")
        if self.stop_event.is_set():
            return
        if mode == "refuse":
            # Close first, then mark: once `in_outage` is true a new connection is certain to be refused.
            self._close_listener()
            self._reset_connections()
        with self._lock:
            if self._outage_timer is not None:
                self._outage_timer.cancel()
                self._outage_timer = None
            self._outage = {"mode": mode, "since": time.time(),
                            "until": None if seconds is None else time.time() + seconds}
            self._outages += 1
        log.info("simulator %s: outage (%s) for %s s", self.name, mode, seconds)
        if seconds is not None:
            timer = threading.Timer(seconds, self.end_outage)
            timer.daemon = True
            with self._lock:
                self._outage_timer = timer
            timer.start()

    def end_outage(self) -> None:
        with self._lock:
            outage, self._outage = self._outage, None
            if self._outage_timer is not None:
                self._outage_timer.cancel()
                self._outage_timer = None
        if outage is None or self.stop_event.is_set():
            return
        if outage["mode"] == "refuse":
            self._open_listener(self.port)
        log.info("simulator %s: outage over", self.name)

    @property
    def in_outage(self) -> bool:
        return self._outage is not None

    # ------------------------------------------------------------------ Python control API

    def set_faults(self, config: FaultConfig | None = None, **fields: Any) -> FaultConfig:
        """Replaces the faults (`config`) or changes only the named fields; returns the new config."""
        new = config if config is not None else FaultConfig.from_dict(fields, base=self.faults.config)
        self.faults.update(new)
        return new

    def clear_faults(self) -> None:
        self.faults.update(FaultConfig(outage_mode=self.faults.config.outage_mode))

    def fail_next(self, *kinds: str) -> None:
        """The next len(kinds) requests (in scope) get these faults, in order."""
        self.set_faults(script=list(self.faults.config.script) + list(kinds))

    def load(self, model: str, *, instant: bool = True) -> str:
        return self.engine.load(model, instant=instant, reuse_loaded=True).id

    def unload(self, model: str) -> int:
        return self.engine.unload_model(model)

    def next_counter(self) -> int:
        with self._lock:
            return next(self._counter)

    def draw_reply_options(self) -> tuple[bool, bool]:
        with self._lock:
            skip = self.config.skip_rate > 0 and self._rng.random() < self.config.skip_rate
            human = self.config.human_tail_rate > 0 and self._rng.random() < self.config.human_tail_rate
            return skip, human

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "api": self.config.api, "url": self.url,
                               "uptime_seconds": 0.0 if self.started_at is None
                               else round(time.monotonic() - self.started_at, 3)}
        out.update(self.engine.stats())
        with self._lock:
            out["requests"] = {"total": sum(self._requests.values()), "by_endpoint": dict(self._requests),
                               "by_status": dict(self._statuses)}
            out["outage"] = {"active": self._outage is not None,
                             "mode": self._outage["mode"] if self._outage else None,
                             "count": self._outages, "rejected": self._outage_rejected}
        out["faults_injected"] = dict(self.faults.injected)
        return out

    def model_stats(self, model: str) -> dict[str, Any]:
        return self.stats()["models"][model]

    def reset_stats(self) -> None:
        self.engine.reset_stats()
        self.faults.reset_counts()
        with self._lock:
            self._requests.clear()
            self._statuses.clear()
            self._log.clear()
            self._outages = self._outage_rejected = 0

    def request_log(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._log)

    # ------------------------------------------------------------------ request handling

    def handle(self, req: Request) -> Reply:
        if req.path.startswith("/_sim/") or req.path == "/_sim":
            from aibot.sim.admin import handle_admin
            return handle_admin(self, req)
        reply = self._handle_api(req)
        status = "aborted" if reply.abort else str(reply.status)
        with self._lock:
            self._requests[f"{req.method} {req.path}"] += 1
            self._statuses[status] += 1
            self._log.append({"t": round(time.time(), 3), "method": req.method, "path": req.path,
                              "status": status, "fault": req.fault})
        return reply

    def _handle_api(self, req: Request) -> Reply:
        outage = self._outage
        if outage is not None:
            with self._lock:
                self._outage_rejected += 1
            if outage["mode"] == "refuse":
                return Reply(abort=True)   # a connection accepted just before the socket closed
            return self.flavour.unavailable("Service temporarily unavailable (simulated outage)")
        route, params = None, None
        for r in self._routes:
            params = r.match(req.method, req.path)
            if params is not None:
                route = r
                break
        if route is None or params is None:
            return self.flavour.not_found(req)
        if self.config.api_token and not route.public and not self._authorized(req):
            return self.flavour.unauthorized()
        fault = self.faults.draw(chat=route.chat)
        if fault == "error":
            with self._lock:
                status = self._rng.choice((500, 503))
            return self.flavour.server_error("Simulated server error", status=status)
        if fault == "html":
            return html_502()
        req.fault = fault
        try:
            if fault == "slow" and not route.chat:
                self.engine.sleep(self.faults.config.slow_seconds)
            return route.handler(req, **params)
        except HttpError as exc:
            return exc.reply
        except Stopped:
            return Reply(abort=True)
        except Exception as exc:  # noqa: BLE001 - a simulator bug must answer, not hang the client
            log.exception("simulator %s: handler for %s %s failed", self.name, req.method, req.path)
            return self.flavour.server_error(f"simulator error: {exc!r}")

    def _authorized(self, req: Request) -> bool:
        header = req.headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        expected = self.config.api_token or ""
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())
