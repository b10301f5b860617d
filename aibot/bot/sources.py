"""Where chat messages come from: the original chat API, a Postgres inbox, or JSON lines.

A source turns "what is new since position P" into a `Batch` of raw messages plus the position to
save *with* the jobs (see `aibot.bot.cursor`). Sources do not judge messages: `aibot.bot.rules`
does, so a malformed item is passed through and recorded as rejected rather than dropped here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from aibot import db
from aibot.bot import rules

log = logging.getLogger(__name__)
queries = db.Queries(__name__)


class SourceError(Exception):
    """The source could not be read this time (network, HTTP status, unexpected answer)."""


@dataclass(frozen=True)
class Incoming:
    raw: Any
    fallback_id: str | None = None   # id to use when the message carries none (before hashing it)
    error: str | None = None         # already known to be unusable (e.g. a line that is not JSON)
    label: str | None = None         # where it came from, for reports: "line 3", "inbox 17"


@dataclass
class Batch:
    messages: list[Incoming] = field(default_factory=list)
    position: str | None = None      # cursor to save with the jobs; None = nothing to save
    more: bool = False               # the page was full: poll again without waiting


class Source(Protocol):
    """`name` keys the stored read cursor; `str(source)` says where messages come from, for the log."""

    name: str

    def poll(self, conn, position: str | None) -> Batch: ...


# --- the original chat API -------------------------------------------------------------------------

def _ts(item: Any) -> int | None:
    if not isinstance(item, dict):
        return None
    value = item.get("timestamp")
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _item_id(item: Any) -> str:
    if isinstance(item, dict) and isinstance(item.get("id"), str | int) and not isinstance(item.get("id"), bool):
        return str(item["id"])
    return rules.synthetic_id(item)


def parse_chat_position(position: str | None, start_after_ms: int) -> tuple[int, list[str]]:
    """(timestamp, ids already read at exactly that timestamp). A bare number is accepted so an
    operator can set the cursor by hand."""
    if position is None:
        return start_after_ms, []
    text = position.strip()
    if text.lstrip("-").isdigit():
        return int(text), []
    try:
        data = json.loads(text)
        return int(data["ts"]), [str(i) for i in data.get("ids", [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"chat cursor: cannot parse position {rules.preview(position)}: {exc}") from None


def plan_chat_page(items: list[Any], ts: int, seen: list[str]) -> tuple[list[Any], int, list[str]]:
    """Pure: the unseen items of one answer, oldest first, and the next (timestamp, seen ids).

    Messages with the same millisecond timestamp can straddle a page or arrive after we read that
    millisecond, so the next request asks for `after = ts - 1` and skips the ids already read at `ts`.
    Re-reading is safe anyway: jobs are unique on (source, message id, entity).
    """
    seen_set = set(seen)
    fresh = []
    for item in items:
        t = _ts(item)
        if t is not None and (t < ts or (t == ts and _item_id(item) in seen_set)):
            continue
        fresh.append(item)
    fresh.sort(key=lambda it: (_ts(it) if _ts(it) is not None else -1, _item_id(it)))
    stamps = [t for t in (_ts(it) for it in fresh) if t is not None]
    if not stamps:
        return fresh, ts, list(seen)
    new_ts = max(stamps)
    ids = [_item_id(it) for it in fresh if _ts(it) == new_ts]
    if new_ts == ts:
        ids = list(seen) + [i for i in ids if i not in seen_set]
    return fresh, new_ts, ids


class ChatSource:
    """`GET {base}/api/comments?after=<ts>&limit=N`; answers `{comments:[...]}` (or `{messages:[...]}`)
    or a bare array, in either order."""

    MAX_LIMIT = 10_000

    def __init__(self, base_url: str, *, token: Any = None, limit: int = 100, start_after_ms: int = 0,
                 timeout: float = 10.0, name: str = "chat", client: httpx.Client | None = None):
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.base_limit = limit
        self.limit = limit
        self.start_after_ms = start_after_ms
        secret = token.get_secret_value() if hasattr(token, "get_secret_value") else token
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self._client = client or httpx.Client(timeout=timeout, headers=headers)

    def __repr__(self) -> str:  # never show the token
        return f"ChatSource({self.base_url!r}, limit={self.limit})"

    def __str__(self) -> str:
        return f"the chat API at {self.base_url} ({self.base_limit} per page)"

    def close(self) -> None:
        self._client.close()

    def fetch(self, after: int, limit: int) -> list[Any]:
        url = f"{self.base_url}/api/comments"
        try:
            resp = self._client.get(url, params={"after": after, "limit": limit})
        except httpx.HTTPError as exc:
            raise SourceError(f"GET {url}: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            raise SourceError(f"GET {url}: HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            body = resp.json()
        except ValueError:
            raise SourceError(f"GET {url}: answer is not JSON: {resp.text[:200]!r}") from None
        if isinstance(body, list):
            return body
        if isinstance(body, dict):
            for key in ("comments", "messages"):
                if isinstance(body.get(key), list):
                    return body[key]
        raise SourceError(f"GET {url}: expected a list or {{comments: [...]}}, got {rules.preview(body)}")

    def poll(self, conn, position: str | None) -> Batch:
        ts, seen = parse_chat_position(position, self.start_after_ms)
        items = self.fetch(ts - 1 if seen else ts, self.limit)
        fresh, new_ts, ids = plan_chat_page(items, ts, seen)
        full = len(items) >= self.limit
        more = full and bool(fresh)
        # A full page that cannot move the cursor (already-read messages sharing one timestamp, or items
        # with no usable timestamp) would be fetched again and again: widen the page or we stall.
        if full and (not fresh or (new_ts, ids) == (ts, seen)):
            if self.limit < self.MAX_LIMIT:
                self.limit = min(self.limit * 2, self.MAX_LIMIT)
                more = True
                log.warning("chat page at ts=%d cannot move the cursor; limit raised to %d", ts, self.limit)
            else:
                more = False
                log.error("chat: more than %d messages at ts=%d cannot move the cursor; cannot page past them",
                          self.limit, ts)
        elif fresh:
            self.limit = self.base_limit
        changed = position is None or (new_ts, ids) != (ts, seen)
        return Batch(
            messages=[Incoming(raw=item, label=f"chat ts={_ts(item)}") for item in fresh],
            position=json.dumps({"ts": new_ts, "ids": ids}, separators=(",", ":")) if changed else None,
            more=more,
        )


# --- the Postgres inbox ----------------------------------------------------------------------------

class InboxSource:
    """`aibot.inbox` rows after the last id read. Writers should insert in short transactions: a row
    whose transaction commits after a higher id was already read would be passed over."""

    def __init__(self, *, limit: int = 100, name: str = "inbox"):
        self.name = name
        self.limit = limit

    def __str__(self) -> str:
        return f"the aibot.inbox table ({self.limit} rows per poll)"

    def poll(self, conn, position: str | None) -> Batch:
        after = int(position) if position else 0
        rows = queries.all(conn, "inbox_after", {"after": after, "limit": self.limit})
        if not rows:
            return Batch()
        return Batch(
            messages=[Incoming(raw=r["message"], fallback_id=f"inbox-{r['id']}", label=f"inbox {r['id']}")
                      for r in rows],
            position=str(rows[-1]["id"]),
            more=len(rows) >= self.limit,
        )


def add_to_inbox(conn, message: Any) -> int:
    from psycopg.types.json import Jsonb

    return queries.one(conn, "inbox_add", {"message": Jsonb(message)})["id"]


# --- JSON lines (aibot enqueue) --------------------------------------------------------------------

def parse_lines(lines: Iterable[str]) -> list[Incoming]:
    """One chat message per line; blank lines are skipped, a bad line becomes a pre-rejected item
    whose reason names the line, with an id hashed from the line so a re-run dedupes it."""
    out = []
    for n, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        label = f"line {n}"
        try:
            obj = json.loads(text)
        except ValueError as exc:
            out.append(Incoming(raw=text, fallback_id=rules.synthetic_id(text), label=label,
                                error=f"line {n}: invalid JSON ({exc}): {rules.preview(text)}"))
            continue
        out.append(Incoming(raw=obj, label=label))
    return out
