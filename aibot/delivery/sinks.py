"""Where replies go: the original chat API, a Postgres table, or the log (dry run).

Delivery must be safe to repeat, because a worker may crash after the sink accepted a reply and before
the job was marked done. So the reply id is derived from the job (`aibot-<job id>`), and every sink
treats a second delivery of the same id as success without storing it twice.

Errors: `SinkError` means "try again later" (connection refused, timeout, 5xx, 429); the worker keeps
the stored reply and retries delivery without generating again. `SinkRejected` (a 4xx other than
409) will not get better by retrying.

Owns the `replies` rows (the Postgres sink); what a failed delivery means for the job is the claim
runtime's decision.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from typing import Any, Protocol

import httpx
from psycopg.types.json import Jsonb

from aibot import db

log = logging.getLogger(__name__)
queries = db.Queries(__name__)

DEFAULT_DOMAIN = "saywhatwant.app"


class SinkError(Exception):
    """Delivery failed but may succeed later."""

    retryable = True


class SinkRejected(SinkError):
    """The sink refused the reply for good (bad request)."""

    retryable = False


class Sink(Protocol):
    def deliver(self, job_id: int, payload: dict, reply: dict) -> str:
        """Delivers `reply` (at least `text`) for the job whose ingest payload is `payload`; returns the
        reply id. Repeating a delivery is a no-op that returns the same id."""
        ...


def reply_id(job_id: int) -> str:
    return f"aibot-{job_id}"


def reply_message(job_id: int, payload: dict, reply: dict, *, domain: str = DEFAULT_DOMAIN,
                  now_ms: int | None = None) -> dict:
    """The AI message as the chat stores it. Identity: the reply's own, else the message's `ais`
    override (resolved at ingest, so retries post the same), else the entity's."""
    ais = payload.get("ais") if isinstance(payload.get("ais"), dict) else {}
    text = reply.get("text")
    if not isinstance(text, str):
        raise SinkRejected(f"reply.text: expected a string, got {type(text).__name__}")
    return {
        "id": reply.get("id") or reply_id(job_id),
        "text": text,
        "username": reply.get("username") or ais.get("name") or payload.get("entity_username") or "AI",
        "color": reply.get("color") or ais.get("color") or payload.get("entity_color") or "128128128",
        "timestamp": int(reply.get("timestamp") or now_ms or time.time() * 1000),
        "domain": payload.get("domain") or domain,
        "message-type": "AI",
        "replyTo": payload.get("message_id"),
    }


class ChatSink:
    """`POST {base}/api/comments` (idempotent on `id`), then `PATCH /api/comments/<id>` processed=true."""

    def __init__(self, base_url: str, *, token: Any = None, domain: str = DEFAULT_DOMAIN, timeout: float = 15.0,
                 client: httpx.Client | None = None):
        self.base_url = base_url.rstrip("/")
        self.domain = domain
        secret = token.get_secret_value() if hasattr(token, "get_secret_value") else token
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self._client = client or httpx.Client(timeout=timeout, headers=headers)

    def __repr__(self) -> str:  # never show the token
        return f"ChatSink({self.base_url!r})"

    def close(self) -> None:
        self._client.close()

    def _send(self, method: str, url: str, body: dict) -> httpx.Response:
        try:
            return self._client.request(method, url, json=body)
        except httpx.HTTPError as exc:
            raise SinkError(f"{method} {url}: {type(exc).__name__}: {exc}") from None

    def deliver(self, job_id: int, payload: dict, reply: dict) -> str:
        message = reply_message(job_id, payload, reply, domain=self.domain)
        url = f"{self.base_url}/api/comments"
        resp = self._send("POST", url, message)
        if resp.status_code == 409:
            log.info("reply %s was already posted (409)", message["id"])
        elif resp.status_code >= 500 or resp.status_code == 429:
            raise SinkError(f"POST {url}: HTTP {resp.status_code}: {resp.text[:200]}")
        elif resp.status_code >= 400:
            raise SinkRejected(f"POST {url}: HTTP {resp.status_code}: {resp.text[:200]}")
        elif _is_duplicate(resp):
            log.info("reply %s was already posted (duplicate)", message["id"])
        self._mark_processed(payload.get("message_id"))
        return message["id"]

    def _mark_processed(self, message_id: Any) -> None:
        """Tells the chat (and any old bot still running) the message is answered. Our own exactly-once
        rests on the jobs table, not on this flag, so a failure is logged and tolerated: failing the
        delivery here would re-post nothing and could only turn a delivered job into a dead one."""
        if not message_id:
            return
        url = f"{self.base_url}/api/comments/{urllib.parse.quote(str(message_id), safe='')}"
        try:
            resp = self._send("PATCH", url, {"botParams": {"processed": True}})
        except SinkError as exc:
            log.warning("could not mark message %s processed: %s", message_id, exc)
            return
        if resp.status_code == 404:
            log.warning("could not mark message %s processed: not found (404)", message_id)
        elif resp.status_code >= 400:
            log.warning("could not mark message %s processed: HTTP %d", message_id, resp.status_code)


def _is_duplicate(resp: httpx.Response) -> bool:
    try:
        body = resp.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == "duplicate"


class PostgresSink:
    """Replies into `aibot.replies` (for a chat service that shares the database).

    A worker whose own database is the sink's does not call `deliver`: it writes `row()` in the
    statement that completes the job (`aibot.queue.jobs.finish_delivered_into_replies`), so the
    reply and the completion commit together. `deliver` (its own pool, synchronous commit) serves
    a sink in another database and every other caller.
    """

    def __init__(self, database: Any, *, domain: str = DEFAULT_DOMAIN):
        self.database = database
        self.domain = domain

    def row(self, job_id: int, payload: dict, reply: dict) -> dict:
        """The `replies` row of a reply: reply_id, reply_to, entity_id and the chat message."""
        message = reply_message(job_id, payload, reply, domain=self.domain)
        return {"reply_id": message["id"], "job_id": job_id, "reply_to": str(payload.get("message_id") or ""),
                "entity_id": payload.get("entity_id") or "-", "message": message}

    def shares(self, database: Any) -> bool:
        """Whether the replies table is in `database` (the same URL): then the completion can write it."""
        try:
            return self.database is database or self.database.url == database.url
        except Exception:   # no URL configured on one side: not provably the same database
            return False

    def deliver(self, job_id: int, payload: dict, reply: dict) -> str:
        row = self.row(job_id, payload, reply)
        try:
            with self.database.transaction() as conn:
                queries.run(conn, "reply_insert", {**row, "message": Jsonb(row["message"])})
        except Exception as exc:  # the database may be restarting: retry later
            raise SinkError(f"replies insert: {type(exc).__name__}: {exc}") from exc
        return row["reply_id"]


class DryRunSink:
    """Logs the reply instead of posting it (tests, first runs against a live config)."""

    def __init__(self, *, domain: str = DEFAULT_DOMAIN):
        self.domain = domain
        self.delivered: dict[str, dict] = {}

    def deliver(self, job_id: int, payload: dict, reply: dict) -> str:
        message = reply_message(job_id, payload, reply, domain=self.domain)
        if message["id"] not in self.delivered:
            self.delivered[message["id"]] = message
            log.info("dry run: would post %s as %s in reply to %s: %s", message["id"], message["username"],
                     message["replyTo"], message["text"][:200])
        return message["id"]


SINK_KINDS = ("chat", "postgres", "dry-run")


def make_sink(settings: Any, *, database: Any = None) -> Sink:
    """`settings.sink` (AIBOT_SINK) = chat | postgres | dry-run; default chat when a chat API URL is
    set, else postgres. The reply's domain is `settings.chat_domain` (AIBOT_CHAT_DOMAIN)."""
    kind = (getattr(settings, "sink", None) or "").strip().lower()
    chat_url = getattr(settings, "chat_api_url", None)
    domain = getattr(settings, "chat_domain", None) or DEFAULT_DOMAIN
    if not kind:
        kind = "chat" if chat_url else "postgres"
    if kind == "chat":
        if not chat_url:
            raise ValueError("AIBOT_SINK=chat needs AIBOT_CHAT_API_URL")
        return ChatSink(str(chat_url), token=getattr(settings, "chat_api_token", None), domain=domain)
    if kind == "postgres":
        if database is None:
            database = db.Database(getattr(settings, "database_url", None))
        return PostgresSink(database, domain=domain)
    if kind in ("dry-run", "dryrun", "dry_run"):
        return DryRunSink(domain=domain)
    raise ValueError(f"AIBOT_SINK: expected one of {', '.join(SINK_KINDS)}, got {kind!r}")
