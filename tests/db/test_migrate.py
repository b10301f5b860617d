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


def test_0013_moves_the_waiting_notes_out_of_last_error(pg_server):
    """Before 0013 the loader's note was last_error with a "waiting: " prefix: a queued job's note becomes its
    waiting_reason; a finished job's (a stale note the old claim left) is dropped; real errors stay."""
    name = pg.unique_name("aibot_mig13")
    url = pg.create_database(pg_server, name)
    try:
        with psycopg.connect(url, autocommit=True) as c:
            migrate.queries.run(c, "migrations_bootstrap")
            for mig in migrate.discover():
                if mig.version < 13:
                    c.execute(mig.sql)
                    migrate.queries.run(c, "migrations_record",
                                        {"version": mig.version, "name": mig.name, "checksum": mig.checksum})
            c.execute("""INSERT INTO aibot.jobs (source, source_message_id, entity_id, model, priority, rank, state,
                                                 last_error)
                         VALUES ('t', 'q', 'e', 'm', 50, 1, 'queued', 'waiting: no server can load ''m'''),
                                ('t', 'd', 'e', 'm', 50, 2, 'done', 'waiting: no server can load ''m'''),
                                ('t', 'x', 'e', 'm', 50, 3, 'queued', 'HTTP 500')""")
        assert [m.version for m in migrate.migrate(url)] == [m.version for m in migrate.discover() if m.version >= 13]
        with psycopg.connect(url) as c:
            rows = dict((r[0], r[1:]) for r in c.execute(
                "SELECT source_message_id, waiting_reason, last_error FROM aibot.jobs"))
        assert rows == {"q": ("no server can load 'm'", None), "d": (None, None), "x": (None, "HTTP 500")}
    finally:
        pg.drop_database(pg_server, name)
