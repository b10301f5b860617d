"""The registry of live aibot processes (`aibot.workers`): who runs where, and its heartbeat.

Every worker process registers at boot and beats while it lives, so `aibot status`, `aibot plan` and
`/metrics` see every process on every host (the original bot twice had a stray second process nobody
could see). Owns the `workers` rows; it knows nothing of Dramatiq (the actors' middleware calls it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from aibot import db

queries = db.Queries(__name__)
logger = logging.getLogger(__name__)


def register(conn: psycopg.Connection, worker_id: str, *, role: str = "worker", info: dict[str, Any] | None = None) -> None:
    queries.run(conn, "worker_register", {"worker_id": worker_id, "host": socket.gethostname(), "pid": os.getpid(),
                                          "role": role, "info": Jsonb(info or {})})


def heartbeat(conn: psycopg.Connection, worker_id: str) -> None:
    queries.run(conn, "worker_heartbeat", {"worker_id": worker_id})


def unregister(conn: psycopg.Connection, worker_id: str) -> None:
    queries.run(conn, "worker_unregister", {"worker_id": worker_id})


def dead_on_this_host(conn: psycopg.Connection, is_alive) -> list[str]:
    """Worker ids registered from this host whose process is gone (`is_alive(pid)` False)."""
    rows = queries.all(conn, "workers_on_host", {"host": socket.gethostname()})
    return [r["worker_id"] for r in rows if r["pid"] is not None and not is_alive(int(r["pid"]))]


def prune(conn: psycopg.Connection, older_than_seconds: float) -> int:
    """Forgets processes that stopped heartbeating long ago (crashed or killed -9); returns how many."""
    return queries.run(conn, "workers_prune", {"older_than_seconds": older_than_seconds}).rowcount


# Processes other than Dramatiq workers (`aibot bot`, `aibot scheduler`) hold no leases, so nothing
# else renews their row: they beat on their own at a worker's renewal cadence
# (Settings.renewal_seconds), so the one freshness rule (Settings.heartbeat_fresh_seconds: one lease)
# that status and /metrics apply holds for them too.
def _beat_seconds() -> float:
    from aibot.settings import get_settings

    return get_settings().renewal_seconds()


class Registered:
    """A `workers` row for this process while the `with` block runs, renewed by a daemon thread, so
    `aibot status`/`top`, the dashboard and `aibot_workers{role=...}` see the bot and the scheduler
    the way they see workers. A failed beat is logged and retried; it never stops the process."""

    def __init__(self, database: Any, role: str, *, worker_id: str | None = None, info: dict[str, Any] | None = None,
                 every: float | None = None):
        import uuid

        self.database = database
        self.role = role
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{role}:{uuid.uuid4().hex[:8]}"
        self.info = info or {}
        self.every = _beat_seconds() if every is None else every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Registered:
        with self.database.transaction() as conn:
            register(conn, self.worker_id, role=self.role, info=self.info)
        self._thread = threading.Thread(target=self._beat, name=f"aibot-{self.role}-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                with self.database.transaction() as conn:
                    heartbeat(conn, self.worker_id)
            except Exception as exc:  # noqa: BLE001 - the database may be restarting; the next beat retries
                logger.warning("%s %s: heartbeat failed: %s", self.role, self.worker_id, exc)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with self.database.transaction() as conn:
                unregister(conn, self.worker_id)
        except Exception as exc:  # noqa: BLE001 - prune forgets the row later
            logger.warning("%s %s: could not unregister: %s", self.role, self.worker_id, exc)
