"""An ASGI app on uvicorn in a daemon thread of this process, on a socket bound before it starts (so the
port is known at once and port 0 picks a free one). Used by the fake chat API and, as the base of
`aibot.sim.server._Listener`, by the LLM simulator, which adds outages and fault-level connection
control on top."""

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
    """`app` served by uvicorn (h11, no access log, keep-alive as long as a real service's) in a thread."""

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

    def start(self, timeout: float = 10.0) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.005)   # polls a flag uvicorn sets; it offers no event to wait on
        return self

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.sock])

    def stop(self) -> None:
        self.server.should_exit = self.server.force_exit = True
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
        self.sock.close()
