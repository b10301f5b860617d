"""Applies `sql/migrations/NNNN_name.sql` in order, once each, recorded in `aibot.migrations`.

Several hosts may run `aibot migrate` at once during a rolling upgrade: a transaction-scoped
advisory lock serialises them, and each file runs in its own transaction with its bookkeeping row,
so a failure leaves the database at the last good migration.

Owns `aibot.migrations`; the schema itself is the migration files'.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import dramatiq_postgres
import psycopg

from aibot.db import Queries
from aibot.db.queries import sql_root

log = logging.getLogger(__name__)
queries = Queries(__name__)

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]


def discover(root: Path | None = None) -> list[Migration]:
    folder = (root or sql_root()) / "migrations"
    found = []
    for path in sorted(folder.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise ValueError(f"migration file {path.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(m.group(1)), path.stem, path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a version number in {folder}")
    return found


def applied(conn: psycopg.Connection) -> dict[int, str]:
    return {version: checksum for version, checksum in queries.run(conn, "migrations_applied").fetchall()}


def migrate(url: str, *, progress=None) -> list[Migration]:
    """Applies pending migrations; returns those applied by this call."""
    done: list[Migration] = []
    with psycopg.connect(url, autocommit=False) as conn:
        with conn.transaction():
            queries.run(conn, "migrations_lock")
            queries.run(conn, "migrations_bootstrap")
        for mig in discover():
            with conn.transaction():
                queries.run(conn, "migrations_lock")
                have = applied(conn)
                if mig.version in have:
                    if have[mig.version] != mig.checksum:
                        log.warning("migration %s changed after it was applied (checksum %s != %s)",
                                    mig.name, mig.checksum, have[mig.version])
                    continue
                if progress:
                    progress(mig)
                conn.execute(mig.sql)
                queries.run(conn, "migrations_record",
                             {"version": mig.version, "name": mig.name, "checksum": mig.checksum})
                done.append(mig)
                log.info("applied migration %s", mig.name)
        with conn.transaction(), conn.cursor() as cur:
            # The default broker's own tables (idempotent, serialised by dramatiq-postgres itself), so
            # the bot can insert doorbell messages in its ingest transaction from the first run.
            dramatiq_postgres.init(cur)
    return done


def pending(url: str) -> list[Migration]:
    with psycopg.connect(url) as conn:
        present = queries.run(conn, "migrations_exists").fetchone()[0]
        have = applied(conn) if present else {}
    return [m for m in discover() if m.version not in have]
