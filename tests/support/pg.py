"""Where the tests' Postgres comes from, and one fresh migrated database per test.

Order: AIBOT_TEST_DATABASE_URL (developers with a Postgres of their own), else an embedded PostgreSQL
from the `embedded` extra (pgserver, what the README's test command installs: it needs nothing running
and no network), else a testcontainers Postgres when a Docker engine answers (it pulls an image). Each
test gets its own database cloned from a migrated template, so tests are isolated and may run in
parallel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from urllib.parse import urlsplit, urlunsplit


def with_dbname(url: str, dbname: str) -> str:
    """The same server URL pointing at another database (URL form: dramatiq-postgres parses URLs)."""
    if "://" not in url:
        params = conninfo_to_dict(url)
        user = params.get("user", "postgres")
        auth = f"{user}:{params['password']}" if params.get("password") else user
        return f"postgresql://{auth}@{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}/{dbname}"
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


@contextlib.contextmanager
def server_url() -> Iterator[str]:
    url = os.environ.get("AIBOT_TEST_DATABASE_URL")
    if url:
        yield url
        return
    try:
        import pgserver  # noqa: F401
    except ImportError:
        pgserver = None
    if pgserver is not None:
        with embedded_server() as url:
            yield url
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as pg:
            yield pg.get_connection_url()
        return
    raise RuntimeError("no test database: install the 'embedded' extra (pip install -e '.[test,embedded]'), "
                       "set AIBOT_TEST_DATABASE_URL, or run Docker")


# The end-to-end and chaos tests run many processes, each with a small pool; initdb's default of 100
# connections is not enough for them (the CI script used to raise the machine cluster's limit to 400).
EMBEDDED_MAX_CONNECTIONS = 400


@contextlib.contextmanager
def embedded_server() -> Iterator[str]:
    """A throwaway pgserver cluster (Unix socket only) with room for the tests' connections.

    pgserver starts it with initdb's settings; max_connections needs a restart, done with pgserver's own
    pg_ctl (`restart` reuses the socket options of postmaster.opts). Stopped with pg_ctl as well, since
    pgserver's handle still points at the first postmaster.
    """
    import logging

    import pgserver
    from pgserver._commands import pg_ctl

    # pgserver logs every command at INFO, and once more from its atexit hook after pytest closed stderr.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    datadir = tempfile.mkdtemp(prefix="aibot-test-pg-")
    srv = pgserver.get_server(datadir, cleanup_mode=None)
    try:
        url = srv.get_uri()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET max_connections = {EMBEDDED_MAX_CONNECTIONS}")
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=srv.pgdata, user=srv.system_user, timeout=60)
        yield url
    finally:
        with contextlib.suppress(Exception):
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=srv.pgdata, user=srv.system_user, timeout=60)
        shutil.rmtree(datadir, ignore_errors=True)


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env().ping()
        return True
    except Exception:
        return False


def create_database(url: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        if template:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_dbname(url, name)


def drop_database(url: str, name: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def dbname_of(url: str) -> str:
    return conninfo_to_dict(url).get("dbname", "")
