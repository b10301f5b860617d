"""A fake of the original chat API, for tests, demos and chaos runs.

It speaks what the bot needs from the real service (see docs/bot.md): `GET /api/comments?after=&limit=`
in either answer shape (`{comments:[...]}` oldest first, or a bare array newest first, as the KV
worker did), `POST /api/comments` idempotent on `id` like the Durable Object (a repeat answers
`{status:"duplicate"}` and is counted, not stored), and `PATCH /api/comments/:id`. Faults are drawn
from a seeded RNG so runs repeat: `post_failure_rate` answers 500 *before* storing; `post_ack_loss_rate`
stores the reply and *then* answers 500 (the crash-after-accept case exactly-once delivery must survive).

Helpers count replies by `replyTo`, so a test can assert every message was answered exactly once.
`GET /_chat/stats`, `POST /_chat/faults`, `POST /_chat/human` and `POST /_chat/reset` let a test drive
a server running in another process (`python -m aibot.sim.chat --port 0` prints its URL and READY).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import string
import sys
import threading
import time
import urllib.parse
from collections import Counter
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aibot.asgi import ThreadedServer

SHAPES = ("object", "array")


class FakeChatServer:
    def __init__(self, *, shape: str = "object", token: str | None = None, post_failure_rate: float = 0.0,
                 post_ack_loss_rate: float = 0.0, seed: int = 0, host: str = "127.0.0.1", port: int = 0):
        if shape not in SHAPES:
            raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")
        self.shape = shape
        self.token = token
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._ids = random.Random(seed + 1)
        self._records: list[tuple[int, int, Any]] = []   # (listing timestamp, arrival order, message)
        self._by_id: dict[str, dict] = {}
        self._seq = 0
        self._last_ts = 0
        self._counts: Counter[str] = Counter()
        # Every post as received (id, text, timestamp, what happened): what a sink that does NOT
        # deduplicate by id (the original's KV Worker API) would have kept, so tests can count the
        # repeats and tell a re-sent reply (identical) from a regenerated one (other text).
        self._post_log: list[dict] = []
        self.set_faults(post_failure_rate=post_failure_rate, post_ack_loss_rate=post_ack_loss_rate)
        self._server: ThreadedServer | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeChatServer:
        self._server = ThreadedServer(_app(self), self._host, self._port, name="fake-chat").start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        host = self._host if ":" not in self._host else f"[{self._host}]"
        return f"http://{host}:{self._server.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> FakeChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- configuration --------------------------------------------------------------------------

    def set_faults(self, *, post_failure_rate: float | None = None, post_ack_loss_rate: float | None = None,
                   seed: int | None = None, fail_next_posts: int | None = None) -> None:
        with self._lock:
            for name, value in (("post_failure_rate", post_failure_rate), ("post_ack_loss_rate", post_ack_loss_rate)):
                if value is None:
                    continue
                if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
                    raise ValueError(f"{name}: expected a number between 0 and 1, got {value!r}")
                setattr(self, name, float(value))
            if seed is not None:
                self._rng = random.Random(seed)
            if fail_next_posts is not None:
                self._fail_next = int(fail_next_posts)
            elif not hasattr(self, "_fail_next"):
                self._fail_next = 0

    def reset(self) -> None:
        with self._lock:
            self._records.clear()
            self._by_id.clear()
            self._counts.clear()
            self._post_log.clear()

    # --- test helpers ---------------------------------------------------------------------------

    def _next_ts(self, timestamp: int | None) -> int:
        if timestamp is None:
            timestamp = max(int(time.time() * 1000), self._last_ts + 1)
        self._last_ts = max(self._last_ts, timestamp)
        return timestamp

    def _new_id(self) -> str:
        return "".join(self._ids.choice(string.ascii_lowercase + string.digits) for _ in range(10))

    def _store(self, message: dict) -> dict:
        """Caller holds the lock."""
        message.setdefault("message-type", "human")
        message["timestamp"] = self._next_ts(message.get("timestamp") if isinstance(message.get("timestamp"), int)
                                             and not isinstance(message.get("timestamp"), bool) else None)
        self._seq += 1
        self._records.append((message["timestamp"], self._seq, message))
        self._by_id[str(message["id"])] = message
        return copy.deepcopy(message)

    def post_human(self, text: str, entity: str | None = None, priority: Any = None, context: list | None = None,
                   ais: str | None = None, *, model: str | None = None, username: str = "human",
                   color: str = "100150200", id: str | None = None, timestamp: int | None = None,
                   processed: bool | None = False, bot_params: dict | None = None, **extra: Any) -> dict:
        """Stores a human message as the frontend would post it; `entity=None` means no botParams
        (a message between humans). Returns a copy of what was stored."""
        message: dict[str, Any] = {"id": id, "text": text, "username": username, "color": color,
                                   "domain": "saywhatwant.app", "message-type": "human", **extra}
        if timestamp is not None:
            message["timestamp"] = timestamp
        if context is not None:
            message["context"] = context
        if entity is not None or bot_params is not None:
            params: dict[str, Any] = {"entity": entity}
            for key, value in (("priority", priority), ("ais", ais), ("model", model), ("processed", processed)):
                if value is not None:
                    params[key] = value
            params.update(bot_params or {})
            message["botParams"] = params
        with self._lock:
            if message["id"] is None:
                message["id"] = self._new_id()
            return self._store(message)

    def add_raw(self, item: Any, timestamp: int) -> None:
        """Lists an arbitrary (possibly malformed) item at `timestamp`, to test the bot's defences."""
        with self._lock:
            self._seq += 1
            self._records.append((timestamp, self._seq, copy.deepcopy(item)))

    def messages(self) -> list[Any]:
        with self._lock:
            return [copy.deepcopy(m) for _, _, m in sorted(self._records, key=lambda r: r[:2])]

    def message(self, message_id: str) -> dict | None:
        with self._lock:
            m = self._by_id.get(str(message_id))
            return copy.deepcopy(m) if m is not None else None

    def replies(self) -> list[dict]:
        return [m for m in self.messages() if isinstance(m, dict) and m.get("message-type") == "AI"]

    def post_log(self) -> list[dict]:
        """Every post received, in order: `outcome` is stored, duplicate (id already stored) or failed."""
        with self._lock:
            return [dict(e) for e in self._post_log]

    def replies_by_reply_to(self) -> Counter[str]:
        return Counter(str(m.get("replyTo")) for m in self.replies())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            ai = sum(1 for _, _, m in self._records if isinstance(m, dict) and m.get("message-type") == "AI")
            return {"messages": len(self._records), "ai": ai, "human": len(self._records) - ai,
                    **{k: self._counts[k] for k in ("gets", "posts", "stored", "duplicates", "patches",
                                                    "patch_missing", "faults", "ack_lost", "unauthorized")}}

    # --- request handling (called from handler threads) ----------------------------------------

    def handle_list(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        def num(name: str, default: int | None) -> int | None:
            values = query.get(name)
            if not values:
                return default
            return int(float(values[0]))

        try:
            after = num("after", None)
            after = num("since", after)
            limit = max(1, min(num("limit", 100) or 100, 10_000))
        except ValueError:
            return 400, {"error": "after/since/limit must be numbers"}
        wanted = (query.get("type") or [None])[0]
        with self._lock:
            self._counts["gets"] += 1
            records = sorted(self._records, key=lambda r: r[:2])
            if wanted:
                records = [r for r in records if isinstance(r[2], dict) and
                           str(r[2].get("message-type", "human")).lower() == wanted.lower()]
            if after is not None:
                newer = [r for r in records if r[0] > after]
                page, has_more = newer[:limit], len(newer) > limit
            else:
                page, has_more = records[-limit:], len(records) > limit
            items = [copy.deepcopy(r[2]) for r in page]
        if self.shape == "array":
            return 200, list(reversed(items))
        return 200, {"comments": items, "hasMore": has_more}

    def handle_post(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            return 400, {"error": "body must be a JSON object"}
        if not isinstance(body.get("text"), str) or not body["text"]:
            return 400, {"error": "text is required"}
        with self._lock:
            self._counts["posts"] += 1
            mid = body.get("id")
            entry = {"id": mid, "text": body["text"], "timestamp": body.get("timestamp"), "outcome": "stored"}
            self._post_log.append(entry)
            if mid is not None and str(mid) in self._by_id:
                self._counts["duplicates"] += 1
                entry["outcome"] = "duplicate"
                return 200, {"id": mid, "status": "duplicate"}
            if self._fail_next > 0 or self._rng.random() < self.post_failure_rate:
                self._fail_next = max(0, self._fail_next - 1)
                self._counts["faults"] += 1
                entry["outcome"] = "failed"
                return 500, {"error": "injected fault"}
            message = copy.deepcopy(body)
            if mid is None:
                message["id"] = self._new_id()
            stored = self._store(message)
            self._counts["stored"] += 1
            if self._rng.random() < self.post_ack_loss_rate:
                self._counts["ack_lost"] += 1
                return 500, {"error": "injected fault after storing"}
        return 200, {"id": stored["id"], "timestamp": stored["timestamp"], "status": "success"}

    def handle_patch(self, message_id: str, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("botParams", {}), dict):
            return 400, {"error": "body must be {botParams: {...}}"}
        with self._lock:
            self._counts["patches"] += 1
            message = self._by_id.get(message_id)
            if message is None:
                self._counts["patch_missing"] += 1
                return 404, {"error": f"no message {message_id}"}
            params = message.get("botParams")
            if not isinstance(params, dict):
                params = message["botParams"] = {}
            params.update(body.get("botParams", {}))
            return 200, copy.deepcopy(message)

    def authorized(self, header: str | None) -> bool:
        if not self.token:
            return True
        ok = header == f"Bearer {self.token}"
        if not ok:
            with self._lock:
                self._counts["unauthorized"] += 1
        return ok


class _Json(JSONResponse):
    """JSON as the fake chat always wrote it (json.dumps defaults): the bad-input tests store values
    such as a NaN priority to see aibot reject them, and Starlette's JSONResponse refuses to render them
    (allow_nan=False), answering HTTP 500 instead."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False).encode("utf-8")


def _app(chat: FakeChatServer) -> Starlette:
    """The chat API and its `/_chat/*` admin routes as one Starlette endpoint (the paths are matched here,
    as the real Worker does, so an unknown path is a JSON 404 like every other answer)."""

    async def endpoint(request: Request) -> JSONResponse:
        status, body = _route(chat, request.method, request.url.path.rstrip("/"), request.url.query,
                              request.headers.get("Authorization"),
                              await request.body() if request.method in ("POST", "PATCH") else b"")
        return _Json(body, status)

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST", "PATCH"])])


def _route(chat: FakeChatServer, method: str, path: str, query: str, authorization: str | None,
           raw: bytes) -> tuple[int, Any]:
    body: Any = None
    if raw:
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, {"error": "body is not JSON"}
    if path.startswith("/_chat/"):
        return _admin(chat, method, path, body)
    if not path.startswith("/api/comments"):
        return 404, {"error": f"no route {method} {path}"}
    if not chat.authorized(authorization):
        return 401, {"error": "missing or wrong bearer token"}
    if path == "/api/comments" and method == "GET":
        return chat.handle_list(urllib.parse.parse_qs(query))
    if path == "/api/comments" and method == "POST":
        return chat.handle_post(body)
    if path.startswith("/api/comments/") and method == "PATCH":
        return chat.handle_patch(urllib.parse.unquote(path[len("/api/comments/"):]), body)
    return 405, {"error": f"{method} not allowed on {path}"}


def _admin(chat: FakeChatServer, method: str, path: str, body: Any) -> tuple[int, Any]:
    try:
        if path == "/_chat/stats" and method == "GET":
            return 200, {**chat.stats(), "replies_by_reply_to": dict(chat.replies_by_reply_to())}
        if path == "/_chat/faults" and method == "POST":
            chat.set_faults(**(body or {}))
            return 200, {"ok": True}
        if path == "/_chat/reset" and method == "POST":
            chat.reset()
            return 200, {"ok": True}
        if path == "/_chat/human" and method == "POST":
            if not isinstance(body, dict) or not isinstance(body.get("text"), str):
                return 400, {"error": "body must be {text, entity?, priority?, ...}"}
            return 200, chat.post_human(**body)
    except (TypeError, ValueError) as exc:
        return 400, {"error": str(exc)}
    return 404, {"error": f"no route {method} {path}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aibot.sim.chat", description="Run a fake chat API server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    p.add_argument("--shape", choices=SHAPES, default="object", help="answer shape of GET /api/comments")
    p.add_argument("--token", help="require this bearer token on /api/ routes")
    p.add_argument("--post-failure-rate", type=float, default=0.0)
    p.add_argument("--post-ack-loss-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    server = FakeChatServer(shape=args.shape, token=args.token, post_failure_rate=args.post_failure_rate,
                            post_ack_loss_rate=args.post_ack_loss_rate, seed=args.seed, host=args.host,
                            port=args.port).start()
    print(server.url, flush=True)
    print("READY", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
