"""Where the tests' Postgres comes from, and one fresh migrated database per test.

Order: AIBOT_TEST_DATABASE_URL (CI and developers), else a testcontainers Postgres when a Docker
engine answers, else an embedded PostgreSQL from the `embedded` extra (pgserver). Each test gets
its own database cloned from a migrated template, so tests are isolated and may run in parallel.
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
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as pg:
            yield pg.get_connection_url()
        return
    try:
        import pgserver
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "no test database: set AIBOT_TEST_DATABASE_URL, run Docker, or install the 'embedded' extra"
        ) from exc
    datadir = tempfile.mkdtemp(prefix="aibot-test-pg-")
    srv = pgserver.get_server(datadir, cleanup_mode="stop")
    try:
        yield srv.get_uri()
    finally:
        srv.cleanup()
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
