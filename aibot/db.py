"""Connections to the aibot database.

Every connection sets `search_path` to the `aibot` schema first, so named queries can say `jobs`
instead of `aibot.jobs` and operators can run them as-is in psql after `SET search_path = aibot`.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from aibot.sqlfiles import query

SCHEMA = "aibot"
APP_NAME = "aibot"


class NoDatabaseConfigured(RuntimeError):
    """Neither an explicit URL nor AIBOT_DATABASE_URL: the message says how to give one."""


def database_url(explicit: str | None = None) -> str:
    url = explicit or os.environ.get("AIBOT_DATABASE_URL")
    if not url:
        raise NoDatabaseConfigured(
            "no database configured: set AIBOT_DATABASE_URL (e.g. postgresql://user@127.0.0.1:5432/aibot) "
            "or pass --database-url"
        )
    return url


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and status output."""
    url = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(password\s*=\s*)(\S+)", r"\1***", url)


def _configure(conn: psycopg.Connection) -> None:
    conn.execute(f"SET search_path = {SCHEMA}, public")
    conn.commit()


def connect(url: str | None = None, *, autocommit: bool = False, **kw: Any) -> psycopg.Connection:
    conn = psycopg.connect(
        database_url(url), autocommit=autocommit, row_factory=dict_row, application_name=APP_NAME, **kw
    )
    if autocommit:
        conn.execute(f"SET search_path = {SCHEMA}, public")
    else:
        _configure(conn)
    return conn


IDLE_CHECK_SECONDS = 2.0
_returned_at: "weakref.WeakKeyDictionary[psycopg.Connection, float]" = weakref.WeakKeyDictionary()


def _mark_returned(conn: psycopg.Connection) -> None:
    _returned_at[conn] = time.monotonic()


def _check_if_idle(conn: psycopg.Connection) -> None:
    """Pings a pooled connection only if it sat idle a while.

    A ping on every checkout was a fifth of a worker's time per job; a connection used a moment ago
    is known good, and one broken since (a Postgres restart) fails its next statement, which the pool
    then discards. Idle ones, the likely victims of a restart, are still checked before use.
    """
    if time.monotonic() - _returned_at.get(conn, 0.0) > IDLE_CHECK_SECONDS:
        ConnectionPool.check_connection(conn)


def _configure_async_commit(conn: psycopg.Connection) -> None:
    conn.execute(f"SET search_path = {SCHEMA}, public")
    conn.execute(query("session_async_commit"))
    conn.commit()


def make_pool(url: str | None = None, *, min_size: int = 1, max_size: int = 8, name: str = "aibot",
              async_commit: bool = False) -> ConnectionPool:
    """`async_commit`: the pool's sessions do not wait for the WAL flush at commit (set once per
    connection, not per transaction); for callers whose writes are safe to lose on a Postgres crash."""
    pool = ConnectionPool(
        database_url(url),
        min_size=min_size,
        max_size=max_size,
        kwargs={"row_factory": dict_row, "application_name": APP_NAME},
        configure=_configure_async_commit if async_commit else _configure,
        check=_check_if_idle,
        reset=_mark_returned,
        name=name,
        open=False,
    )
    pool.open(wait=True, timeout=30)
    return pool


def run(conn: psycopg.Connection, name: str, params: Mapping[str, Any] | None = None) -> psycopg.Cursor:
    """Executes the named query from `sql/queries/` and returns the cursor."""
    return conn.execute(query(name), params or {})


def one(conn: psycopg.Connection, name: str, params: Mapping[str, Any] | None = None) -> dict | None:
    return run(conn, name, params).fetchone()


def all_rows(conn: psycopg.Connection, name: str, params: Mapping[str, Any] | None = None) -> list[dict]:
    return run(conn, name, params).fetchall()


class Database:
    """A lazily opened pool shared by the threads of one process.

    Dramatiq forks worker processes after importing the actors module, so the pool must not be
    opened at import time; `pool` opens it on first use in the process that uses it.
    """

    def __init__(self, url: str | None = None, *, max_size: int = 8, async_commit: bool = False):
        self._url = url
        self._max_size = max_size
        self._async_commit = async_commit
        self._pool: ConnectionPool | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return database_url(self._url)

    @property
    def pool(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = make_pool(self._url, max_size=self._max_size, async_commit=self._async_commit)
                self._pid = os.getpid()
            return self._pool

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        with self.pool.connection() as conn:
            yield conn

    def close(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool = None
