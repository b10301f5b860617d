"""A loopback HTTP server that answers with canned JSON payloads, for contract tests.

Contract tests feed the vendors' own payloads (tests/fixtures/<kind>/*.json) to a backend over a real
socket, so the backend parses exactly those bytes through its real HTTP client; the requests it sent are
recorded for the test to check.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def fixture(kind: str, name: str) -> Any:
    """The `payload` of tests/fixtures/<kind>/<name>.json (which must also say where it comes from)."""
    data = json.loads((FIXTURES / kind / f"{name}.json").read_text())
    assert data.get("source"), f"fixture {kind}/{name} does not cite its source"
    return data["payload"]


class CannedServer:
    """`answer(method, path, payload, status=200)` sets what a path returns (the latest call wins);
    unanswered paths get 404. `requests` lists (method, path, parsed JSON body) in arrival order."""

    def __init__(self) -> None:
        self._answers: dict[tuple[str, str], tuple[int, bytes]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _dispatch(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                with outer._lock:
                    outer.requests.append((self.command, path, json.loads(raw) if raw else None))
                    status, body = outer._answers.get((self.command, path),
                                                      (404, b'{"error": "no canned answer"}'))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _dispatch

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def answer(self, method: str, path: str, payload: Any, status: int = 200) -> None:
        with self._lock:
            self._answers[(method, path)] = (status, json.dumps(payload).encode())

    def sent(self, method: str, path: str) -> list[Any]:
        """The bodies of the requests made to `method path`."""
        with self._lock:
            return [body for m, p, body in self.requests if (m, p) == (method, path)]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
