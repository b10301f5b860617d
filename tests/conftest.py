"""Shared fixtures: one fresh migrated database per test (cloned from a template migrated once per
session), and process settings read afresh for every test (tests change the environment)."""

from __future__ import annotations

import pytest

from aibot import db
from aibot.db import migrate
from aibot.settings import reset_settings
from tests.support import pg


@pytest.fixture(autouse=True)
def fresh_settings():
    """`aibot.settings.get_settings()` caches; a test's environment must not leak into the next."""
    reset_settings()
    yield
    reset_settings()


@pytest.fixture(scope="session")
def pg_server():
    with pg.server_url() as url:
        yield url


@pytest.fixture(scope="session")
def template_db(pg_server):
    """A database migrated once per session; every test clones it."""
    name = pg.unique_name("aibot_tpl")
    url = pg.create_database(pg_server, name)
    migrate.migrate(url)
    yield name
    pg.drop_database(pg_server, name)


@pytest.fixture
def db_url(pg_server, template_db, monkeypatch):
    """A fresh, migrated database for this test; also exported as AIBOT_DATABASE_URL."""
    name = pg.unique_name("aibot_t")
    url = pg.create_database(pg_server, name, template=template_db)
    monkeypatch.setenv("AIBOT_DATABASE_URL", url)
    reset_settings()
    yield url
    pg.drop_database(pg_server, name)


@pytest.fixture
def conn(db_url):
    with db.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture
def database(db_url):
    d = db.Database(db_url)
    yield d
    d.close()
