"""`SimServer`: one simulated LLM server on a loopback port, served by uvicorn in a background thread.

HTTP/1.1 (keep-alive, chunked streams, Content-Length) is uvicorn's and h11's; the event loop holds
every connection, so idle keep-alive connections cost nothing and one process serves hundreds of
concurrent streamed requests. The engine paces generations with blocking waits (its slot and load
conditions are shared with the Python control API and timers), so each request's handler and each
step of its stream run in a worker thread (`anyio.to_thread`, up to `MAX_HANDLER_THREADS` at once):
a thread per request being generated, none per connection.

Faults need what no well-behaved server does: a connection dropped without any answer, a body shorter
than its Content-Length, a stream cut before its terminating chunk. ASGI has no word for "reset this
connection", so `_drop` closes the connection's transport where the reply stands, through the `send`
uvicorn's h11 protocol hands the app (see `_transport`). A "refuse" outage really closes the
listening socket and resets open connections, so clients see connection refused/reset exactly as when
a Mac Studio reboots; the same port is re-bound when it ends. `/_sim/*` admin endpoints never need the
API token and are left out of the request counts, so tests can observe a server without disturbing
what they measure.
"""

from __future__ import annotations

import asyncio
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
from typing import Any

import anyio
import anyio.to_thread
from starlette.datastructures import Headers

from aibot.sim.apis import make_flavour
from aibot.asgi import ThreadedServer
from aibot.sim.config import SimConfig, SimConfigError
from aibot.sim.engine import Engine, EngineError, Stopped
from aibot.sim.faults import FaultConfig, FaultConfigError, FaultSchedule
from aibot.sim.http import AbortStream, HttpError, Reply, Request, html_502

log = logging.getLogger("aibot.sim")

# Requests that may be inside the engine at once (generating, waiting for a slot or a load). anyio's
# default is 40, which would cap a benchmark's concurrency far below what the engine simulates.
MAX_HANDLER_THREADS = 2048
SERVER_HEADER = (b"server", b"aibot-sim/1")
_DONE = object()


def _transport(send: Any) -> asyncio.Transport | None:
    """The connection's transport: uvicorn's h11 protocol passes its RequestResponseCycle's bound `send`
    (uvicorn/protocols/http/h11_impl.py, `RequestResponseCycle.transport`, uvicorn 0.54)."""
    return getattr(getattr(send, "__self__", None), "transport", None)


async def _drop(send: Any) -> None:
    """Ends the connection where it stands (what was written is flushed, then FIN): no answer at all, a
    body shorter than its Content-Length, a stream without its terminating chunk, as from a server
    whose process died mid-reply. Clients see "server disconnected" / an incomplete body."""
    transport = _transport(send)
    if transport is None:
        raise RuntimeError("cannot reach the connection to drop it (uvicorn's h11 protocol is required)")
    transport.close()
    await asyncio.sleep(0)   # let connection_lost run, so uvicorn sees a disconnect, not an unanswered request


def _nodelay(send: Any) -> None:
    """Headers and body go out in separate writes; with Nagle on (asyncio leaves accepted sockets as
    the OS made them) the second waits for the client's delayed ACK: ~40 ms on every reply."""
    transport = _transport(send)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class _Listener(ThreadedServer):
    """The simulator's uvicorn server (aibot.asgi.ThreadedServer), with a bounded pool of handler
    threads made in its loop, and outages that refuse and reset connections (`close`)."""

    def __init__(self, sim: SimServer, host: str, port: int):
        self.sim = sim
        self.limiter: anyio.CapacityLimiter | None = None
        # No graceful wait on close: an outage or stop() has already reset the connections (`_refuse`).
        super().__init__(self.app, host, port, name=f"sim-{sim.name}", server_header=False)

    async def _serve(self) -> None:
        self.limiter = anyio.CapacityLimiter(MAX_HANDLER_THREADS)
        await super()._serve()

    def close(self) -> None:
        """Stops accepting at once (the listening socket is closed before this returns), resets every
        open connection, and ends the loop."""
        loop = self.loop
        if loop is not None and not loop.is_closed() and self.thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._refuse(), loop).result(5)
            except Exception:  # noqa: BLE001 - the loop is already ending; shutdown below closes the rest
                log.debug("simulator %s: closing the listener", self.sim.name, exc_info=True)
        self.stop()

    async def _refuse(self) -> None:
        for server in self.server.servers:
            server.close()
        for conn in list(self.server.server_state.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                transport.abort()

    # ------------------------------------------------------------------ the ASGI app

    async def app(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        target = scope["raw_path"].decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        req = Request.parse(scope["method"], target, Headers(scope=scope), bytes(body))
        _nodelay(send)
        reply = await anyio.to_thread.run_sync(self.sim.handle, req, limiter=self.limiter)
        try:
            await self._write(req, reply, receive, send)
        finally:
            if reply.after is not None:
                # Off the loop: an outage it starts closes this very listener.
                threading.Thread(target=reply.after, daemon=True, name=f"sim-{self.sim.name}-after").start()

    async def _write(self, req: Request, reply: Reply, receive: Any, send: Any) -> None:
        if reply.abort:
            if reply.stream is not None:
                reply.stream.close()   # type: ignore[attr-defined]
            await _drop(send)
            return
        headers = [(b"content-type", reply.content_type.encode("latin-1")), SERVER_HEADER]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
        if reply.close or reply.truncate:
            headers.append((b"connection", b"close"))
        if reply.stream is not None:
            await self._write_stream(reply, headers, receive, send)
            return
        headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        if req.method == "HEAD":
            await send({"type": "http.response.body", "body": b""})
        elif reply.truncate:
            await send({"type": "http.response.body", "body": reply.body[: len(reply.body) // 2], "more_body": True})
            await _drop(send)
        else:
            await send({"type": "http.response.body", "body": reply.body})

    async def _write_stream(self, reply: Reply, headers: list, receive: Any, send: Any) -> None:
        stream = reply.stream
        assert stream is not None
        gone = asyncio.Event()

        async def watch() -> None:   # a client that hangs up mid-stream frees its slot, as on a real server
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            while not gone.is_set():
                chunk = await anyio.to_thread.run_sync(next, stream, _DONE, limiter=self.limiter)
                if chunk is _DONE:
                    await send({"type": "http.response.body", "body": b""})
                    return
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (AbortStream, Stopped):
            await _drop(send)
        finally:
            watcher.cancel()
            stream.close()   # type: ignore[attr-defined]  # releases the slot if the client went away


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
        self._listener: _Listener | None = None
        self._listener_lock = threading.Lock()   # outage timers, admin requests and stop() may race
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

    def __enter__(self) -> SimServer:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimServer(name={self.name!r}, api={self.config.api!r}, url={self.url!r})"

    def _open_listener(self, port: int) -> None:
        with self._listener_lock:
            if self._listener is None and not (self.stop_event.is_set() and self.started_at is not None):
                self._open_listener_locked(port)

    def _open_listener_locked(self, port: int) -> None:
        deadline = time.monotonic() + 5.0
        while True:
            try:
                listener = _Listener(self, self.config.host, port)
                break
            except OSError:
                # After an outage the old port may linger briefly; a retry, not a synchronisation sleep.
                if port == 0 or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        listener.start()
        self.port = listener.port
        self._listener = listener

    def _close_listener(self) -> None:
        """Closes the listening socket and resets every open connection (both before returning)."""
        with self._listener_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

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
