import threading

import psycopg

from aibot.db import migrate
from tests.support import pg


def test_template_is_fully_migrated(conn):
    versions = [r["version"] for r in conn.execute("SELECT version FROM aibot.migrations ORDER BY 1")]
    assert versions == [m.version for m in migrate.discover()]


def test_migrate_is_idempotent(db_url):
    assert migrate.migrate(db_url) == []
    assert migrate.pending(db_url) == []


def test_concurrent_migrations_apply_each_file_once(pg_server):
    name = pg.unique_name("aibot_mig")
    url = pg.create_database(pg_server, name)
    try:
        results, errors = [], []

        def go():
            try:
                results.append(migrate.migrate(url))
            except Exception as exc:  # pragma: no cover - the assertion below reports it
                errors.append(exc)

        threads = [threading.Thread(target=go) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        applied = sorted(m.version for batch in results for m in batch)
        assert applied == [m.version for m in migrate.discover()]
        with psycopg.connect(url) as c:
            assert c.execute("SELECT count(*) FROM aibot.migrations").fetchone()[0] == len(applied)
    finally:
        pg.drop_database(pg_server, name)
