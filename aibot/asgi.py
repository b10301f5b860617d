"""An ASGI app on uvicorn, on a socket bound before it starts (so a port in use fails at once, the port is
known at once and port 0 picks a free one), served in a daemon thread of this process or in the calling
thread. The one way aibot runs uvicorn: `aibot serve` (aibot.web.server.AppServer), the fake chat API, and
the LLM simulator (`aibot.sim.server._Listener` adds outages and fault-level connection control)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import uvicorn


def bind(host: str, port: int, backlog: int = 1024) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class ThreadedServer:
    """`app` served by uvicorn (h11, no access log, keep-alive as long as a real service's) in a thread
    (`start`) or in the calling thread (`serve_forever`); `config` overrides any uvicorn option."""

    def __init__(self, app: Any, host: str, port: int, *, name: str, **config: Any):
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        options = {"interface": "asgi3", "http": "h11", "ws": "none", "lifespan": "off", "log_config": None,
                   "access_log": False, "proxy_headers": False, "timeout_keep_alive": 300,
                   "timeout_graceful_shutdown": None, "backlog": 1024, **config}
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        if logging.getLogger("uvicorn.error").level == logging.NOTSET:
            logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"{name}-{self.port}")

    @property
    def url(self) -> str:
        host = self.sock.getsockname()[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.005)   # polls a flag uvicorn sets; it offers no event to wait on
        return self

    def serve_forever(self) -> None:
        """Serves in the calling thread until uvicorn exits; in the main thread uvicorn handles SIGINT/SIGTERM."""
        self._run()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.sock])

    def stop(self, *, graceful: bool = False, timeout: float = 5.0) -> None:
        """Ends the server; `graceful` lets requests in flight finish (up to `timeout_graceful_shutdown`)."""
        self.server.should_exit = True
        self.server.force_exit = not graceful
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)
        self.sock.close()
