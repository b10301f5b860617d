"""Connections to the aibot database, and the one executor of named queries.

Every connection sets `search_path` to the `aibot` schema first, so named queries can say `jobs`
instead of `aibot.jobs` and operators can run them as-is in psql after `SET search_path = aibot`.

Named queries are run only through `Queries`, bound to the package of the module that creates it
(`queries = db.Queries(__name__)`): it knows that package's files under `sql/queries/<package>/` and
no others, so a module cannot run another package's query; it asks that package's functions instead.
This package owns connections, pools and the query files; it knows nothing of jobs or servers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from aibot.db import queries as _files
from aibot.settings import get_settings

SCHEMA = "aibot"
APP_NAME = "aibot"

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: What a lost session raises: `AdminShutdown` (pg_terminate_backend, a PostgreSQL restart), a closed
#: socket, a pool that cannot connect for a moment. All are `OperationalError`s; so are serialization
#: failures and deadlocks, which a retry of an idempotent step also resolves.
CONNECTION_ERRORS = (psycopg.OperationalError,)
#: Attempts of an idempotent step (`Database.retrying`): the first, then one on a fresh connection.
RETRY_ATTEMPTS = 2


class NoDatabaseConfigured(RuntimeError):
    """Neither an explicit URL nor AIBOT_DATABASE_URL: the message says how to give one."""


def database_url(explicit: str | None = None) -> str:
    """`explicit`, else the process settings' `database_url` (AIBOT_DATABASE_URL)."""
    url = explicit or get_settings().database_url
    if not url:
        raise NoDatabaseConfigured(
            "no database configured: set AIBOT_DATABASE_URL (e.g. postgresql://user@127.0.0.1:5432/aibot) "
            "or pass --database-url"
        )
    return url


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
    _session.run(conn, "session_async_commit")
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


class Queries:
    """The named queries of one package, and the only way to run them.

    `Queries(__name__)` in `aibot.cluster.state` binds to `sql/queries/cluster/`; a name from another
    package's files is a KeyError naming the package that owns it.
    """

    def __init__(self, module: str) -> None:
        self.package = _files.owner_of(module)

    def sql(self, name: str) -> str:
        mine = _files.package_queries(self.package)
        if name in mine:
            return mine[name]
        owner = _files.all_queries().get(name)
        where = f"it belongs to {owner.module}; call that module" if owner else "no package defines it"
        raise KeyError(f"aibot.{self.package} has no named query {name!r} "
                       f"(sql/queries/{self.package}/): {where}")

    def run(self, conn: psycopg.Connection, name: str, params: Mapping[str, Any] | None = None) -> psycopg.Cursor:
        """Executes the named query and returns the cursor."""
        return conn.execute(self.sql(name), params or {})

    def one(self, conn: psycopg.Connection, name: str, params: Mapping[str, Any] | None = None) -> dict | None:
        return self.run(conn, name, params).fetchone()

    def all(self, conn: psycopg.Connection, name: str, params: Mapping[str, Any] | None = None) -> list[dict]:
        return self.run(conn, name, params).fetchall()

    def __repr__(self) -> str:
        return f"Queries({self.package!r})"


_session = Queries(__name__)


def single_statement(conn: psycopg.Connection) -> contextlib.AbstractContextManager:
    """The transaction one statement needs: none of its own on an idle autocommit connection (the
    statement is atomic by itself, one round trip), else `conn.transaction()` as usual (a
    transaction, or a savepoint inside the caller's)."""
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return contextlib.nullcontext()
    return conn.transaction()


@contextlib.contextmanager
def one_round_trip(conn: psycopg.Connection) -> Iterator[None]:
    """A transaction whose BEGIN, statements and COMMIT reach Postgres in one exchange: the block's
    statements are pipelined and their results are read after it (a fetch inside the block would
    sync early). For a short transaction on a path someone waits on (the bot's ingest), where
    `conn.transaction()` in pipeline mode still syncs at BEGIN and at COMMIT, three round trips.

    An exception in the block sends ROLLBACK instead of COMMIT, so the pipeline's sync commits
    nothing; an error of a statement makes Postgres skip the rest up to the sync (COMMIT included),
    and the transaction is rolled back here before the error is raised. On any other connection it is
    `conn.transaction()`: inside the caller's transaction a savepoint (the caller's commit decides), on
    an idle connection out of autocommit BEGIN ... COMMIT.
    """
    if not (conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE):
        with conn.transaction():
            yield
        return
    try:
        with conn.pipeline():
            _session.run(conn, "transaction_begin")
            try:
                yield
            except BaseException:
                _session.run(conn, "transaction_rollback")
                raise
            _session.run(conn, "transaction_commit")
    except BaseException:
        if conn.info.transaction_status in (psycopg.pq.TransactionStatus.INERROR,
                                            psycopg.pq.TransactionStatus.INTRANS):
            _session.run(conn, "transaction_rollback")
        raise


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

    @contextlib.contextmanager
    def autocommit(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in autocommit mode for the length of the block, for steps that are one
        statement each (a claim, a fenced completion): the statement is its own transaction, so it
        costs one round trip instead of BEGIN + statement + COMMIT, and it is just as atomic. Blocks
        of several changes that must commit together still say `conn.transaction()` inside. The
        session's settings (the worker's asynchronous commit) apply as before.

        The mode is a client-side flag in psycopg (no round trip); the connection goes back to the
        pool in its usual mode, so other users of the pool keep their implicit transactions.
        """
        with self.pool.connection() as conn:
            conn.autocommit = True
            try:
                yield conn
            finally:
                with contextlib.suppress(psycopg.Error):   # a broken session is discarded by the pool anyway
                    conn.autocommit = False

    def retrying(self, step: str, fn: Callable[[psycopg.Connection], T], *,
                 attempts: int = RETRY_ATTEMPTS, pause: float = 0.05, autocommit: bool = False) -> T:
        """`fn(conn)` in one transaction (with `autocommit`: on an autocommit connection, each of its
        single-statement steps its own transaction); when the session died under it, again on a
        fresh connection.

        Only for steps that are safe to repeat (a claim, a completion or renewal fenced by its token,
        a heartbeat). A lost session is an expected event: the pool's other idle connections most
        likely died with it (pg_terminate_backend of every session, a restart), and the cheap
        checkout check (`_check_if_idle`) does not ping a connection used a moment ago, so the whole
        pool is checked (`ConnectionPool.check`: broken ones are discarded) before the retry. The
        last failure is raised to the caller, who knows what an unfinished step means.
        """
        for attempt in range(1, attempts + 1):
            try:
                with (self.autocommit() if autocommit else self.transaction()) as conn:
                    return fn(conn)
            except CONNECTION_ERRORS as exc:
                if attempt >= attempts:
                    raise
                logger.warning("%s: database session lost (%s: %s); retrying on a fresh connection (%d/%d)",
                               step, type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                               attempt + 1, attempts)
                self.discard_broken()
                time.sleep(pause * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def discard_broken(self) -> None:
        """Pings every idle pooled connection and drops the dead ones (never raises)."""
        try:
            self.pool.check()
        except Exception as exc:  # the server may be down altogether; the next checkout reconnects
            logger.warning("pool check failed: %s", exc)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool = None
