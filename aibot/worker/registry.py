"""The registry of live aibot processes (`aibot.workers`): who runs where, and its heartbeat.

Every worker process registers at boot and beats while it lives, so `aibot status`, `aibot plan` and
`/metrics` see every process on every host (the original bot twice had a stray second process nobody
could see). Owns the `workers` rows; it knows nothing of Dramatiq (the actors' middleware calls it).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from aibot import db

queries = db.Queries(__name__)


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
