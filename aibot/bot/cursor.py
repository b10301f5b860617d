"""Read positions of the bot's sources, kept in Postgres (`aibot.cursors`).

The position is saved in the same transaction as the jobs it covers, so after a crash either both
the jobs and the new position exist or neither does: a restart neither re-answers nor skips.
Positions are opaque text; each source decides what it stores (a row id, or JSON).
"""

from __future__ import annotations

from aibot import db

queries = db.Queries(__name__)


def load(conn, source: str) -> str | None:
    row = queries.one(conn, "cursor_get", {"source": source})
    return row["position"] if row else None


def save(conn, source: str, position: str) -> None:
    queries.run(conn, "cursor_set", {"source": source, "position": position})
